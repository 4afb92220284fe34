"""`convstack models-config` and `convstack serve` flag handling and start-up errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from convstack.serving.cli import build_serve_parser, models_config_main
from convstack.serving.model_config import load_model_config
from tests.loopback import EMBEDDED_SERVE, free_ports


def test_models_config_add_edit_remove(tmp_path, capsys):
    config = tmp_path / "models.config"
    base = tmp_path / "models" / "digits"
    assert (
        models_config_main(
            [
                "add",
                "--config",
                str(config),
                "--name",
                "digits",
                "--base-path",
                str(base),
                "--latest",
                "2",
            ]
        )
        == 0
    )
    assert (
        models_config_main(
            ["set-policy", "--config", str(config), "--name", "digits", "--specific", "1,2"]
        )
        == 0
    )
    assert (
        models_config_main(
            ["set-labels", "--config", str(config), "--name", "digits", "stable=1", "canary=2"]
        )
        == 0
    )
    parsed = load_model_config(config).model_config_list.config[0]
    assert parsed.name == "digits" and parsed.base_path == str(base.resolve())
    assert list(parsed.model_version_policy.specific.versions) == [1, 2]
    assert dict(parsed.version_labels) == {"stable": 1, "canary": 2}

    capsys.readouterr()
    assert models_config_main(["show", "--config", str(config)]) == 0
    assert 'name: "digits"' in capsys.readouterr().out

    assert (
        models_config_main(
            [
                "add",
                "--config",
                str(config),
                "--name",
                "other",
                "--base-path",
                str(tmp_path / "other"),
                "--all",
            ]
        )
        == 0
    )
    assert models_config_main(["remove", "--config", str(config), "--name", "digits"]) == 0
    assert [m.name for m in load_model_config(config).model_config_list.config] == ["other"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["remove", "--name", "nope"], "nope"),
        (["set-labels", "--name", "other", "stable"], "LABEL=VERSION"),
        (["set-policy", "--name", "other", "--specific", "one"], "--specific"),
        (["add", "--name", "other", "--base-path", "/x"], "other"),
    ],
)
def test_models_config_errors_are_one_line_and_leave_the_file_alone(
    tmp_path, capsys, argv, expected
):
    config = tmp_path / "models.config"
    assert (
        models_config_main(
            ["add", "--config", str(config), "--name", "other", "--base-path", str(tmp_path / "o")]
        )
        == 0
    )
    before = config.read_text()
    capsys.readouterr()
    assert models_config_main([*argv, "--config", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("convstack models-config: error:") and expected in error
    assert "\n" not in error
    assert config.read_text() == before


def test_missing_config_file_for_edit_is_an_error(tmp_path, capsys):
    code = models_config_main(
        ["set-policy", "--config", str(tmp_path / "nope.config"), "--name", "x", "--all"]
    )
    assert code == 2
    assert "nope.config" in capsys.readouterr().err


def test_flags_accept_tf_serving_spellings_with_dashes_or_underscores():
    parser = build_serve_parser()
    a = parser.parse_args(
        ["--model_config_file=/m.config", "--rest_api_port=0", "--file_system_poll_wait_seconds=2"]
    )
    b = parser.parse_args(
        ["--model-config", "/m.config", "--rest-port", "0", "--file-system-poll-wait-seconds", "2"]
    )
    assert vars(a) == vars(b)
    assert (a.model_config_file, a.rest_api_port, a.file_system_poll_wait_seconds) == (
        "/m.config",
        0,
        2.0,
    )


def test_upstream_test_command_line_parses():
    """The flags TF Serving's own test base (tensorflow_model_server_test_base.py RunServer)
    passes to the real server, spelled as it spells them, all parse."""
    args = build_serve_parser().parse_args(
        [
            "--port=1",
            "--rest_api_port=2",
            "--rest_api_timeout_in_ms=5000",
            "--grpc_socket_path=/tmp/tf-serving.sock",
            "--model_name=default",
            "--model_base_path=/models/half_plus_two",
            "--enable_batching",
            "--grpc_channel_arguments=grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb",
            "--enable_signature_method_name_check=true",
        ]
    )
    assert args.grpc_socket_path == "/tmp/tf-serving.sock"
    assert args.grpc_channel_arguments == [
        ("grpc.max_connection_age_ms", 2000),
        ("grpc.lb_policy_name", "grpclb"),
    ]
    assert (args.enable_batching, args.enable_signature_method_name_check) == (True, True)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [([], False), (["--enable_batching"], True), (["--enable_batching=true"], True),
     (["--enable_batching=false"], False), (["--enable-batching=0"], False)],
)  # fmt: skip
def test_boolean_flags_take_absl_spellings(argv, expected):
    assert build_serve_parser().parse_args(argv).enable_batching is expected


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--grpc_channel_arguments=grpc.max_connection_age_ms", "not key=value"),
        ("--enable_batching=maybe", "not true or false: 'maybe'"),
        ("--max_request_tensor_bytes=0", "must be at least 1, got 0"),
        ("--rest_api_body_timeout_seconds=0", "must be positive"),
    ],
)
def test_bad_flag_values_are_one_line_usage_errors(flag, message, capsys):
    with pytest.raises(SystemExit) as caught:
        build_serve_parser().parse_args([flag])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_channel_arguments_keep_out_of_range_numbers_as_strings():
    from convstack.serving.cli import grpc_channel_arguments

    assert grpc_channel_arguments("a=1,b=x,c=99999999999,,d=") == [
        ("a", 1),
        ("b", "x"),
        ("c", "99999999999"),
        ("d", ""),
    ]


def serve(*args: str, timeout: float = 120):
    return subprocess.run(
        [*EMBEDDED_SERVE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("convstack serve: error:")]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("content", "flag", "expected", "code"),
    [
        ("model_config_list { config { name: 'x' ", "--model_config_file", "bad.config", 2),
        ("max_batch_size { value: -1 }", "--batching_parameters_file", "bad.config", 2),
        ("prometheus_config { colour: 1 }", "--monitoring_config_file", "bad.config", 2),
    ],
)
def test_bad_files_exit_2_with_one_line(tmp_path, content, flag, expected, code):
    path = tmp_path / "bad.config"
    path.write_text(content)
    extra = (
        [] if flag == "--model_config_file" else ["--model_name=m", f"--model_base_path={tmp_path}"]
    )
    if flag == "--batching_parameters_file":
        extra.append("--enable_batching")
    result = serve(f"{flag}={path}", *extra)
    assert result.returncode == code, result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]


@pytest.mark.slow
def test_serve_with_a_batching_file_but_batching_off_exits_2_before_loading(tmp_path):
    parameters = tmp_path / "batching.config"
    parameters.write_text("max_batch_size { value: 8 }\n")
    result = serve(
        "--model_name=m",
        f"--model_base_path={tmp_path}",
        f"--batching_parameters_file={parameters}",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = error_lines(result.stderr)
    assert "batching.config is given without --enable_batching" in line


@pytest.mark.slow
def test_a_port_in_use_is_one_clear_error(tmp_path):
    (rest_port,) = free_ports(1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(
            f"--port={port}",
            f"--rest_api_port={rest_port}",
            "--model_name=m",
            f"--model_base_path={tmp_path}",
        )
    assert result.returncode == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], result.stderr[-2000:]


def test_ssl_config_file_is_read_like_tf_serving(tmp_path):
    from convstack.serving.cli import UsageError, tls_from_ssl_config

    path = tmp_path / "ssl.config"
    path.write_text(
        'server_key: "-----BEGIN KEY-----\\nabc\\n-----END KEY-----"\n'
        'server_cert: "-----BEGIN CERT-----\\ndef\\n-----END CERT-----"\n'
        'custom_ca: "-----BEGIN CA-----\\nghi\\n-----END CA-----"\n'
        "client_verify: true\n"
    )
    tls = tls_from_ssl_config(path)
    assert tls.key.read_text() == "-----BEGIN KEY-----\nabc\n-----END KEY-----"
    assert tls.cert.read_text().startswith("-----BEGIN CERT-----\ndef")
    assert tls.client_ca is not None and "ghi" in tls.client_ca.read_text()
    assert oct(tls.key.stat().st_mode & 0o777) == "0o600"

    path.write_text(path.read_text().replace("client_verify: true", "client_verify: false"))
    assert tls_from_ssl_config(path).client_ca is None
    path.write_text('server_key: "k"\nserver_cert: "c"\ncolour: 1\n')
    with pytest.raises(UsageError, match=r"ssl\.config:3: .*no field named \"colour\""):
        tls_from_ssl_config(path)
    path.write_text('server_cert: "c"\n')
    with pytest.raises(UsageError, match="needs server_key"):
        tls_from_ssl_config(path)


def test_ssl_config_file_takes_whatever_protobuf_text_format_takes(tmp_path):
    """TF Serving parses the file with protobuf: PEMs split into adjacent strings, single
    quotes, `client_verify: 1` and comments are all valid SSLConfig text."""
    from convstack.serving.cli import tls_from_ssl_config

    path = tmp_path / "ssl.config"
    path.write_text(
        "# the key, one line per string\n"
        'server_key: "-----BEGIN KEY-----\\n"\n'
        '            "abc\\n"\n'
        '            "-----END KEY-----"\n'
        "server_cert: '-----BEGIN CERT-----\\ndef\\n-----END CERT-----'\n"
        'custom_ca: "ca" client_verify: 1\n'
    )
    tls = tls_from_ssl_config(path)
    assert tls.key.read_text() == "-----BEGIN KEY-----\nabc\n-----END KEY-----"
    assert tls.cert.read_text() == "-----BEGIN CERT-----\ndef\n-----END CERT-----"
    assert tls.client_ca is not None and tls.client_ca.read_text() == "ca"


def test_tensorflow_thread_flags_take_either_spelling_and_default_to_tensorflow_deciding():
    from convstack.serving.cli import tensorflow_threads_from_args
    from convstack.serving.server import TensorFlowThreads

    parser = build_serve_parser()
    defaults = parser.parse_args([])
    assert tensorflow_threads_from_args(defaults) == TensorFlowThreads(0, 0)
    a = parser.parse_args(
        ["--tensorflow_intra_op_parallelism=1", "--tensorflow_inter_op_parallelism=2"]
    )
    b = parser.parse_args(
        ["--tensorflow-intra-op-parallelism", "1", "--tensorflow-inter-op-parallelism", "2"]
    )
    assert vars(a) == vars(b)
    assert tensorflow_threads_from_args(a) == TensorFlowThreads(intra_op=1, inter_op=2)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--tensorflow_session_parallelism=3"], (3, 3)),
        # TF Serving's rule: either pool flag set, the session flag is ignored.
        (["--tensorflow_session_parallelism=3", "--tensorflow_intra_op_parallelism=1"], (1, 0)),
        (["--tensorflow_inter_op_parallelism=2"], (0, 2)),
    ],
)
def test_session_parallelism_follows_tf_serving_rules(argv, expected):
    from convstack.serving.cli import tensorflow_threads_from_args

    threads = tensorflow_threads_from_args(build_serve_parser().parse_args(argv))
    assert (threads.intra_op, threads.inter_op) == expected


def test_all_three_thread_flags_are_a_usage_error():
    from convstack.serving.cli import UsageError, tensorflow_threads_from_args

    args = build_serve_parser().parse_args(
        [
            "--tensorflow_session_parallelism=1",
            "--tensorflow_intra_op_parallelism=1",
            "--tensorflow_inter_op_parallelism=1",
        ]
    )
    with pytest.raises(UsageError, match="not all three"):
        tensorflow_threads_from_args(args)


def test_a_negative_inter_op_count_is_passed_on_when_a_pool_flag_is_above_zero(caplog):
    from convstack.serving.cli import tensorflow_threads_from_args
    from convstack.serving.server import TensorFlowThreads

    parser = build_serve_parser()
    caller_thread = parser.parse_args(
        ["--tensorflow_intra_op_parallelism=1", "--tensorflow_inter_op_parallelism=-1"]
    )
    assert tensorflow_threads_from_args(caller_thread) == TensorFlowThreads(1, -1)
    assert not caplog.records
    # TF Serving looks at the pool flags only when one is above 0: -1 alone is ignored, and said.
    alone = parser.parse_args(["--tensorflow_inter_op_parallelism", "-1"])
    assert tensorflow_threads_from_args(alone) == TensorFlowThreads(0, 0)
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert "--tensorflow_inter_op_parallelism=-1 ignored" in record.getMessage()
    # Nor does -1 count towards "all three".
    mixed = parser.parse_args(
        [
            "--tensorflow_session_parallelism=2",
            "--tensorflow_intra_op_parallelism=1",
            "--tensorflow_inter_op_parallelism=-1",
        ]
    )
    assert tensorflow_threads_from_args(mixed) == TensorFlowThreads(1, -1)


@pytest.mark.parametrize(
    "flag", ["--tensorflow_intra_op_parallelism=-1", "--tensorflow_session_parallelism=-2"]
)
def test_negative_intra_op_or_session_counts_are_refused(flag, capsys):
    # TensorFlow aborts the process for a negative intra-op pool; refuse it before that.
    with pytest.raises(SystemExit) as exit_info:
        build_serve_parser().parse_args([flag])
    assert exit_info.value.code == 2
    assert "must be 0 (TensorFlow decides) or more" in capsys.readouterr().err


def test_a_batching_file_without_enable_batching_is_refused_as_tf_serving_does(tmp_path):
    from convstack.serving.cli import UsageError, batching_from_args

    parameters = tmp_path / "batching.config"
    parameters.write_text("max_batch_size { value: 8 }\n")
    parser = build_serve_parser()
    with pytest.raises(UsageError, match=r"batching.config is given without --enable_batching"):
        batching_from_args(parser.parse_args([f"--batching_parameters_file={parameters}"]))
    with pytest.raises(UsageError, match="without --enable_batching"):
        batching_from_args(
            parser.parse_args(
                ["--enable_batching=false", f"--batching_parameters_file={parameters}"]
            )
        )
    both = parser.parse_args(["--enable_batching", f"--batching_parameters_file={parameters}"])
    assert batching_from_args(both).max_batch_size == 8
    assert batching_from_args(parser.parse_args([])) is None
    assert batching_from_args(parser.parse_args(["--enable_batching"])).max_batch_size >= 1


def test_thread_pools_cannot_change_once_tensorflow_runs():
    import tensorflow as tf

    from convstack.serving.errors import FailedPrecondition
    from convstack.serving.server import TensorFlowThreads

    assert float(tf.constant(1.0) + 1.0) == 2.0  # the pytest process's TensorFlow runs
    running = TensorFlowThreads.current()
    running.apply()  # what already runs is accepted
    with pytest.raises(FailedPrecondition, match="already runs in this process"):
        TensorFlowThreads(running.intra_op + 1, running.inter_op).apply()
    assert TensorFlowThreads.current() == running


@pytest.mark.slow
@pytest.mark.parametrize("inter_op", [2, -1])
def test_embedded_server_runs_tensorflow_with_the_thread_flags(tmp_path, inter_op):
    from convstack.serving.process import ServerProcess
    from tests.serving.helpers import IMAGE_SHAPE, MODEL_NAME, NUM_CLASSES, make_model_dir

    model_dir = make_model_dir(tmp_path / "models")
    flags = ["--tensorflow_intra_op_parallelism=1", f"--tensorflow-inter-op-parallelism={inter_op}"]
    server = ServerProcess.start(MODEL_NAME, model_dir, tmp_path / "serve.log", flags)
    try:
        server.wait_available(MODEL_NAME)
        # Eight concurrent requests: with -1 each runs its ops in its own thread.
        body = json.dumps({"instances": np.zeros((1, *IMAGE_SHAPE)).tolist()}).encode()
        url = f"{server.rest_target}/v1/models/{MODEL_NAME}:predict"
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: _post(url, body), range(8)))
    finally:
        assert server.stop() == 0, server.log_tail()
    (prediction,) = replies[0]["predictions"]  # the same image each time: the same answer
    assert len(prediction["probabilities"]) == NUM_CLASSES
    assert all(reply == replies[0] for reply in replies)
    # Logged after the model loaded: TensorFlow was running by then, with these pools.
    logged = server.log_path.read_text()
    pools = f"TensorFlow thread pools: intra_op_parallelism=1 inter_op_parallelism={inter_op}"
    assert pools in logged


def _post(url: str, body: bytes) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, body), timeout=60) as reply:
        return json.loads(reply.read())


@pytest.mark.slow
def test_sigterm_while_a_failed_initial_load_waits_to_retry_stops_the_server(tmp_path):
    """The initial load fails and waits an hour for its first retry: SIGTERM used to be
    held until every retry had run (5 retries, 5 hours here); it now cancels the retries and
    the server exits 0 after a clean stop."""
    import signal
    import time

    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    from convstack.serving.process import ServerProcess
    from tests.serving import helpers

    model_dir = helpers.make_repository(tmp_path / "models", helpers.exported_version(), [1])
    warmup = model_dir / "1" / "assets.extra" / "tf_serving_warmup_requests"
    record = prediction_log_pb2.PredictionLog()
    record.predict_log.request.inputs["not_an_input"].CopyFrom(tf.make_tensor_proto([1.0]))
    with tf.io.TFRecordWriter(str(warmup)) as writer:
        writer.write(record.SerializeToString())
    server = ServerProcess.start(
        helpers.MODEL_NAME,
        model_dir,
        tmp_path / "server.log",
        flags=["--load_retry_interval_micros=3600000000"],
    )
    try:
        deadline = time.monotonic() + 120
        while "failed to load (attempt 1 of 6)" not in server.log_tail(50):
            assert time.monotonic() < deadline and server.process.poll() is None, server.log_tail()
            time.sleep(0.2)
        server.process.send_signal(signal.SIGTERM)
        status = server.process.wait(timeout=60)  # a hang bound, far below the retries' hours
    finally:
        server.stop()

    log = server.log_tail(50)
    assert status == 0, log
    assert "stop requested while the initial models load: cancelling the loads" in log
    assert "Load retries of" in log and "cancelled" in log
