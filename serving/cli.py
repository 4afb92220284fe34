"""`convstack serve` (flags named as TF Serving's, with dashes or underscores) and
`convstack models-config` (write or edit a models.config)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from pathlib import Path

from convstack.common.flags import boolean, positive_number, whole_number
from convstack.common.logs import configure_logging
from convstack.serving import launcher, tfserving_flags
from convstack.serving.kernels import use_plain_cpu_kernels

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def flag(self, name: str, *aliases: str, **kwargs):
        """Register `--name_with_underscores` and `--name-with-dashes` (plus aliases)."""
        spellings = {f"--{name}", f"--{name.replace('_', '-')}", *aliases}
        return self.add_argument(*sorted(spellings, key=len), dest=name, **kwargs)

    def switch(self, name: str, *aliases: str, help: str):
        """A boolean flag as TF Serving's command line takes it: `--name`, `--name=true` or
        `--name=false`."""
        return self.flag(
            name,
            *aliases,
            nargs="?",
            const=True,
            default=False,
            type=boolean,
            metavar="BOOL",
            help=help,
        )


def build_serve_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="convstack serve",
        description="Serve exported models through TensorFlow Serving's gRPC and REST APIs: "
        "the embedded server, or the real tensorflow_model_server when present.",
    )
    parser.flag(
        "backend",
        choices=["auto", "embedded", "tfserving"],
        default="auto",
        help="auto: real TF Serving when found (PATH, $CONVSTACK_TFSERVING_BINARY or a "
        "Docker engine), else embedded",
    )
    parser.flag("host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    parser.flag("port", type=int, default=8500, help="gRPC port (default 8500)")
    parser.flag(
        "grpc_socket_path",
        metavar="PATH",
        help="also serve gRPC on this UNIX socket (clients dial unix:PATH)",
    )
    parser.flag(
        "grpc_channel_arguments",
        type=grpc_channel_arguments,
        default=[],
        metavar="KEY=VALUE,...",
        help="gRPC server channel arguments, e.g. grpc.max_connection_age_ms=2000; integer "
        "values go as integers, others as strings (TF Serving's rule)",
    )
    parser.flag(
        "rest_api_port",
        "--rest-port",
        type=int,
        default=8501,
        help="REST port, 0 disables REST (default 8501)",
    )
    parser.flag(
        "model_config_file",
        "--model-config",
        metavar="PATH",
        help="a ModelServerConfig text proto (models.config)",
    )
    parser.flag("model_name", help="single model: its name")
    parser.flag("model_base_path", help="single model: directory holding its numeric versions")
    parser.flag(
        "model_base",
        help="single model: the model repository root (with --model-name, "
        "the versions are under MODEL_BASE/MODEL_NAME)",
    )
    parser.flag(
        "file_system_poll_wait_seconds",
        type=float,
        default=1.0,
        help="seconds between scans for new versions; 0 scans once (default 1)",
    )
    parser.flag(
        "model_config_file_poll_wait_seconds",
        type=float,
        default=0.0,
        help="seconds between re-reads of --model_config_file; 0 never (default 0)",
    )
    parser.switch("enable_batching", help="server-side batching")
    parser.switch(
        "run_lone_batches_at_once",
        help="with batching, a batch runs at once when every request in the server is already "
        "in it (no other could join it before batch_timeout_micros), on the event loop's thread "
        "if it is small; not in TF Serving, which always waits for the timeout (default false)",
    )
    parser.flag(
        "batching_parameters_file",
        metavar="PATH",
        help="BatchingParameters text proto (needs --enable_batching, as in TF Serving)",
    )
    parser.flag(
        "monitoring_config_file",
        metavar="PATH",
        help="MonitoringConfig text proto enabling Prometheus metrics on the REST port",
    )
    parser.switch(
        "allow_version_labels_for_unavailable_models",
        help="allow labels on versions that are not AVAILABLE (TF Serving's flag)",
    )
    parser.switch(
        "prefer_tflite_model",
        help="serve <version>/model.tflite where a version has one, else its SavedModel "
        "(TF Serving's flag)",
    )
    parser.flag(
        "num_tflite_pools",
        type=whole_number(1),
        default=1,
        metavar="N",
        help="TFLite interpreter pools (with --prefer_tflite_model; default 1)",
    )
    parser.flag(
        "num_tflite_interpreters_per_pool",
        type=whole_number(1),
        default=1,
        metavar="N",
        help="interpreters per TFLite pool; requests run on pools x this at once (default 1)",
    )
    parser.switch(
        "enable_signature_method_name_check",
        help="Classify, Regress and Predict check the signature's method_name (TF Serving's "
        "flag; off by default, as there)",
    )
    parser.flag("max_num_load_retries", type=int, default=5, help="retries of a failed load")
    parser.flag(
        "load_retry_interval_micros",
        type=int,
        default=60_000_000,
        help="wait between load retries (default one minute, as TF Serving)",
    )
    parser.flag(
        "rest_api_timeout_in_ms",
        type=int,
        default=30_000,
        help="deadline of a REST request (default 30000)",
    )
    parser.flag(
        "rest_api_body_timeout_seconds",
        type=positive_number,
        default=60.0,
        metavar="SECONDS",
        help="a REST request body must arrive within this; slower ones get 408 and are closed "
        "(default 60)",
    )
    parser.flag(
        "rest_api_idle_timeout_seconds",
        type=positive_number,
        default=75.0,
        metavar="SECONDS",
        help="a REST connection with no complete request head for this long is closed (default 75)",
    )
    parser.flag(
        "ssl_config_file",
        metavar="PATH",
        help="TF Serving SSLConfig text proto (server_key, server_cert, custom_ca, client_verify)",
    )
    parser.flag("tls_cert", metavar="PEM", help="server certificate file (gRPC TLS)")
    parser.flag("tls_key", metavar="PEM", help="server private key file")
    parser.flag("tls_client_ca", metavar="PEM", help="require client certificates signed by it")
    parser.flag(
        "max_message_bytes",
        type=int,
        default=256 * 1024 * 1024,
        help="largest gRPC message or REST body accepted",
    )
    parser.flag(
        "max_request_tensor_bytes",
        type=whole_number(1),
        default=256 * 1024 * 1024,
        metavar="BYTES",
        help="most a Predict request's tensors may make the server allocate, refused before "
        "allocating (a few bytes of TensorProto can declare petabytes of zeros)",
    )
    parser.flag(
        "max_request_fill_bytes",
        type=whole_number(0),
        default=1024 * 1024,
        metavar="BYTES",
        help="most a Predict request's tensors may declare beyond what they send (TensorFlow "
        "fills the rest with the last value or zeros; default 1 MiB)",
    )
    parser.switch(
        "response_tensor_content",
        "--enable_serialization_as_tensor_content",
        help="answer Predict outputs as raw tensor_content bytes instead of the typed fields "
        "(float_val, ...) TF Serving writes by default; faster for large outputs, read by our "
        "client (TF Serving's --enable_serialization_as_tensor_content)",
    )
    parser.flag(
        "max_concurrent_requests",
        type=int,
        default=1024,
        help="requests in flight before RESOURCE_EXHAUSTED",
    )
    parser.flag("request_threads", type=int, default=4, help="threads running unbatched requests")
    parser.flag(
        "tensorflow_intra_op_parallelism",
        type=thread_count,
        default=0,
        metavar="N",
        help="threads that share the work of one TensorFlow op; 0: TensorFlow decides "
        "(one per core, the default)",
    )
    parser.flag(
        "tensorflow_inter_op_parallelism",
        type=inter_op_thread_count,
        default=0,
        metavar="N",
        help="threads running independent TensorFlow ops at once; 0: TensorFlow decides "
        "(the default); negative: every op runs in the thread that asked for it (applied, as "
        "in TF Serving, only when this or --tensorflow_intra_op_parallelism is above 0)",
    )
    parser.flag(
        "tensorflow_session_parallelism",
        type=thread_count,
        default=0,
        metavar="N",
        help="both of the above, used only when neither is given (TF Serving's rule)",
    )
    parser.flag(
        "shutdown_grace_seconds",
        type=float,
        default=10.0,
        help="how long in-flight requests may take after SIGTERM",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="debug lines, and TensorFlow's own log lines and warnings (as "
        "CONVSTACK_LOG_LEVEL=DEBUG does)",
    )
    parser.switch(
        "enable_model_warmup",
        help="replay a version's assets.extra/tf_serving_warmup_requests before it serves "
        "(default true, as in TF Serving)",
    )
    parser.set_defaults(enable_model_warmup=True)
    parser.flag(
        "num_request_iterations_for_warmup",
        type=whole_number(0, "must be 0 or more (0 counts as 1)"),
        default=1,
        metavar="N",
        help="times each warmup record is replayed (0 counts as 1, as in TF Serving)",
    )
    parser.flag(
        "num_load_threads",
        type=whole_number(0, "must be 0 (the default) or more"),
        default=0,
        metavar="N",
        help="versions loaded at once; 0: the default, 2 (TF Serving's 0 loads one at a time)",
    )
    parser.flag(
        "enable_grpc_healthcheck_service",
        nargs="?",
        const=True,
        default=None,  # not given: on in the embedded server, TF Serving's off with --backend
        type=boolean,
        metavar="BOOL",
        help="serve grpc.health.v1 (embedded server: on unless =false; model-aware, plus TF "
        "Serving's ModelService and PredictionService names)",
    )
    parser.switch(
        "rest_api_enable_cors_support",
        help="add CORS headers (any origin; POST and GET; Content-Type) to every /v1/ answer",
    )
    parser.switch("version", help="print the server's and TensorFlow's versions and exit")
    tfserving_flags.add_to(parser)
    return parser


class UsageError(ValueError):
    """Bad flags or files; one line, exit status 2."""


def grpc_channel_arguments(text: str) -> list[tuple[str, int | str]]:
    """`key=value,key=value` as gRPC channel options; a 32-bit integer value is an int."""
    options: list[tuple[str, int | str]] = []
    for item in filter(None, text.split(",")):
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise argparse.ArgumentTypeError(f"not key=value: {item!r}")
        try:
            number = int(value)
        except ValueError:
            options.append((key, value))
            continue
        options.append((key, number) if -(2**31) <= number < 2**31 else (key, value))
    return options


# A thread count for TensorFlow: 0 (TensorFlow decides) or more.
thread_count = whole_number(0, "must be 0 (TensorFlow decides) or more")
# The inter-op pool may also be negative: TensorFlow then runs every op in the calling thread
# (ConfigProto.inter_op_parallelism_threads). TF Serving passes the value through as given.
inter_op_thread_count = whole_number(
    -(2**31), "must be a 32-bit integer (negative: ops run in the calling thread)"
)


def tensorflow_threads_from_args(args):
    """The embedded server's TensorFlow thread pools, by TF Serving's rules (server.cc): the
    intra/inter-op flags win when either is set, else the session flag sets both; all three
    at once is an error."""
    from convstack.serving.server import TensorFlowThreads

    intra, inter = args.tensorflow_intra_op_parallelism, args.tensorflow_inter_op_parallelism
    session = args.tensorflow_session_parallelism
    if intra > 0 and inter > 0 and session > 0:
        raise UsageError(
            "give --tensorflow_session_parallelism or --tensorflow_intra_op_parallelism and "
            "--tensorflow_inter_op_parallelism, not all three (as TF Serving)"
        )
    if intra > 0 or inter > 0:
        if session:
            logging.getLogger("serving").warning(
                "--tensorflow_session_parallelism=%d ignored: --tensorflow_intra_op_parallelism "
                "or --tensorflow_inter_op_parallelism is set (as in TF Serving)",
                session,
            )
        return TensorFlowThreads(intra_op=intra, inter_op=inter)
    if inter < 0:
        logging.getLogger("serving").warning(
            "--tensorflow_inter_op_parallelism=%d ignored: TF Serving applies the pool flags "
            "only when one of them is above 0; give --tensorflow_intra_op_parallelism too",
            inter,
        )
    return TensorFlowThreads(intra_op=session, inter_op=session)


def model_config_from_args(args):
    """The ModelServerConfig the flags describe (file, or a single model)."""
    from convstack.serving import model_config

    single = args.model_name or args.model_base_path or args.model_base
    if args.model_config_file and single:
        raise UsageError("give either --model_config_file or a single model, not both")
    if args.model_config_file:
        return model_config.load_model_config(args.model_config_file)
    if not args.model_name:
        raise UsageError(
            "give --model_config_file, or --model_name with --model_base_path (or --model_base)"
        )
    if args.model_base_path:
        base_path = Path(args.model_base_path)
    elif args.model_base:
        base_path = Path(args.model_base) / args.model_name
    else:
        raise UsageError("--model_name needs --model_base_path or --model_base")
    return model_config.single_model_config(args.model_name, str(base_path.resolve()))


def tls_from_args(args):
    from convstack.serving.server import TlsOptions

    if args.ssl_config_file:
        return tls_from_ssl_config(Path(args.ssl_config_file))
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise UsageError("--tls_cert and --tls_key go together")
        ca = Path(args.tls_client_ca) if args.tls_client_ca else None
        return TlsOptions(Path(args.tls_cert), Path(args.tls_key), ca)
    if args.tls_client_ca:
        raise UsageError("--tls_client_ca needs --tls_cert and --tls_key")
    return None


def tls_from_ssl_config(path: Path):
    """TF Serving's SSLConfig (a text proto, parsed by protobuf's parser) holds PEM contents
    inline; they are written to private temporary files for grpc."""
    from convstack.serving import text_protos
    from convstack.serving.server import TlsOptions

    try:
        config = text_protos.parse("SSLConfig", path.read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
    except text_protos.TextProtoError as exc:
        where = path if exc.line is None else f"{path}:{exc.line}"
        raise UsageError(f"{where}: {exc.detail}") from None
    if not (config.server_key and config.server_cert):
        raise UsageError(f"{path}: SSLConfig needs server_key and server_cert")
    directory = Path(tempfile.mkdtemp(prefix="convstack-tls-"))
    files = {}
    for name in ("server_key", "server_cert", "custom_ca"):
        if getattr(config, name):
            files[name] = directory / f"{name}.pem"
            fd = os.open(files[name], os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(getattr(config, name))
    client_ca = files.get("custom_ca") if config.client_verify else None
    return TlsOptions(files["server_cert"], files["server_key"], client_ca)


def check_batching_flags(args) -> None:
    """TF Serving refuses to start with a batching file but batching off (server.cc), rather
    than guess which of the two the user meant."""
    if args.batching_parameters_file and not args.enable_batching:
        raise UsageError(
            f"--batching_parameters_file {args.batching_parameters_file} is given without "
            "--enable_batching (TF Serving refuses this too): add --enable_batching, or drop "
            "the file"
        )


def batching_from_args(args):
    """The BatchingParameters to serve with, or None when batching is off."""
    from convstack.serving.batching import load_batching_parameters

    check_batching_flags(args)
    if not args.enable_batching:
        return None
    if args.batching_parameters_file:
        return load_batching_parameters(args.batching_parameters_file)
    return _default_batching()


def server_options(args):
    from convstack.serving.metrics import MonitoringConfig, load_monitoring_config
    from convstack.serving.server import ServerOptions

    batching = batching_from_args(args)
    monitoring = (
        load_monitoring_config(args.monitoring_config_file)
        if args.monitoring_config_file
        else MonitoringConfig()
    )
    return ServerOptions(
        model_config=model_config_from_args(args),
        host=args.host,
        port=args.port,
        rest_port=args.rest_api_port,
        model_config_file=Path(args.model_config_file) if args.model_config_file else None,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        batching=batching,
        monitoring=monitoring,
        allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
        max_num_load_retries=args.max_num_load_retries,
        load_retry_interval_seconds=args.load_retry_interval_micros / 1e6,
        grpc_max_message_bytes=args.max_message_bytes,
        grpc_socket_path=args.grpc_socket_path,
        grpc_channel_arguments=args.grpc_channel_arguments,
        signature_method_name_check=args.enable_signature_method_name_check,
        max_request_tensor_bytes=args.max_request_tensor_bytes,
        max_request_fill_bytes=args.max_request_fill_bytes,
        response_tensor_content=args.response_tensor_content,
        enable_model_warmup=args.enable_model_warmup,
        grpc_health_service=args.enable_grpc_healthcheck_service is not False,
        rest_cors=args.rest_api_enable_cors_support,
        num_request_iterations_for_warmup=max(1, args.num_request_iterations_for_warmup),
        num_load_threads=args.num_load_threads,
        prefer_tflite_model=args.prefer_tflite_model,
        num_tflite_pools=args.num_tflite_pools,
        num_tflite_interpreters_per_pool=args.num_tflite_interpreters_per_pool,
        max_concurrent_requests=args.max_concurrent_requests,
        run_lone_batches_at_once=args.run_lone_batches_at_once,
        request_threads=args.request_threads,
        tensorflow_threads=tensorflow_threads_from_args(args),
        rest_timeout_seconds=args.rest_api_timeout_in_ms / 1000,
        rest_body_timeout_seconds=args.rest_api_body_timeout_seconds,
        rest_idle_timeout_seconds=args.rest_api_idle_timeout_seconds,
        shutdown_grace_seconds=args.shutdown_grace_seconds,
        tls=tls_from_args(args),
    )


def _default_batching():
    from convstack.serving.batching import BatchingParameters

    return BatchingParameters()


def version_text() -> str:
    """What `--version` prints: TF Serving's two lines, naming this server for the first."""
    from importlib import metadata

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (
        f"TensorFlow ModelServer: convstack {installed('convstack')} (embedded, TF Serving "
        f"compatible)\nTensorFlow Library: {installed('tensorflow')}"
    )


