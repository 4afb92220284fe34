"""`convstack models-config` edits racing each other and a rollout's writes: every edit lands
(issue #12, defect 1: eight concurrent `add`s used to keep four names)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from convstack.serving import cli, config_file, model_config
from convstack.serving.rollout.store import FileStore, update_config

REPO_ROOT = Path(__file__).resolve().parents[2]
WRITERS = 8
ROUNDS = 3


def model_names(path: Path) -> list[str]:
    return sorted(
        model.name for model in model_config.load_model_config(path).model_config_list.config
    )


def models_config_add(config: Path, name: str, base: Path) -> subprocess.Popen:
    """The real CLI in its own process, as a user or a script runs it."""
    command = [sys.executable, "-m", "convstack.cli", "models-config", "add"]
    command += ["--config", str(config), "--name", name, "--base-path", str(base / name)]
    return subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_all(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        assert stdout.startswith("wrote "), stdout


@pytest.mark.parametrize("round_", range(ROUNDS))
@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "existing-file"])
def test_concurrent_cli_adds_all_land(tmp_path, round_, existing):
    config = tmp_path / "models.config"
    if existing:  # every writer edits; without it they also race to create the file
        model_config.write_model_config(config, model_config.single_model_config("seed", "/m/s"))
    names = [f"m{k}" for k in range(WRITERS)]

    wait_all([models_config_add(config, name, tmp_path) for name in names])

    assert model_names(config) == sorted(names + (["seed"] if existing else []))


ROLLOUT_WRITER = textwrap.dedent(
    """
    import sys
    from convstack.serving import model_config
    from convstack.serving.rollout.store import FileStore, update_config

    path, name = sys.argv[1], sys.argv[2]
    update_config(
        FileStore(path), lambda config: model_config.add_model(config, name, "/models/" + name)
    )
    """
)


def test_cli_adds_and_rollout_writes_in_processes_all_land(tmp_path):
    config = tmp_path / "models.config"
    model_config.write_model_config(config, model_config.single_model_config("seed", "/m/s"))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    processes = []
    for k in range(WRITERS // 2):
        processes.append(models_config_add(config, f"cli{k}", tmp_path))
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", ROLLOUT_WRITER, str(config), f"rollout{k}"],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr

    expected = ["seed"] + [f"{who}{k}" for who in ("cli", "rollout") for k in range(WRITERS // 2)]
    assert model_names(config) == sorted(expected)


def test_a_rollout_write_between_the_cli_read_and_write_is_kept(tmp_path, monkeypatch, capsys):
    """Deterministic: the rollout writes right after the CLI has read and edited the file."""
    config = tmp_path / "models.config"
    model_config.write_model_config(config, model_config.single_model_config("seed", "/m/s"))
    original_add = model_config.add_model
    interfered = []

    def add_then_a_rollout_writes(current, name, base_path, **kwargs):
        edited = original_add(current, name, base_path, **kwargs)
        if not interfered:
            interfered.append(name)
            update_config(
                FileStore(config),
                lambda other: model_config.set_version_labels(
                    model_config.set_version_policy(other, "seed", specific=[1]),
                    "seed",
                    {"stable": 1},
                ),
            )
        return edited

    monkeypatch.setattr(model_config, "add_model", add_then_a_rollout_writes)
    code = cli.models_config_main(
        ["add", "--config", str(config), "--name", "new", "--base-path", str(tmp_path / "new")]
    )

    assert code == 0, capsys.readouterr().err
    assert interfered == ["new"]
    on_disk = model_config.load_model_config(config).model_config_list.config
    assert sorted(model.name for model in on_disk) == ["new", "seed"]
    seed = next(model for model in on_disk if model.name == "seed")
    assert dict(seed.version_labels) == {"stable": 1}  # the rollout's edit survived


def test_the_cli_gives_up_after_bounded_conflicts_with_a_clear_error(tmp_path, monkeypatch, capsys):
    """Another writer lands between every read and write: the CLI stops, says so, writes
    nothing of its own and keeps every edit of the other writer."""
    config = tmp_path / "models.config"
    model_config.write_model_config(config, model_config.single_model_config("seed", "/m/s"))
    original_add = model_config.add_model
    others = []

    def add_while_another_writer_always_wins(current, name, base_path, **kwargs):
        edited = original_add(current, name, base_path, **kwargs)
        other = f"other{len(others)}"
        others.append(other)
        update_config(FileStore(config), lambda c: original_add(c, other, f"/m/{other}"))
        return edited

    monkeypatch.setattr(model_config, "add_model", add_while_another_writer_always_wins)
    monkeypatch.setattr(cli, "MODELS_CONFIG_ATTEMPTS", 3)
    monkeypatch.setattr(config_file, "CONFLICT_BACKOFF_SECONDS", 0.0)
    code = cli.models_config_main(
        ["add", "--config", str(config), "--name", "new", "--base-path", str(tmp_path / "new")]
    )

    error = capsys.readouterr().err.strip()
    assert code == cli.EXIT_GAVE_UP
    assert "\n" not in error
    assert error.startswith("convstack models-config: error: file:")
    assert "changed concurrently 3 times in a row; gave up; nothing written" in error
    assert model_names(config) == sorted(["seed", *others])
    assert len(others) == 3
