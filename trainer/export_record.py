"""What a run directory knows about its export, `run_dir/export.json`, so that a rerun of a run
never publishes the same training twice, wherever the previous attempt was killed.

The chief writes the record (atomically and durably) before it stages anything: the global step
and a fresh export id, not yet a version. The staged version carries the same id into its
rename (trainer/export.py), and only then does the record gain the version. A rerun at the same
global step therefore finds one of: a record with a version (done: publish nothing), or an
unfinished record whose id is in a published version (killed after the rename: finish the
record, publish nothing), or an unfinished record whose id is in no version (killed before the
rename: export again under the same id).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from convstack.common.files import write_json_atomic

RECORD_FILE = "export.json"


@dataclass(frozen=True)
class ExportRecord:
    """The export of one run at one global step; `version` is None until it is published."""

    global_step: int
    export_id: str | None = None  # None in records written before export ids existed
    version: int | None = None
    path: str | None = None

    @property
    def published(self) -> bool:
        return self.version is not None


def record_path(run_dir: Path) -> Path:
    return Path(run_dir) / RECORD_FILE


def read_record(run_dir: Path) -> ExportRecord | None:
    """The run's export record, or None if it has none (or one that cannot be read: a rerun
    then exports anew, which at worst publishes a version nobody recorded)."""
    try:
        data = json.loads(record_path(run_dir).read_text())
        return ExportRecord(
            global_step=int(data["global_step"]),
            export_id=data.get("export_id"),
            version=data.get("version"),
            path=data.get("path"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export_id_for(record: ExportRecord | None, global_step: int) -> str:
    """The id to export this step under: the unfinished record's, if it is for this very
    step (its version may be out already), else a fresh one."""
    if record is not None and record.global_step == global_step and record.export_id:
        return record.export_id
    return secrets.token_hex(16)


def record_intent(run_dir: Path, global_step: int, export_id: str) -> ExportRecord:
    """Durably note, before staging, that this step is being exported under `export_id`."""
    record = ExportRecord(global_step=global_step, export_id=export_id)
    _write(run_dir, record)
    return record


def record_published(run_dir: Path, record: ExportRecord, version: int, path: Path) -> None:
    """Durably note which version the export of `record` published."""
    _write(run_dir, ExportRecord(record.global_step, record.export_id, version, str(path)))


def _write(run_dir: Path, record: ExportRecord) -> None:
    write_json_atomic(
        record_path(run_dir), {k: v for k, v in asdict(record).items() if v is not None}
    )
