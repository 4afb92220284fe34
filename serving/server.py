"""The embedded TF-Serving-compatible server: model manager + gRPC (grpc.aio) + REST (aiohttp)
on one event loop, config-file polling, a model-aware health service, graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import tensorflow as tf
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from convstack.serving import kernels
from convstack.serving.batching import BatchingParameters
from convstack.serving.errors import FailedPrecondition
from convstack.serving.grpc_api import (
    DEFAULT_MAX_REQUEST_FILL_BYTES,
    DEFAULT_MAX_REQUEST_TENSOR_BYTES,
    ModelServicer,
    ParseFailuresAsInternal,
    PredictionServicer,
)
from convstack.serving.inference import InferenceService
from convstack.serving.manager import ModelManager
from convstack.serving.metrics import MonitoringConfig, ServingMetrics
from convstack.serving.model_config import ModelConfigError, load_model_config
from convstack.serving.rest_api import RestApi
from convstack.serving.tflite import version_loader

log = logging.getLogger(__name__)

# The service names TF Serving's --enable_grpc_healthcheck_service marks SERVING once it starts.
TFSERVING_HEALTH_SERVICES = ("ModelService", "PredictionService")


@dataclass
class TlsOptions:
    """PEM files; `client_ca` set means clients must present a certificate it signed (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        pair = (self.key.read_bytes(), self.cert.read_bytes())
        root = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [pair], root_certificates=root, require_client_auth=root is not None
        )


@dataclass(frozen=True)
class TensorFlowThreads:
    """TensorFlow's two CPU thread pools in the server process (TF Serving's
    --tensorflow_intra_op_parallelism / --tensorflow_inter_op_parallelism); 0 lets TensorFlow
    decide (about one thread per core each). A negative inter_op has no pool: each op runs in
    the thread that runs the model (a request's own thread), with no hand-off."""

    intra_op: int = 0
    inter_op: int = 0

    def apply(self) -> None:
        """Size the pools. TensorFlow reads this once, when its runtime starts (the first op or
        model load), so this must come before; FailedPrecondition if it is too late."""
        threading = tf.config.threading
        running = TensorFlowThreads.current()
        try:
            # Only what differs: TensorFlow refuses any set once it runs, even of the same value.
            if self.intra_op != running.intra_op:
                threading.set_intra_op_parallelism_threads(self.intra_op)
            if self.inter_op != running.inter_op:
                threading.set_inter_op_parallelism_threads(self.inter_op)
        except RuntimeError as exc:
            raise FailedPrecondition(
                f"cannot size TensorFlow's thread pools to intra_op {self.intra_op}, inter_op "
                f"{self.inter_op}: TensorFlow already runs in this process with intra_op "
                f"{running.intra_op}, inter_op {running.inter_op}"
            ) from exc

    @staticmethod
    def current() -> TensorFlowThreads:
        """What TensorFlow in this process is configured with (0: TensorFlow decides)."""
        return TensorFlowThreads(
            tf.config.threading.get_intra_op_parallelism_threads(),
            tf.config.threading.get_inter_op_parallelism_threads(),
        )


@dataclass
class ServerOptions:
    model_config: object  # ModelServerConfig
    host: str = "0.0.0.0"
    port: int = 8500
    rest_port: int = 8501  # 0 disables REST, as in TF Serving
    model_config_file: Path | None = None
    model_config_file_poll_wait_seconds: float = 0.0
    file_system_poll_wait_seconds: float = 1.0
    batching: BatchingParameters | None = None
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    allow_version_labels_for_unavailable_models: bool = False
    max_num_load_retries: int = 5
    load_retry_interval_seconds: float = 1.0
    grpc_max_message_bytes: int = 256 * 1024 * 1024
    grpc_socket_path: str | None = None  # also serve gRPC on unix:PATH
    grpc_channel_arguments: list[tuple[str, int | str]] = field(default_factory=list)
    signature_method_name_check: bool = False
    max_request_tensor_bytes: int = DEFAULT_MAX_REQUEST_TENSOR_BYTES
    max_request_fill_bytes: int = DEFAULT_MAX_REQUEST_FILL_BYTES
    response_tensor_content: bool = False
    enable_model_warmup: bool = True  # replay assets.extra/tf_serving_warmup_requests
    num_request_iterations_for_warmup: int = 1  # times each warmup record is replayed
    num_load_threads: int = 0  # versions loaded at once; 0: the manager's default
    grpc_health_service: bool = True  # serve grpc.health.v1 (TF Serving: off unless asked)
    rest_cors: bool = False  # TF Serving's CORS headers on every /v1/ answer
    prefer_tflite_model: bool = False  # serve <version>/model.tflite where there is one
    num_tflite_pools: int = 1
    num_tflite_interpreters_per_pool: int = 1
    max_concurrent_requests: int = 1024
    run_lone_batches_at_once: bool = False  # not TF Serving's: see serving/batching.py
    request_threads: int = 4
    tensorflow_threads: TensorFlowThreads = field(default_factory=TensorFlowThreads)
    rest_timeout_seconds: float = 30.0
    rest_body_timeout_seconds: float = 60.0  # a request body must arrive within this
    rest_idle_timeout_seconds: float = 75.0  # a connection without a request head is closed
    shutdown_grace_seconds: float = 10.0
    tls: TlsOptions | None = None


