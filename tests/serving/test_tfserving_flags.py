"""A command line written for tensorflow_model_server starts the embedded server too."""

from __future__ import annotations

import pytest

from convstack.serving import tfserving_flags
from convstack.serving.cli import (
    build_serve_parser,
    server_options,
    tfserving_passed_on,
    version_text,
)

# Every flag TF Serving 2.20's tensorflow_model_server defines (model_servers/main.cc), each with
# a value of its type.
TF_SERVING_COMMAND_LINE = [
    "--port=8500",
    "--grpc_socket_path=/tmp/tfs.sock",
    "--rest_api_port=8501",
    "--rest_api_num_threads=8",
    "--rest_api_timeout_in_ms=30000",
    "--rest_api_enable_cors_support=false",
    "--enable_batching=true",
    "--enable_per_model_batching_parameters=false",
    "--allow_version_labels_for_unavailable_models=true",
    "--batching_parameters_file=/config/batching.config",
    "--model_config_file=/config/models.config",
    "--model_config_file_poll_wait_seconds=60",
    "--model_name=digits",
    "--model_base_path=/models/digits",
    "--max_num_load_retries=5",
    "--load_retry_interval_micros=60000000",
    "--file_system_poll_wait_seconds=1",
    "--flush_filesystem_caches=true",
    "--tensorflow_session_parallelism=0",
    "--tensorflow_intra_op_parallelism=1",
    "--tensorflow_inter_op_parallelism=1",
    "--tensorflow_session_config_file=",
    "--ssl_config_file=/config/ssl.config",
    "--platform_config_file=",
    "--per_process_gpu_memory_fraction=0",
    "--saved_model_tags=serve",
    "--grpc_channel_arguments=grpc.max_connection_age_ms=2000",
    "--grpc_max_threads=8",
    "--enable_model_warmup=true",
    "--num_request_iterations_for_warmup=0",
    "--version=false",
    "--monitoring_config_file=/config/monitoring.config",
    "--remove_unused_fields_from_bundle_metagraph=true",
    "--prefer_tflite_model=false",
    "--num_tflite_pools=1",
    "--num_tflite_interpreters_per_pool=1",
    "--enable_signature_method_name_check=false",
    "--xla_cpu_compilation_enabled=false",
    "--xla_gpu_compilation_enabled=false",
    "--enable_profiler=false",
    "--thread_pool_factory_config_file=",
    "--mixed_precision=",
    "--skip_initialize_tpu=false",
    "--enable_grpc_healthcheck_service=true",
    "--enable_serialization_as_tensor_content=false",
    "--num_load_threads=2",
    "--num_unload_threads=0",
    "--use_alts_credentials=false",
]


def parse(*argv: str):
    return build_serve_parser().parse_args(list(argv))


def test_every_tf_serving_flag_is_taken_with_its_type():
    args = parse(*TF_SERVING_COMMAND_LINE)
    assert args.rest_api_num_threads == 8 and args.grpc_max_threads == 8
    assert args.enable_model_warmup is True and args.num_load_threads == 2
    assert args.flush_filesystem_caches is True and args.use_alts_credentials is False
    assert args.response_tensor_content is False
    assert args.num_request_iterations_for_warmup == 0
    # TF Serving uses the count only when it is above 0: 0 replays each record once.
    zero = server_options(
        parse("--model_name=d", "--model_base_path=/m/d", "--num_request_iterations_for_warmup=0")
    )
    assert zero.num_request_iterations_for_warmup == 1
    assert tfserving_flags.refusal(args) is None


def test_only_a_value_the_embedded_server_does_not_act_as_gets_a_notice():
    assert tfserving_flags.notices(parse()) == []
    # What it does anyway (no profiler, no TPU to initialise) or acts on: nothing to say.
    quiet = parse(
        "--enable_grpc_healthcheck_service=false",
        "--enable_profiler=false",
        "--saved_model_tags=serve",
        "--skip_initialize_tpu",
        "--flush_filesystem_caches=false",
    )
    assert tfserving_flags.notices(quiet) == []
    (profiler, threads) = tfserving_flags.notices(
        parse("--enable_profiler", "--rest_api_num_threads", "8")
    )
    assert profiler == (
        "--enable_profiler=true has no effect in the embedded server: no TensorFlow profiler "
        "service is offered"
    )
    assert threads.startswith("--rest_api_num_threads=8 has no effect in the embedded server:")


