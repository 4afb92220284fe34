"""Command lines for the real TF Serving, and backend choice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from convstack.serving import launcher
from convstack.serving.cli import UsageError, choose_backend


def flags(**overrides) -> launcher.TfServingFlags:
    values = dict(port=8500, rest_api_port=8501, model_config_file=Path("/cfg/models.config"))
    values.update(overrides)
    return launcher.TfServingFlags(**values)


def test_binary_command_forwards_tf_serving_flags():
    command = launcher.binary_command(
        "/usr/bin/tensorflow_model_server",
        flags(
            enable_batching=True,
            batching_parameters_file=Path("/cfg/batching.config"),
            monitoring_config_file=Path("/cfg/monitoring.config"),
            allow_version_labels_for_unavailable_models=True,
            model_config_file_poll_wait_seconds=30,
        ),
    )
    assert command[0] == "/usr/bin/tensorflow_model_server"
    assert "--model_config_file=/cfg/models.config" in command
    assert "--model_config_file_poll_wait_seconds=30" in command
    assert "--enable_batching=true" in command
    assert "--batching_parameters_file=/cfg/batching.config" in command
    assert "--monitoring_config_file=/cfg/monitoring.config" in command
    assert "--allow_version_labels_for_unavailable_models=true" in command
    assert "--port=8500" in command and "--rest_api_port=8501" in command


def test_fidelity_flags_reach_tf_serving_unchanged_and_only_when_set():
    """--grpc_socket_path, --grpc_channel_arguments, the method-name check and the TFLite
    flags go to the real server with TF Serving's spelling; unset, they are left out."""
    command = launcher.binary_command(
        "tfs",
        flags(
            grpc_socket_path="/tmp/tfs.sock",
            grpc_channel_arguments="grpc.max_connection_age_ms=2000",
            enable_signature_method_name_check=True,
            prefer_tflite_model=True,
            num_tflite_pools=2,
            num_tflite_interpreters_per_pool=3,
        ),
    )
    assert command[-6:] == [
        "--grpc_socket_path=/tmp/tfs.sock",
        "--grpc_channel_arguments=grpc.max_connection_age_ms=2000",
        "--enable_signature_method_name_check=true",
        "--prefer_tflite_model=true",
        "--num_tflite_pools=2",
        "--num_tflite_interpreters_per_pool=3",
    ]
    plain = launcher.binary_command("tfs", flags())
    assert not any("socket" in a or "tflite" in a or "channel" in a for a in plain)


def test_docker_command_mounts_paths_read_only_at_the_same_place(tmp_path):
    command = launcher.docker_command(flags(), [tmp_path, tmp_path / "models"])
    assert command[:3] == ["docker", "run", "--rm"]
    assert f"{tmp_path.resolve()}:{tmp_path.resolve()}:ro" in command
    image_index = command.index(launcher.TFSERVING_IMAGE)
    assert ":latest" not in launcher.TFSERVING_IMAGE
    assert command[image_index - 1] == launcher.BINARY_NAME
    assert "--port=8500" in command[image_index:]


def test_backend_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither binary nor docker on PATH
    monkeypatch.delenv(launcher.BINARY_ENV, raising=False)
    assert choose_backend("auto") == ("embedded", None)
    assert choose_backend("embedded") == ("embedded", None)
    with pytest.raises(UsageError, match="no tensorflow_model_server"):
        choose_backend("tfserving")
    binary = tmp_path / "tensorflow_model_server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert choose_backend("auto") == ("tfserving", str(binary))
    assert choose_backend("embedded") == ("embedded", None)


def test_docker_client_without_engine_is_not_a_backend(monkeypatch, tmp_path):
    fake_docker = tmp_path / "docker"
    fake_docker.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    fake_docker.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + "/usr/bin:/bin")
    monkeypatch.delenv(launcher.BINARY_ENV, raising=False)
    if launcher.find_binary():
        pytest.skip("a real tensorflow_model_server is installed here")
    assert launcher.docker_engine_answers() is False
    assert choose_backend("auto") == ("embedded", None)


def test_thread_flags_pass_through_to_tf_serving_only_when_set():
    default = launcher.binary_command("tfs", flags())
    assert not any(arg.startswith("--tensorflow_") for arg in default)
    command = launcher.binary_command(
        "tfs",
        flags(
            tensorflow_intra_op_parallelism=1,
            tensorflow_inter_op_parallelism=2,
            tensorflow_session_parallelism=3,
        ),
    )
    assert [arg for arg in command if arg.startswith("--tensorflow_")] == [
        "--tensorflow_intra_op_parallelism=1",
        "--tensorflow_inter_op_parallelism=2",
        "--tensorflow_session_parallelism=3",
    ]
    in_docker = launcher.docker_command(flags(tensorflow_intra_op_parallelism=4), [])
    image_index = in_docker.index(launcher.TFSERVING_IMAGE)
    assert "--tensorflow_intra_op_parallelism=4" in in_docker[image_index:]


@pytest.mark.slow
def test_serve_hands_the_thread_flags_to_tf_serving_unchanged(tmp_path):
    import subprocess

    from tests.loopback import EMBEDDED_SERVE

    argv_file = tmp_path / "argv"
    stand_in = tmp_path / "tensorflow_model_server"  # records the command line it was given
    stand_in.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv_file}\n')
    stand_in.chmod(0o755)
    serve = [a for a in EMBEDDED_SERVE if a != "--backend=embedded"]
    result = subprocess.run(
        [
            *serve,
            "--backend=tfserving",
            f"--model_config_file={tmp_path / 'models.config'}",
            "--tensorflow-intra-op-parallelism=1",
            "--tensorflow_session_parallelism=3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, launcher.BINARY_ENV: str(stand_in)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    forwarded = argv_file.read_text().splitlines()
    assert "--tensorflow_intra_op_parallelism=1" in forwarded
    assert "--tensorflow_session_parallelism=3" in forwarded
    assert not any(arg.startswith("--tensorflow_inter_op") for arg in forwarded)
