"""Choosing the tf.distribute strategy: MirroredStrategy on one machine (GPUs, or the CPU split
into logical devices), MultiWorkerMirroredStrategy when TF_CONFIG names several workers."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from convstack.trainer.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerRole:
    """Where this process sits in a (possibly one-worker) cluster."""

    num_workers: int = 1
    task_type: str = "worker"
    task_index: int = 0
    cluster_has_chief: bool = False

    @property
    def is_chief(self) -> bool:
        # TF's convention: an explicit "chief" task, else worker 0 plays the chief.
        if self.cluster_has_chief:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    @property
    def is_multi_worker(self) -> bool:
        return self.num_workers > 1


def parse_tf_config(raw: str | None) -> WorkerRole:
    """Read TF_CONFIG (JSON). Absent or naming one task means a single worker."""
    if not raw:
        return WorkerRole()
    try:
        config = json.loads(raw)
        cluster = config.get("cluster", {})
        task = config.get("task", {})
        num_workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
        task_type = task.get("type", "worker")
        task_index = int(task.get("index", 0))
    except (ValueError, AttributeError, TypeError) as exc:
        raise ConfigError(f"TF_CONFIG is not valid JSON of the expected shape: {exc}") from exc
    if task_type not in ("chief", "worker"):
        raise ConfigError(f"TF_CONFIG task type {task_type!r} is not supported (chief or worker)")
    if num_workers > 1 and not 0 <= task_index < len(cluster.get(task_type, [])):
        raise ConfigError(f"TF_CONFIG task index {task_index} is outside cluster.{task_type}")
    return WorkerRole(max(num_workers, 1), task_type, task_index, bool(cluster.get("chief")))


@dataclass
class StrategySetup:
    strategy: object  # tf.distribute.Strategy
    name: str
    num_replicas: int
    role: WorkerRole
    devices: tuple[str, ...]
    on_gpu: bool


def configure_cpu_replicas(count: int) -> None:
    """Split the first physical CPU into `count` logical devices.

    Must run before TensorFlow initialises its devices; afterwards it only succeeds when
    at least `count` logical CPUs already exist (e.g. a test process that set them up).
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError as exc:  # devices already initialised
        have = len(tf.config.list_logical_devices("CPU"))
        if have < count:
            raise ConfigError(
                f"--replicas {count}: TensorFlow already initialised {have} CPU device(s); "
                "the CPU split must happen before any TensorFlow operation runs"
            ) from exc


def select_strategy(replicas: int | None, tf_config: str | None) -> StrategySetup:
    """Build the strategy for this process and log what was chosen."""
    import tensorflow as tf

    role = parse_tf_config(tf_config)
    gpus = tf.config.list_physical_devices("GPU")
    if role.is_multi_worker:
        setup = _multi_worker(role, gpus)
    elif gpus:
        if replicas is not None and replicas > len(gpus):
            raise ConfigError(f"--replicas {replicas}: only {len(gpus)} GPU(s) are visible")
        devices = tuple(f"/gpu:{i}" for i in range(replicas or len(gpus)))
        setup = StrategySetup(
            tf.distribute.MirroredStrategy(devices=list(devices)),
            "MirroredStrategy",
            len(devices),
            role,
            devices,
            True,
        )
    else:
        count = replicas or 1
        configure_cpu_replicas(count)
        devices = tuple(f"/cpu:{i}" for i in range(count))
        setup = StrategySetup(
            tf.distribute.MirroredStrategy(devices=list(devices)),
            "MirroredStrategy",
            count,
            role,
            devices,
            False,
        )
    log.info(
        "strategy: %s with %d replica(s) on %s (worker %s:%d of %d%s)",
        setup.name,
        setup.num_replicas,
        ", ".join(setup.devices),
        role.task_type,
        role.task_index,
        role.num_workers,
        ", chief" if role.is_chief else "",
    )
    return setup


def _multi_worker(role: WorkerRole, gpus: list) -> StrategySetup:
    import tensorflow as tf

    # NCCL only helps between GPUs; RING works everywhere, including loopback CPU tests.
    implementation = (
        tf.distribute.experimental.CommunicationImplementation.NCCL
        if gpus
        else tf.distribute.experimental.CommunicationImplementation.RING
    )
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=implementation
        )
    )
    devices = tuple(str(d) for d in strategy.extended.worker_devices)
    return StrategySetup(
        strategy,
        "MultiWorkerMirroredStrategy",
        strategy.num_replicas_in_sync,
        role,
        devices,
        bool(gpus),
    )
