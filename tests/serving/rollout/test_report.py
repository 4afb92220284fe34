"""`convstack rollout status` formatting (serving/rollout/report.py) on a hand-built status."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from convstack.common.ports import free_ports
from convstack.serving import model_config
from convstack.serving.rollout.controller import Rollout
from convstack.serving.rollout.report import format_age, format_status, gather_status
from convstack.serving.rollout.store import FileStore
from tests.serving.rollout.helpers import ReplicaScript, stand_in_replica

NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0s"),
        (45.9, "45s"),
        (59, "59s"),
        (60, "1m"),
        (12 * 60 + 59, "12m"),
        (3600, "1h"),
        (5 * 3600 + 3599, "5h"),
        (86400, "1d"),
        (3 * 86400 + 7200, "3d"),
    ],
)
def test_format_age(seconds, shown):
    assert format_age(seconds) == shown


def status() -> dict:
    return {
        "model": "digits",
        "store": "file:/srv/models.config",
        "repository": "/models/digits",
        "config_versions": [2, 3],
        "labels": {"canary": 3, "stable": 2},
        "versions": [
            {
                "version": 1,
                "created": "2025-05-29T12:00:00+00:00",
                "age_seconds": 3 * 86400,
                "test_accuracy": None,
                "dataset": None,
                "labels": [],
                "in_config": False,
            },
            {
                "version": 2,
                "created": "2025-06-01T07:00:00+00:00",
                "age_seconds": 5 * 3600,
                "test_accuracy": 0.9512,
                "dataset": "digits",
                "labels": ["stable"],
                "in_config": True,
            },
            {
                "version": 3,
                "created": "2025-06-01T11:48:00+00:00",
                "age_seconds": 720,
                "test_accuracy": 0.96123,
                "dataset": "digits",
                "labels": ["canary", "previous"],
                "in_config": True,
            },
        ],
        "servers": [
            {
                "target": "10.1.0.5:8500",
                "error": "",
                "versions": {
                    "2": {"state": "AVAILABLE", "error": ""},
                    "3": {"state": "END", "error": "Could not load"},
                },
                "labels": {"canary": None, "stable": 2},
            },
            {
                "target": "10.1.0.6:8500",
                "error": "UNAVAILABLE: connection refused",
                "versions": {},
                "labels": {},
            },
        ],
    }


def cells(line: str) -> list[str]:
    return line.split()


def test_the_header_names_the_model_store_labels_and_config_versions():
    lines = format_status(status()).splitlines()
    assert lines[0].split() == ["model", "digits", "store", "file:/srv/models.config"]
    assert lines[1] == "repository /models/digits"
    assert lines[2] == "labels: canary=3, stable=2   config serves: [2, 3]"


def test_the_versions_table_has_age_accuracy_labels_and_config_columns():
    lines = format_status(status()).splitlines()
    header = lines.index(next(line for line in lines if line.startswith("VERSION")))
    assert lines[header] == "VERSION  AGE  TEST ACC  LABELS           LOADED BY CONFIG"
    assert cells(lines[header + 1]) == ["1", "3d", "-", "-", "no"]
    assert cells(lines[header + 2]) == ["2", "5h", "0.9512", "stable", "yes"]
    assert cells(lines[header + 3]) == ["3", "12m", "0.9612", "canary,previous", "yes"]
    # Columns line up: each value starts where its header does.
    column = lines[header].index("LABELS")
    assert lines[header + 3][column:].startswith("canary,previous")


def test_servers_show_their_versions_labels_and_errors():
    lines = format_status(status()).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("SERVER"))
    assert cells(lines[header]) == ["SERVER", "VERSIONS", "LABELS"]
    first, second = lines[header + 1], lines[header + 2]
    assert first.startswith("10.1.0.5:8500")
    assert "2 AVAILABLE, 3 END (Could not load)" in first
    assert first.endswith("canary->None, stable->2")
    assert second.startswith("10.1.0.6:8500")
    assert "error: UNAVAILABLE: connection refused" in second
    assert second.rstrip().endswith("-")


def test_no_servers_no_labels_and_a_policy_config():
    empty = {**status(), "labels": {}, "config_versions": [], "versions": [], "servers": []}
    text = format_status(empty)
    assert "labels: none   config serves: by policy" in text
    assert "SERVER" not in text
    assert text.splitlines()[-1] == "VERSION  AGE  TEST ACC  LABELS  LOADED BY CONFIG"


def test_gather_status_of_a_file_store_and_replicas(tmp_path):
    base = tmp_path / "digits"
    created = {1: "2025-05-29T12:00:00+00:00", 2: "2025-06-01T07:00:00+00:00"}
    for version, when in created.items():
        card = {"created": when, "dataset": {"uri": "digits"}}
        if version == 2:
            card["test_metrics"] = {"accuracy": 0.95}
        (base / str(version) / "assets.extra").mkdir(parents=True)
        (base / str(version) / "assets.extra" / "model_card.json").write_text(json.dumps(card))
    config = model_config.add_model(
        model_config.ModelServerConfig(), "digits", base, specific=[2], labels={"stable": 2}
    )
    model_config.write_model_config(tmp_path / "models.config", config)
    script = ReplicaScript({2: ("AVAILABLE", ""), 1: ("END", "")}, {"stable": 2})
    (port,) = free_ports(1)
    with stand_in_replica(script) as target:
        rollout = Rollout(
            "digits",
            FileStore(tmp_path / "models.config"),
            [target, f"127.0.0.1:{port}"],
            golden=lambda version: pytest.fail("status needs no golden set"),
        )
        status = gather_status(rollout, now=NOW)
    assert status["config_versions"] == [2]
    assert status["labels"] == {"stable": 2}
    assert status["repository"] == str(base)
    assert [(v["version"], v["labels"], v["in_config"]) for v in status["versions"]] == [
        (1, [], False),
        (2, ["stable"], True),
    ]
    assert status["versions"][0]["age_seconds"] == 3 * 86400
    assert status["versions"][1]["test_accuracy"] == 0.95
    live, gone = status["servers"]
    assert live == {
        "target": target,
        "error": "",
        "versions": {"1": {"state": "END", "error": ""}, "2": {"state": "AVAILABLE", "error": ""}},
        "labels": {"stable": 2},
    }
    assert "UNAVAILABLE" in gone["error"]
    json.dumps(status)  # --json prints it as it is
    text = format_status(status)
    assert f"{target}  1 END, 2 AVAILABLE" in text
    assert "error: UNAVAILABLE" in text


def test_status_without_the_model_volume_still_shows_labels_and_servers(tmp_path):
    # A configmap-style config whose base path exists only inside the cluster.
    config = model_config.add_model(
        model_config.ModelServerConfig(),
        "digits",
        "/models-only-in-the-cluster/digits",
        specific=[1, 2],
        labels={"stable": 2, "previous": 1},
    )
    model_config.write_model_config(tmp_path / "models.config", config)
    script = ReplicaScript(
        {1: ("AVAILABLE", ""), 2: ("AVAILABLE", "")}, {"stable": 2, "previous": 1}
    )
    with stand_in_replica(script) as target:
        rollout = Rollout(
            "digits",
            FileStore(tmp_path / "models.config"),
            [target],
            golden=lambda version: pytest.fail("status needs no golden set"),
        )
        status = gather_status(rollout, now=NOW)
    assert status["versions"] == []
    assert "/models-only-in-the-cluster/digits" in status["repository_error"]
    assert status["labels"] == {"previous": 1, "stable": 2}
    assert status["servers"][0]["labels"] == {"previous": 1, "stable": 2}
    text = format_status(status)
    assert "versions on disk: not readable here" in text
    assert f"{target}  1 AVAILABLE, 2 AVAILABLE  previous->1, stable->2" in text


def test_status_warns_when_a_labelled_version_is_missing_on_disk(tmp_path):
    # After `rm -rf` of stable's directory the servers still serve it from memory.
    base = tmp_path / "digits"
    (base / "1").mkdir(parents=True)
    config = model_config.add_model(
        model_config.ModelServerConfig(),
        "digits",
        base,
        specific=[1, 2],
        labels={"stable": 2, "previous": 1},
    )
    model_config.write_model_config(tmp_path / "models.config", config)
    rollout = Rollout(
        "digits",
        FileStore(tmp_path / "models.config"),
        [],
        golden=lambda version: pytest.fail("status needs no golden set"),
    )

    status = gather_status(rollout, now=NOW)

    warning = "stable version 2 is missing on disk; a replica restart will lose it"
    assert status["warnings"] == [warning]
    assert f"warning: {warning}" in format_status(status).splitlines()
