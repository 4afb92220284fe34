"""Running the real TensorFlow Serving (`tensorflow_model_server` on PATH, or the
`tensorflow/serving` container when a Docker engine answers) with the same flags and config
that the embedded server takes. Building the command line is pure and tested; exec is the only
I/O."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TFSERVING_IMAGE = "tensorflow/serving:2.20.0"  # pinned: the newest published tag we tested flags on
BINARY_NAME = "tensorflow_model_server"
BINARY_ENV = "CONVSTACK_TFSERVING_BINARY"


@dataclass(frozen=True)
class TfServingFlags:
    """The TF Serving flags convstack forwards (names as TF Serving spells them)."""

    port: int
    rest_api_port: int
    model_config_file: Path
    model_config_file_poll_wait_seconds: float = 0
    file_system_poll_wait_seconds: float = 1
    enable_batching: bool = False
    batching_parameters_file: Path | None = None
    monitoring_config_file: Path | None = None
    allow_version_labels_for_unavailable_models: bool = False
    max_num_load_retries: int = 5
    load_retry_interval_micros: int = 60_000_000
    rest_api_timeout_in_ms: int = 30_000
    ssl_config_file: Path | None = None
    host: str = "0.0.0.0"
    # 0 leaves the choice to TensorFlow, as TF Serving's own defaults do.
    tensorflow_intra_op_parallelism: int = 0
    tensorflow_inter_op_parallelism: int = 0
    tensorflow_session_parallelism: int = 0
    grpc_socket_path: str | None = None
    grpc_channel_arguments: str = ""
    enable_signature_method_name_check: bool = False
    prefer_tflite_model: bool = False
    num_tflite_pools: int = 1
    num_tflite_interpreters_per_pool: int = 1
    extra_flags: tuple[str, ...] = ()  # `--name=value`, passed on as given

    def arguments(self) -> list[str]:
        args = [
            f"--port={self.port}",
            f"--rest_api_port={self.rest_api_port}",
            f"--model_config_file={self.model_config_file}",
            f"--model_config_file_poll_wait_seconds={int(self.model_config_file_poll_wait_seconds)}",
            f"--file_system_poll_wait_seconds={int(self.file_system_poll_wait_seconds)}",
            f"--max_num_load_retries={self.max_num_load_retries}",
            f"--load_retry_interval_micros={self.load_retry_interval_micros}",
            f"--rest_api_timeout_in_ms={self.rest_api_timeout_in_ms}",
        ]
        if self.host != "0.0.0.0":
            args.append(f"--rest_api_bind_address={self.host}")
        if self.enable_batching:
            args.append("--enable_batching=true")
        if self.batching_parameters_file:
            args.append(f"--batching_parameters_file={self.batching_parameters_file}")
        if self.monitoring_config_file:
            args.append(f"--monitoring_config_file={self.monitoring_config_file}")
        if self.allow_version_labels_for_unavailable_models:
            args.append("--allow_version_labels_for_unavailable_models=true")
        if self.ssl_config_file:
            args.append(f"--ssl_config_file={self.ssl_config_file}")
        for name in (
            "tensorflow_intra_op_parallelism",
            "tensorflow_inter_op_parallelism",
            "tensorflow_session_parallelism",
        ):
            if getattr(self, name):
                args.append(f"--{name}={getattr(self, name)}")
        return args + self._optional_arguments()

    def _optional_arguments(self) -> list[str]:
        """Flags passed only when set, so older TF Serving builds keep their own defaults."""
        args = []
        if self.grpc_socket_path:
            args.append(f"--grpc_socket_path={self.grpc_socket_path}")
        if self.grpc_channel_arguments:
            args.append(f"--grpc_channel_arguments={self.grpc_channel_arguments}")
        if self.enable_signature_method_name_check:
            args.append("--enable_signature_method_name_check=true")
        if self.prefer_tflite_model:
            args += [
                "--prefer_tflite_model=true",
                f"--num_tflite_pools={self.num_tflite_pools}",
                f"--num_tflite_interpreters_per_pool={self.num_tflite_interpreters_per_pool}",
            ]
        return args + list(self.extra_flags)


def find_binary() -> str | None:
    """CONVSTACK_TFSERVING_BINARY, else tensorflow_model_server on PATH."""
    configured = os.environ.get(BINARY_ENV)
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return shutil.which(BINARY_NAME)


def docker_engine_answers(timeout: float = 5.0) -> bool:
    """True when a Docker client is installed and its engine responds (not just the CLI)."""
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and bool(result.stdout.strip())


def binary_command(binary: str, flags: TfServingFlags) -> list[str]:
    return [binary, *flags.arguments()]


def docker_command(flags: TfServingFlags, mounts: list[Path], image: str = TFSERVING_IMAGE):
    """`docker run` with the host paths mounted at the same paths inside the container, so the
    config file's base_paths need no rewriting."""
    ports = [f"{flags.port}:{flags.port}", f"{flags.rest_api_port}:{flags.rest_api_port}"]
    command = ["docker", "run", "--rm", "--init", "-p", ports[0], "-p", ports[1]]
    for path in sorted({p.resolve() for p in mounts}):
        command += ["-v", f"{path}:{path}:ro"]
    command += ["--entrypoint", BINARY_NAME, image, *flags.arguments()]
    return command


def exec_command(command: list[str]) -> None:
    """Replace this process with TF Serving (signals then reach it directly)."""
    log.info("exec: %s", " ".join(command))
    os.execvp(command[0], command)
