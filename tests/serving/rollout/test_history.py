"""The append-only rollout history (serving/rollout/history.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from convstack.serving.rollout.history import (
    HISTORY_FILE,
    HistoryError,
    append_record,
    history_path,
    make_record,
    read_history,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def record(action: str, stable: int, **extra) -> dict:
    return make_record(
        model="digits",
        action=action,
        outcome="ok",
        store="file:/tmp/models.config",
        before={"versions": [stable - 1], "labels": {"stable": stable - 1}},
        after={"versions": [stable], "labels": {"stable": stable}},
        **extra,
    )


def test_no_history_reads_as_empty(tmp_path):
    assert read_history(tmp_path) == []


def test_records_are_read_back_in_the_order_they_were_appended(tmp_path):
    written = [record("canary", 2), record("promote", 3), record("rollback", 4, detail="bad")]
    for entry in written:
        assert append_record(tmp_path, entry) == tmp_path / HISTORY_FILE
    assert read_history(tmp_path) == written
    assert [r["action"] for r in read_history(tmp_path)] == ["canary", "promote", "rollback"]


def test_a_record_says_who_when_what_from_to_and_the_gates(tmp_path):
    gates = [{"gate": "quality", "passed": True, "summary": "ok", "figures": {"accuracy": 0.9}}]
    entry = record("canary", 2, gates=gates)
    append_record(tmp_path, entry)
    (read,) = read_history(tmp_path)
    assert read["gates"] == gates
    assert read["from"] == {"versions": [1], "labels": {"stable": 1}}
    assert read["to"] == {"versions": [2], "labels": {"stable": 2}}
    assert "@" in read["who"]
    assert read["time"].endswith("+00:00")


def test_the_file_is_only_ever_appended_to(tmp_path):
    path = history_path(tmp_path)
    append_record(tmp_path, record("canary", 2))
    first = path.read_bytes()
    inode = path.stat().st_ino
    append_record(tmp_path, record("promote", 3))
    after = path.read_bytes()
    assert after.startswith(first)
    assert len(after) > len(first)
    assert path.stat().st_ino == inode  # not replaced by a new file either
    assert after.count(b"\n") == 2


def test_a_damaged_line_is_reported_with_its_number(tmp_path):
    append_record(tmp_path, record("canary", 2))
    with history_path(tmp_path).open("a") as handle:
        handle.write('{"action": "promote", \n')
    append_record(tmp_path, record("rollback", 3))
    with pytest.raises(HistoryError, match=rf"{HISTORY_FILE}:2: not a JSON record") as caught:
        read_history(tmp_path)
    assert "\n" not in str(caught.value)


def test_an_unwritable_history_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(HistoryError, match=r"no-such-model/rollout_history\.jsonl: cannot append"):
        append_record(missing, record("canary", 2))


APPENDER = textwrap.dedent(
    """
    import sys
    from convstack.serving.rollout.history import append_record, make_record

    directory, writer, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for index in range(count):
        record = make_record(
            model="digits", action="canary", outcome="ok", store="file:x",
            before={}, after={}, detail=f"{writer}-{index}" + "x" * 5000,
        )
        append_record(directory, record)
    """
)


def test_concurrent_appends_from_several_processes_are_all_there_whole(tmp_path):
    # Records of 5 kB (more than a page): a torn or interleaved write would show.
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", APPENDER, str(tmp_path), f"w{w}", "25"],
            cwd=REPO_ROOT,
            stderr=subprocess.PIPE,
        )
        for w in range(4)
    ]
    for writer in writers:
        _, stderr = writer.communicate(timeout=120)
        assert writer.returncode == 0, stderr.decode()
    lines = history_path(tmp_path).read_text().splitlines()
    assert len(lines) == 100
    details = [json.loads(line)["detail"].rstrip("x") for line in lines]
    assert sorted(details) == sorted(f"w{w}-{i}" for w in range(4) for i in range(25))
    for w in range(4):  # each writer's records in its own order
        mine = [d for d in details if d.startswith(f"w{w}-")]
        assert mine == [f"w{w}-{i}" for i in range(25)]
