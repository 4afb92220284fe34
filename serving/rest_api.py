"""TensorFlow Serving's REST API on aiohttp: predict (row and columnar JSON), classify and
regress (tf.Example JSON), model status and metadata, TF Serving's error JSON and status codes,
Prometheus metrics, and readiness/liveness endpoints (which TF Serving lacks).

Connections are bounded: a declared body over the limit is refused at once (413), a body that
does not arrive within `body_timeout_seconds` is answered 408, and a connection on which no
complete request head arrives within `idle_timeout_seconds` (of opening, or of the previous
response) is closed; see `RestApi.runner`."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from urllib.parse import unquote

from aiohttp import web

from convstack.serving import rest_examples, rest_json
from convstack.serving.errors import InvalidArgument, ServingError
from convstack.serving.inference import (
    CLASSIFY_API,
    PREDICT_API,
    REGRESS_API,
    InferenceService,
    ModelRef,
)
from convstack.serving.metrics import MonitoringConfig, ServingMetrics

log = logging.getLogger(__name__)

# TF Serving's own patterns (http_rest_api_util.cc), matched against the raw path.
PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE,
)
# TF Serving's REST handler takes every path under /v1/, the prefix in any case.
V1_PATH = re.compile(r"/v1/.*", re.IGNORECASE | re.DOTALL)
# What --rest_api_enable_cors_support adds to every answer of that handler, as TF Serving does.
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, GET",
    "Access-Control-Allow-Headers": "Content-Type",
}
# A CORS preflight (OPTIONS) is answered 200 when its Origin names an http(s) origin, else 400.
PREFLIGHT_ORIGIN = re.compile(r"https?://")
STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE,
)


_INT64_MAX = 2**63 - 1
# Names and paths echoed into messages are cut to this many characters.
ECHO_CHARS = 256
# A whole REST error message is cut to this many characters (messages from elsewhere included).
MAX_ERROR_CHARS = 4096


def truncate_for_message(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` if it has at most `limit` characters, else its head and an elision marker."""
    if len(text) <= limit:
        return text
    marker = f"...<{len(text) - limit} more characters>"
    return text[:limit] + marker


def error_json(message: str, status: int) -> web.Response:
    """TF Serving's error body, {"error": "<message>"}."""
    return web.json_response(
        {"error": truncate_for_message(message, MAX_ERROR_CHARS)}, status=status
    )


def error_response(error: ServingError) -> web.Response:
    return error_json(error.message, error.http_status)


def _preflight(request: web.Request) -> web.Response:
    """A CORS preflight, answered as TF Serving answers it: no body, 200 only when the Origin
    header names an http(s) origin."""
    origin = request.headers.get("Origin", "")
    return web.Response(status=200 if PREFLIGHT_ORIGIN.search(origin) else 400)


def _shorten_echoes(message: str, match: re.Match | None) -> str:
    """Long path parts (model name, label) echoed in a message, whoever wrote it, cut short."""
    if match is None:
        return message
    for part in match.groups()[:3]:
        if part and len(part) > ECHO_CHARS:
            for echo in {part, unquote(part)}:
                message = message.replace(echo, truncate_for_message(echo))
    return message


def parse_version(version: str) -> int:
    """A path's version as TF Serving's absl::SimpleAtoi into int64 takes it."""
    digits = version.lstrip("0") or "0"
    if len(digits) > 19 or int(digits) > _INT64_MAX:
        raise InvalidArgument(
            f"Failed to convert version: {truncate_for_message(version)} to numeric."
        )
    return int(digits)