class EmbeddedServer:
    """Start with `await start()`, stop with `await stop()`; `run()` does both around signals."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.metrics = ServingMetrics()
        self.manager = ModelManager(
            options.model_config,
            file_system_poll_wait_seconds=options.file_system_poll_wait_seconds,
            max_num_load_retries=options.max_num_load_retries,
            load_retry_interval_seconds=options.load_retry_interval_seconds,
            **({"num_load_threads": options.num_load_threads} if options.num_load_threads else {}),
            warmup=options.enable_model_warmup,
            warmup_iterations=options.num_request_iterations_for_warmup,
            allow_version_labels_for_unavailable_models=(
                options.allow_version_labels_for_unavailable_models
            ),
            load=version_loader(
                options.prefer_tflite_model,
                options.num_tflite_pools,
                options.num_tflite_interpreters_per_pool,
            ),
        )
        self.service = InferenceService(
            self.manager,
            self.metrics,
            batching=options.batching,
            request_threads=options.request_threads,
            max_concurrent_requests=options.max_concurrent_requests,
            signature_method_name_check=options.signature_method_name_check,
            run_lone_batches_at_once=options.run_lone_batches_at_once,
        )
        self._health = health.aio.HealthServicer()
        self._grpc: grpc.aio.Server | None = None
        self._rest: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self._config_digest = _digest(options.model_config_file)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.options.tensorflow_threads.apply()  # before the first load starts TensorFlow
        if kernels.onednn_requested():
            log.warning(
                "%s asks for TensorFlow's oneDNN kernels: some malformed requests (e.g. a "
                "Conv2D input of the wrong rank) then abort the server process",
                kernels.ONEDNN_ENV,
            )
        # TF Serving opens its ports only after the initial models have loaded (or failed).
        await loop.run_in_executor(None, self.manager.start)
        # Read back once TensorFlow runs: what the models really got.
        threads = TensorFlowThreads.current()
        log.info(
            "TensorFlow thread pools: intra_op_parallelism=%d inter_op_parallelism=%d "
            "(0: TensorFlow decides)",
            threads.intra_op,
            threads.inter_op,
        )
        # TensorFlow leaves a very large heap of long-lived objects; without this, full
        # collections walk it and stall requests for ~200 ms (seen on REST bodies of 0.5 MB).
        gc.freeze()
        await self._start_grpc()
        if self.options.rest_port:
            await self._start_rest()
        await self._update_health()
        self._tasks.append(asyncio.create_task(self._health_loop()))
        if self.options.model_config_file and self.options.model_config_file_poll_wait_seconds > 0:
            self._tasks.append(asyncio.create_task(self._config_poll_loop()))

    async def _start_grpc(self) -> None:
        size = self.options.grpc_max_message_bytes
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
                ("grpc.so_reuseport", 0),
                *self.options.grpc_channel_arguments,  # later entries win
            ],
            maximum_concurrent_rpcs=self.options.max_concurrent_requests,
        )
        predictions = PredictionServicer(
            self.service,
            max_request_tensor_bytes=self.options.max_request_tensor_bytes,
            max_request_fill_bytes=self.options.max_request_fill_bytes,
            tensor_content_responses=self.options.response_tensor_content,
        )
        # Bytes that do not parse answer INTERNAL, as TF Serving's C++ server does.
        registrar = ParseFailuresAsInternal(self._grpc)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(predictions, registrar)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.service), registrar
        )
        if self.options.grpc_health_service:
            health_pb2_grpc.add_HealthServicer_to_server(self._health, registrar)
        address = f"{self.options.host}:{self.options.port}"
        self._listen(address)
        if self.options.grpc_socket_path:
            self._listen(f"unix:{self.options.grpc_socket_path}")
        await self._grpc.start()
        tls = " (TLS)" if self.options.tls else ""
        log.info("Running gRPC ModelServer at %s%s", address, tls)
        if self.options.grpc_socket_path:
            log.info(
                "Running gRPC ModelServer at UNIX socket %s%s", self.options.grpc_socket_path, tls
            )

    def _listen(self, address: str) -> None:
        try:
            if self.options.tls:
                bound = self._grpc.add_secure_port(address, self.options.tls.credentials())
            else:
                bound = self._grpc.add_insecure_port(address)
        except RuntimeError as exc:  # grpc raises when the address cannot be bound
            raise OSError(f"cannot listen for gRPC on {address}: {exc}") from exc
        if bound == 0:
            raise OSError(f"cannot listen for gRPC on {address}")

    async def _start_rest(self) -> None:
        api = RestApi(
            self.service,
            self.metrics,
            self.options.monitoring,
            self.manager.all_models_available,
            timeout_seconds=self.options.rest_timeout_seconds,
            max_body_bytes=self.options.grpc_max_message_bytes,
            body_timeout_seconds=self.options.rest_body_timeout_seconds,
            idle_timeout_seconds=self.options.rest_idle_timeout_seconds,
            cors=self.options.rest_cors,
        )
        self._rest = api.runner(shutdown_timeout=self.options.shutdown_grace_seconds)
        await self._rest.setup()
        site = web.TCPSite(self._rest, self.options.host, self.options.rest_port, reuse_port=False)
        await site.start()
        log.info("Exporting HTTP/REST API at %s:%d", self.options.host, self.options.rest_port)

    async def _update_health(self) -> None:
        """SERVING only while every configured model has an AVAILABLE version; each model is
        also a service name of its own. TF Serving's two names are SERVING while the server
        runs, as TF Serving reports them, so a client's health check written for it passes."""
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for name in TFSERVING_HEALTH_SERVICES:
            await self._health.set(name, serving)
        await self._health.set("", serving if self.manager.all_models_available() else not_serving)
        for name in self.manager.model_names():
            statuses = self.manager.model_status(name)
            available = any(s.state.name == "AVAILABLE" for s in statuses)
            await self._health.set(name, serving if available else not_serving)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                await self._update_health()
            except Exception:
                log.exception("health update failed")

    async def _config_poll_loop(self) -> None:
        path = self.options.model_config_file
        while True:
            await asyncio.sleep(self.options.model_config_file_poll_wait_seconds)
            digest = _digest(path)
            if digest == self._config_digest:
                continue
            self._config_digest = digest
            try:
                config = load_model_config(path)
                log.info("%s changed: reloading the model config", path)
                await self.service.reload_config(config)
            except (ModelConfigError, OSError) as exc:
                log.error("%s: not reloaded, keeping the previous config: %s", path, exc)
            except Exception as exc:  # e.g. a label on an unavailable version
                log.error("%s: reload failed, keeping the previous config: %s", path, exc)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, then unload the models."""
        log.info("shutting down: draining in-flight requests")
        await self._health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        grace = self.options.shutdown_grace_seconds
        waits = []
        if self._grpc is not None:
            waits.append(self._grpc.stop(grace))
        if self._rest is not None:
            waits.append(self._rest.cleanup())
        await asyncio.gather(*waits, return_exceptions=True)
        await self.service.close()
        await asyncio.get_running_loop().run_in_executor(None, self.manager.stop)
        log.info("server stopped")

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then shut down gracefully; returns the exit code."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        starting = asyncio.ensure_future(self.start())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            # A signal while the initial models load (or wait out load retries): TF Serving
            # dies at once; we cancel the loads and stop cleanly.
            log.info("stop requested while the initial models load: cancelling the loads")
            await loop.run_in_executor(None, self.manager.stop)
            await asyncio.wait({starting})
        stopping.cancel()
        try:
            starting.result()
        except BaseException:
            await self.stop()  # release what did start (loaded models, a bound port)
            if stop.is_set():
                return 0
            raise
        rest = self.options.rest_port or "off"
        print(f"convstack serve: ready (gRPC {self.options.port}, REST {rest})", flush=True)
        await stop.wait()
        await self.stop()
        return 0


def _digest(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None
