"""Strategy selection: TF_CONFIG parsing (pure) and the logical-CPU MirroredStrategy."""

from __future__ import annotations

import json

import pytest

from convstack.trainer.errors import ConfigError
from convstack.trainer.strategy import WorkerRole, parse_tf_config, select_strategy


def tf_config(task_type: str, index: int, workers: int = 2, chief: bool = False) -> str:
    cluster = {"worker": [f"localhost:{2000 + i}" for i in range(workers)]}
    if chief:
        cluster["chief"] = ["localhost:1999"]
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


def test_no_tf_config_is_a_single_chief_worker():
    role = parse_tf_config(None)
    assert role == WorkerRole() and role.is_chief and not role.is_multi_worker


def test_worker_zero_is_chief_without_explicit_chief():
    assert parse_tf_config(tf_config("worker", 0)).is_chief
    second = parse_tf_config(tf_config("worker", 1))
    assert not second.is_chief and second.is_multi_worker and second.num_workers == 2


def test_explicit_chief_takes_the_role():
    assert parse_tf_config(tf_config("chief", 0, chief=True)).is_chief
    role = parse_tf_config(tf_config("worker", 0, chief=True))
    assert not role.is_chief and role.num_workers == 3


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("{not json", "not valid JSON"),
        (tf_config("ps", 0), "task type 'ps'"),
        (tf_config("worker", 5), "task index 5"),
    ],
)
def test_bad_tf_config_is_a_config_error(raw, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_tf_config(raw)


def test_cpu_replicas_make_a_mirrored_strategy():
    setup = select_strategy(2, None)
    assert setup.name == "MirroredStrategy"
    assert setup.num_replicas == setup.strategy.num_replicas_in_sync == 2
    assert setup.devices == ("/cpu:0", "/cpu:1")


def test_more_replicas_than_logical_cpus_after_init_is_a_config_error():
    import tensorflow as tf

    have = len(tf.config.list_logical_devices("CPU"))
    with pytest.raises(ConfigError, match="already initialised"):
        select_strategy(have + 1, None)