def parse_ref(name: str, version: str | None, label: str | None) -> ModelRef:
    return ModelRef(
        unquote(name) if name else "",
        parse_version(version) if version else None,
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
        body_timeout_seconds: float = 60.0,
        idle_timeout_seconds: float = 75.0,
        lingering_seconds: float = 5.0,
        max_request_line_bytes: int = 64 * 1024,
        cors: bool = False,
    ) -> None:
        """`timeout_seconds`: a request's deadline once read (TF Serving's
        --rest_api_timeout_in_ms); `max_body_bytes`: the largest body; `body_timeout_seconds`:
        how long a body may take to arrive once its headers have; `idle_timeout_seconds`: how
        long a connection may stay without a complete request head, from its opening or its
        previous response; `lingering_seconds`: how long the unread rest of a refused body is
        drained (so that the client sees the answer) before the connection closes;
        `max_request_line_bytes`: the longest request line (aiohttp's own default, 8190, answers
        a longer path with a plain-text 400 before this API sees it); `cors`: add TF Serving's
        CORS headers to every /v1/ answer (--rest_api_enable_cors_support)."""
        self._service = service
        self._metrics = metrics
        self._monitoring = monitoring
        self._ready = ready
        self._timeout = timeout_seconds
        self._max_body_bytes = max_body_bytes
        self._body_timeout = body_timeout_seconds
        self._idle_timeout = idle_timeout_seconds
        self._lingering = lingering_seconds
        self._max_line = max_request_line_bytes
        self._cors = cors

    def runner(self, *, shutdown_timeout: float = 10.0) -> web.AppRunner:
        """The application in an AppRunner with this API's connection timeouts."""
        return web.AppRunner(
            self.application(),
            access_log=None,
            shutdown_timeout=shutdown_timeout,
            keepalive_timeout=self._idle_timeout,  # aiohttp also times the first head with it
            lingering_time=self._lingering,
            max_line_size=self._max_line,
        )

    def application(self) -> web.Application:
        middlewares = [self._cors_headers] if self._cors else []
        app = web.Application(
            client_max_size=self._max_body_bytes,
            middlewares=[*middlewares, self._declared_size],
        )
        if self._monitoring.enable:
            app.router.add_get(self._monitoring.path, self._prometheus)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/livez", self._livez)
        app.router.add_route("*", "/{v1:[vV]1}/{tail:.*}", self._v1)
        return app

    @web.middleware
    async def _cors_headers(self, request: web.Request, handler):
        response = await handler(request)
        if V1_PATH.fullmatch(request.path):
            response.headers.update(CORS_HEADERS)
        return response

    @web.middleware
    async def _declared_size(self, request: web.Request, handler):
        """Refuse a body declared over the limit before reading any of it."""
        declared = request.content_length
        if declared is not None and declared > self._max_body_bytes:
            response = error_json(
                f"Request body too large: {declared} bytes declared, the limit is "
                f"{self._max_body_bytes} bytes",
                413,
            )
            response.force_close()
            return response
        return await handler(request)

    async def _v1(self, request: web.Request) -> web.Response:
        path = request.url.raw_path
        match = None
        if request.method == "OPTIONS":
            return _preflight(request)
        try:
            if request.method == "POST" and (match := PREDICT_PATH.fullmatch(path)):
                return await self._post(request, match)
            if request.method == "GET" and (match := STATUS_PATH.fullmatch(path)):
                return self._get(match)
            raise InvalidArgument(
                f"Malformed request: {request.method} {truncate_for_message(path)}"
            )
        except ServingError as error:
            return error_json(_shorten_echoes(error.message, match), error.http_status)
        except web.HTTPRequestEntityTooLarge as exc:
            response = error_json(f"Request body too large: {exc.text}", 413)
            response.force_close()
            return response
        except _BodyTimeout:
            response = error_json(
                f"Request body not received within {self._body_timeout:g} seconds", 408
            )
            response.force_close()
            return response
        except Exception as exc:  # a request never takes the server down
            log.exception("REST %s %s failed", request.method, truncate_for_message(path))
            return error_json(f"{type(exc).__name__}: {exc}", 500)

    async def _read_body(self, request: web.Request) -> bytes:
        try:
            async with asyncio.timeout(self._body_timeout):
                return await request.read()
        except TimeoutError:
            raise _BodyTimeout from None

    async def _post(self, request: web.Request, match: re.Match) -> web.Response:
        name, version, label, verb = match.groups()
        ref = parse_ref(name, version, label)
        body = await self._read_body(request)
        verb = verb.lower()
        if verb != "predict":
            return await self._examples(ref, verb, body)
        started = time.perf_counter()
        try:
            signature_name, inputs, fmt = self._decode(body, ref)
        except ServingError as error:  # counted like TF Serving counts every request's status
            elapsed = time.perf_counter() - started
            self._service.record_request(ref.name, PREDICT_API, "REST", error.code, elapsed)
            raise
        result = await self._service.predict(
            ref,
            signature_name,
            inputs,
            deadline=time.monotonic() + self._timeout,
            entrypoint="REST",
        )
        return web.json_response(rest_json.format_predict_response(result.outputs, fmt))

    async def _examples(self, ref: ModelRef, verb: str, body: bytes) -> web.Response:
        """:classify / :regress. As TF Serving, the body is parsed before the model is looked
        up: a malformed body is 400 even for an unknown model, a valid one 404."""
        started = time.perf_counter()
        try:
            signature_name, model_input = rest_examples.parse_examples_body(body)
        except ServingError as error:
            elapsed = time.perf_counter() - started
            api = CLASSIFY_API if verb == "classify" else REGRESS_API
            self._service.record_request(ref.name, api, "REST", error.code, elapsed)
            raise
        if verb == "classify":
            run, write = self._service.classify, rest_examples.format_classification_result
        else:
            run, write = self._service.regress, rest_examples.format_regression_result
        result = await run(
            ref,
            signature_name,
            model_input,
            deadline=time.monotonic() + self._timeout,
            entrypoint="REST",
        )
        return web.json_response(write(result.result))

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
                f"Both model version ({truncate_for_message(version)}) and model version label "
                f"({truncate_for_message(label)}) cannot be supplied."
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


class _BodyTimeout(Exception):
    """The request body did not arrive within the body timeout."""
