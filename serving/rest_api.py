"""TensorFlow Serving's REST API on aiohttp: predict (row and columnar JSON), model status and
metadata, TF Serving's error JSON and status codes, Prometheus metrics, and readiness/liveness
endpoints (which TF Serving lacks)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from urllib.parse import unquote

from aiohttp import web

from convstack.serving import rest_json
from convstack.serving.errors import InvalidArgument, ServingError
from convstack.serving.inference import InferenceService, ModelRef
from convstack.serving.metrics import MonitoringConfig, ServingMetrics

log = logging.getLogger(__name__)

# TF Serving's own patterns (http_rest_api_util.cc), matched against the raw path.
PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE,
)
STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE,
)


def error_response(error: ServingError) -> web.Response:
    return web.json_response({"error": error.message}, status=error.http_status)


def parse_ref(name: str, version: str | None, label: str | None) -> ModelRef:
    return ModelRef(
        unquote(name) if name else "",
        int(version) if version else None,
        unquote(label) if label else None,
    )


class RestApi:
    """The aiohttp application. `ready()` says whether every model has an AVAILABLE version."""

    def __init__(
        self,
        service: InferenceService,
        metrics: ServingMetrics,
        monitoring: MonitoringConfig,
        ready: Callable[[], bool],
        *,
        timeout_seconds: float = 30.0,
        max_body_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self._service = service
        self._metrics = metrics
        self._monitoring = monitoring
        self._ready = ready
        self._timeout = timeout_seconds
        self._max_body_bytes = max_body_bytes

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes)
        if self._monitoring.enable:
            app.router.add_get(self._monitoring.path, self._prometheus)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/livez", self._livez)
        app.router.add_route("*", "/v1/{tail:.*}", self._v1)
        return app

    async def _v1(self, request: web.Request) -> web.Response:
        path = request.url.raw_path
        try:
            if request.method == "POST" and (match := PREDICT_PATH.fullmatch(path)):
                return await self._post(request, match)
            if request.method == "GET" and (match := STATUS_PATH.fullmatch(path)):
                return self._get(match)
            raise InvalidArgument(f"Malformed request: {request.method} {path}")
        except ServingError as error:
            return error_response(error)
        except web.HTTPRequestEntityTooLarge as exc:
            return web.json_response({"error": f"Request body too large: {exc.text}"}, status=413)
        except Exception as exc:  # a request never takes the server down
            log.exception("REST %s %s failed", request.method, path)
            return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=500)

    async def _post(self, request: web.Request, match: re.Match) -> web.Response:
        name, version, label, verb = match.groups()
        ref = parse_ref(name, version, label)
        body = await request.read()
        if verb.lower() != "predict":
            raise InvalidArgument(
                f"Expected {'classification' if verb.lower() == 'classify' else 'regression'}"
                " signature method_name to be "
                f"tensorflow/serving/{verb.lower()}. Was: tensorflow/serving/predict"
            )
        started = time.perf_counter()
        try:
            signature_name, inputs, fmt = self._decode(body, ref)
        except ServingError as error:  # counted like TF Serving counts every request's status
            elapsed = time.perf_counter() - started
            self._metrics.record_request(ref.name, "predict", "REST", error.code, elapsed)
            raise
        result = await self._service.predict(
            ref,
            signature_name,
            inputs,
            deadline=time.monotonic() + self._timeout,
            entrypoint="REST",
        )
        return web.json_response(rest_json.format_predict_response(result.outputs, fmt))

    def _decode(self, body: bytes, ref: ModelRef):
        """Parse the body once; the codec asks for the signature's inputs by name."""

        def signature_inputs(signature_name: str):
            if self._service.signature_method(ref, signature_name) is None:
                raise InvalidArgument(
                    f'Serving signature name: "{signature_name or "serving_default"}" '
                    "not found in signature def"
                )
            specs = self._service.signature_inputs(ref, signature_name)
            return {key: (info.dtype, info.shape) for key, info in specs.items()}

        return rest_json.parse_predict_body(body, signature_inputs)

    def _get(self, match: re.Match) -> web.Response:
        name, version, label, subresource = match.groups()
        if version and label:
            raise InvalidArgument(
                f"Both model version ({version}) and model version label ({label}) cannot be "
                "supplied."
            )
        if not name:
            raise InvalidArgument("Missing model name in request.")
        ref = parse_ref(name, version, label)
        if subresource:
            resolved, signature_def_map = self._service.metadata(ref)
            return web.json_response(
                rest_json.format_metadata(ref.name, resolved, signature_def_map)
            )
        statuses = self._service.status(ref)
        return web.json_response(
            rest_json.format_status(
                [(s.version, s.state.name, s.error_code, s.error_message) for s in statuses]
            )
        )

    async def _prometheus(self, request: web.Request) -> web.Response:
        body, content_type = self._metrics.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def _livez(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})