def choose_backend(requested: str) -> tuple[str, str | None]:
    """('tfserving', binary-or-'docker') or ('embedded', None), and say why."""
    if requested == "embedded":
        return "embedded", None
    binary = launcher.find_binary()
    if binary:
        return "tfserving", binary
    if launcher.docker_engine_answers():
        return "tfserving", "docker"
    if requested == "tfserving":
        raise UsageError(
            "--backend tfserving: no tensorflow_model_server on PATH or in "
            f"${launcher.BINARY_ENV}, and no Docker engine answers"
        )
    return "embedded", None


def serve_main(argv: list[str]) -> int:
    args = build_serve_parser().parse_args(argv)
    if args.version:
        print(version_text())
        return 0
    configure_logging(args.verbose)
    use_plain_cpu_kernels()
    try:
        backend, where = choose_backend(args.backend)
        logging.getLogger("serving").info(
            "backend: %s%s",
            backend,
            f" ({where})"
            if where
            else " (no TF Serving binary or Docker engine found)"
            if args.backend == "auto"
            else "",
        )
        if backend == "tfserving":
            return _exec_tfserving(args, where)
        refused = tfserving_flags.refusal(args)
        if refused:
            raise UsageError(refused)
        for notice in tfserving_flags.notices(args):
            logging.getLogger("serving").warning("%s", notice)
        options = server_options(args)
    except (UsageError, ValueError, OSError) as exc:
        print(f"convstack serve: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from convstack.serving.errors import ServingError
    from convstack.serving.server import EmbeddedServer

    try:
        return asyncio.run(EmbeddedServer(options).run())
    except ServingError as exc:  # e.g. the initial models failed to load
        print(f"convstack serve: error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a port already in use
        print(f"convstack serve: error: {exc}", file=sys.stderr)
        return 1


def _exec_tfserving(args, where: str) -> int:
    from convstack.serving import model_config

    # The same one-line errors TF Serving would exit with.
    tensorflow_threads_from_args(args)
    check_batching_flags(args)
    config_path = args.model_config_file
    if not config_path:  # TF Serving gets the same single-model config as a file
        config = model_config_from_args(args)
        with tempfile.NamedTemporaryFile("w", suffix=".config", delete=False) as handle:
            handle.write(model_config.format_model_config(config))
        config_path = handle.name
    flags = launcher.TfServingFlags(
        port=args.port,
        rest_api_port=args.rest_api_port,
        model_config_file=Path(config_path),
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        enable_batching=args.enable_batching,
        batching_parameters_file=_path(args.batching_parameters_file),
        monitoring_config_file=_path(args.monitoring_config_file),
        allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
        max_num_load_retries=args.max_num_load_retries,
        load_retry_interval_micros=args.load_retry_interval_micros,
        rest_api_timeout_in_ms=args.rest_api_timeout_in_ms,
        ssl_config_file=_path(args.ssl_config_file),
        host=args.host,
        tensorflow_intra_op_parallelism=args.tensorflow_intra_op_parallelism,
        tensorflow_inter_op_parallelism=args.tensorflow_inter_op_parallelism,
        tensorflow_session_parallelism=args.tensorflow_session_parallelism,
        grpc_socket_path=args.grpc_socket_path,
        grpc_channel_arguments=",".join(f"{k}={v}" for k, v in args.grpc_channel_arguments),
        enable_signature_method_name_check=args.enable_signature_method_name_check,
        prefer_tflite_model=args.prefer_tflite_model,
        num_tflite_pools=args.num_tflite_pools,
        num_tflite_interpreters_per_pool=args.num_tflite_interpreters_per_pool,
        extra_flags=tuple(tfserving_passed_on(args)),
    )
    if where == "docker":
        config = model_config.load_model_config(config_path)
        mounts = [Path(config_path).parent] + [
            Path(m.base_path) for m in config.model_config_list.config
        ]
        command = launcher.docker_command(flags, mounts)
    else:
        command = launcher.binary_command(where, flags)
    launcher.exec_command(command)
    return 0  # not reached: exec replaced this process


def tfserving_passed_on(args) -> list[str]:
    """Flags for the real server that TfServingFlags has no field for, when not at its default."""
    extra = tfserving_flags.passed_on(args)
    if not args.enable_model_warmup:
        extra.append("--enable_model_warmup=false")
    if args.num_request_iterations_for_warmup > 1:
        extra.append(
            f"--num_request_iterations_for_warmup={args.num_request_iterations_for_warmup}"
        )
    if args.num_load_threads:
        extra.append(f"--num_load_threads={args.num_load_threads}")
    if args.response_tensor_content:
        extra.append("--enable_serialization_as_tensor_content=true")
    if args.rest_api_enable_cors_support:
        extra.append("--rest_api_enable_cors_support=true")
    if args.enable_grpc_healthcheck_service is not None:
        extra.append(
            f"--enable_grpc_healthcheck_service={str(args.enable_grpc_healthcheck_service).lower()}"
        )
    return extra


def _path(value: str | None) -> Path | None:
    return Path(value).resolve() if value else None


def build_models_config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convstack models-config",
        description="Write or edit a models.config (TF Serving's ModelServerConfig text proto). "
        "Every change is validated and written atomically.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    show = verbs.add_parser("show", help="print the config")
    add = verbs.add_parser("add", help="add a model (creates the file if missing)")
    add.add_argument("--name", required=True)
    add.add_argument("--base-path", required=True, help="directory holding numeric versions")
    policy = verbs.add_parser("set-policy", help="set a model's version policy")
    policy.add_argument("--name", required=True)
    labels = verbs.add_parser("set-labels", help="set a model's version labels")
    labels.add_argument("--name", required=True)
    labels.add_argument("labels", nargs="*", metavar="LABEL=VERSION")
    remove = verbs.add_parser("remove", help="remove a model")
    remove.add_argument("--name", required=True)
    for sub in (show, add, policy, labels, remove):
        sub.add_argument("--config", required=True, metavar="PATH", help="the models.config")
    for sub in (add, policy):
        choice = sub.add_mutually_exclusive_group()
        choice.add_argument("--latest", type=int, metavar="N", help="serve the N newest versions")
        choice.add_argument("--all", action="store_true", help="serve every version")
        choice.add_argument("--specific", metavar="V,V", help="serve exactly these versions")
    return parser


def _policy_kwargs(args) -> dict:
    if args.all:
        return {"all": True}
    if args.specific:
        try:
            return {"specific": [int(v) for v in args.specific.split(",")]}
        except ValueError as exc:
            raise UsageError(
                f"--specific: expected versions like 1,2, got {args.specific!r}"
            ) from exc
    return {"latest": args.latest or 1}


def _parse_labels(items: list[str]) -> dict[str, int]:
    labels = {}
    for item in items:
        label, _, version = item.partition("=")
        if not label or not version.isdigit():
            raise UsageError(f"expected LABEL=VERSION, got {item!r}")
        labels[label] = int(version)
    return labels


# Conflicting edits in a row before models-config gives up: each conflict means another
# writer's edit landed, so this outlasts dozens of concurrent editors.
MODELS_CONFIG_ATTEMPTS = 32
EXIT_GAVE_UP = 1


def _models_config_edit(args):
    """The edit `args` asks for, as a pure function of the config (run again on a conflict)."""
    from convstack.serving import model_config as mc

    def edit(config):
        if args.verb == "add":
            config = mc.add_model(config, args.name, str(Path(args.base_path).resolve()))
            return mc.set_version_policy(config, args.name, **_policy_kwargs(args))
        if args.verb == "set-policy":
            return mc.set_version_policy(config, args.name, **_policy_kwargs(args))
        if args.verb == "set-labels":
            return mc.set_version_labels(config, args.name, _parse_labels(args.labels))
        return mc.remove_model(config, args.name)

    return edit


def _show_config(path: Path) -> None:
    from convstack.serving import model_config as mc

    print(mc.format_model_config(mc.load_model_config(path)), end="")


def models_config_main(argv: list[str]) -> int:
    """`convstack models-config VERB`: show the config, or edit it through the conditional
    write every writer of models.config uses (serving/config_file.py), so that concurrent
    edits, ours or a rollout's, are retried on the fresh config instead of overwritten."""
    from convstack.serving import config_file

    args = build_models_config_parser().parse_args(argv)
    path = Path(args.config)
    try:
        if args.verb == "show":
            _show_config(path)
            return 0
        # Only `add` may create the file; editing a missing one is an error.
        store = config_file.ConfigFile(path, missing_ok=args.verb == "add")
        config_file.update_config(store, _models_config_edit(args), attempts=MODELS_CONFIG_ATTEMPTS)
    except config_file.ConfigConflictError as exc:
        print(f"convstack models-config: error: {exc}; nothing written, run it again",
              file=sys.stderr)  # fmt: skip
        return EXIT_GAVE_UP
    except (UsageError, ValueError, OSError, config_file.ConfigStoreError) as exc:
        print(f"convstack models-config: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {path}")
    return 0