@pytest.mark.parametrize(
    ("flag", "named"),
    [
        ("--platform_config_file=/config/platforms.config", "only TensorFlow SavedModels"),
        ("--use_alts_credentials=true", "use --ssl_config_file"),
        ("--use_alts_credentials", "use --ssl_config_file"),
    ],
)
def test_what_the_embedded_server_cannot_honour_is_refused(flag, named):
    line = tfserving_flags.refusal(parse(flag))
    assert line.startswith(f"{flag.split('=')[0]}=") and "cannot be honoured" in line
    assert named in line


def test_the_real_server_gets_every_such_flag_as_given():
    args = parse(
        "--rest_api_num_threads=8",
        "--platform_config_file=/p.config",
        "--skip_initialize_tpu",
        "--enable_model_warmup=false",
        "--num_load_threads=3",
        "--num_request_iterations_for_warmup=4",
        "--enable_serialization_as_tensor_content",
        "--enable_grpc_healthcheck_service=false",
        "--rest_api_enable_cors_support",
    )
    assert tfserving_passed_on(args) == [
        "--rest_api_num_threads=8",
        "--skip_initialize_tpu=true",
        "--platform_config_file=/p.config",
        "--enable_model_warmup=false",
        "--num_request_iterations_for_warmup=4",
        "--num_load_threads=3",
        "--enable_serialization_as_tensor_content=true",
        "--rest_api_enable_cors_support=true",
        "--enable_grpc_healthcheck_service=false",
    ]
    assert tfserving_passed_on(parse()) == []


def test_the_health_service_is_on_unless_turned_off():
    """On by default in the embedded server; the real server gets the flag only when given
    (its own default is off)."""
    base = ("--model_name=d", "--model_base_path=/m/d")
    assert server_options(parse(*base)).grpc_health_service is True
    assert server_options(parse(*base, "--enable_grpc_healthcheck_service")).grpc_health_service
    off = parse(*base, "--enable_grpc_healthcheck_service=false")
    assert server_options(off).grpc_health_service is False
    assert "--enable_grpc_healthcheck_service=false" in tfserving_passed_on(off)


def test_version_names_this_server_and_the_tensorflow_it_runs():
    first, second = version_text().splitlines()
    assert first.startswith("TensorFlow ModelServer: convstack ")
    assert second.startswith("TensorFlow Library: 2.")


@pytest.mark.slow
def test_a_tf_serving_command_line_starts_the_embedded_server_and_says_what_it_ignores(tmp_path):
    """The version's warmup file holds a record that fails: with warmup off it serves anyway."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    from convstack.serving.process import ServerProcess
    from tests.serving import helpers

    model_dir = helpers.make_repository(tmp_path / "models", helpers.exported_version(), [1])
    record = prediction_log_pb2.PredictionLog()
    record.predict_log.request.inputs["not_an_input"].CopyFrom(tf.make_tensor_proto([1.0]))
    warmup = model_dir / "1" / "assets.extra" / "tf_serving_warmup_requests"
    with tf.io.TFRecordWriter(str(warmup)) as writer:
        writer.write(record.SerializeToString())
    flags = [
        "--enable_model_warmup=false",
        "--rest_api_num_threads=8",
        "--grpc_max_threads=8",
        "--flush_filesystem_caches=true",
        "--saved_model_tags=serve",
        "--enable_grpc_healthcheck_service=true",
    ]
    server = ServerProcess.start(helpers.MODEL_NAME, model_dir, tmp_path / "serve.log", flags)
    try:
        server.wait_available(helpers.MODEL_NAME)
    finally:
        assert server.stop() == 0, server.log_tail()
    log = server.log_path.read_text()
    assert f"{helpers.MODEL_NAME} version 1 is AVAILABLE (0 warmup records replayed)" in log
    ignored = [line for line in log.splitlines() if "has no effect in the embedded server" in line]
    assert [line.split(" has no effect")[0].split()[-1] for line in ignored] == [
        "--grpc_max_threads=8",
        "--rest_api_num_threads=8",
    ], log


@pytest.mark.slow
def test_a_flag_the_embedded_server_cannot_honour_stops_it_with_one_line(tmp_path):
    import subprocess

    from tests.loopback import EMBEDDED_SERVE

    result = subprocess.run(
        [
            *EMBEDDED_SERVE,
            "--model_name=m",
            f"--model_base_path={tmp_path}",
            f"--platform_config_file={tmp_path / 'platforms.config'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith("convstack serve: error: --platform_config_file=")
    assert "cannot be honoured" in errors[0]
