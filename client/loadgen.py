"""A load generator for TF Serving's Predict, over gRPC or REST, in the spirit of perf_analyzer.

Two ways to load a server:

* closed loop (`concurrency=N`): N workers, each sending its next request when the previous one
  answered, so the server's speed sets the pace;
* open loop (`rate=R` requests/s): requests leave on a schedule drawn in advance (Poisson
  arrivals by default, or a constant interval), whatever the server does. A slow server does not
  slow the schedule down: a request the event loop could only send late goes out at once and is
  counted in `late`, and its latency is measured from the time it was *due* (no coordinated
  omission). In-flight requests are bounded: beyond `max_outstanding` a due request is not sent
  and is counted as a `CLIENT_OVERLOAD` error.

Besides TF Serving's gRPC Predict and REST `:predict` (columnar `inputs` by default, or the row
format `instances` with `rest_format="row"`), it speaks the v2 inference protocol's gRPC
ModelInfer (`protocol="grpc-v2"`, as KServe and Triton serve it; inputs as raw contents), so one
generator can drive a peer server with the same shapes.

Each request is encoded once, before the clock starts (the serialized PredictRequest for gRPC,
the JSON body for REST), so the measurement holds the transport and the server, not numpy
conversion. Responses are parsed as a client would (protobuf or JSON), not converted to numpy.
Errors never raise: they are counted by gRPC status code name ("NOT_FOUND") or HTTP status
("HTTP_404").
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import grpc
import numpy as np

from convstack.client._protos import predict_pb2
from convstack.client.tensors import to_tensor_proto

__all__ = [
    "CLIENT_OVERLOAD",
    "LoadResult",
    "LoadSpec",
    "arrival_offsets",
    "latency_summary",
    "model_infer_request_bytes",
    "outstanding_limit",
    "predict_request_bytes",
    "rest_predict_body",
    "rest_predict_url",
    "run_load",
    "run_load_sync",
]

PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"
MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
PROTOCOLS = ("grpc", "rest", "grpc-v2")
REST_FORMATS = ("columnar", "row")
# numpy dtype -> the v2 protocol's datatype names.
V2_DATATYPES = {
    "float32": "FP32",
    "float64": "FP64",
    "float16": "FP16",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "bool": "BOOL",
}
DEFAULT_DURATION = 10.0
# A request sent this long after its scheduled time counts as late (asyncio's timers are only
# precise to about a millisecond, so smaller lags are the event loop, not an overloaded client).
LATE_AFTER_SECONDS = 0.005
TIMER_SLACK_SECONDS = 0.001
# Without a latency estimate from warmup, the open loop allows one second's worth of requests in
# flight; with one, ten times what Little's law expects (rate x latency).
OVERLOAD_FACTOR = 10
MIN_OUTSTANDING = 16
CLIENT_OVERLOAD = "CLIENT_OVERLOAD"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# One request: None when it succeeded, else the name of its error.
Sender = Callable[[], Awaitable[str | None]]


@dataclass(frozen=True)
class LoadSpec:
    """What to send, where, and how hard.

    `concurrency` (closed loop) and `rate` (open loop) exclude each other; giving neither means
    concurrency 1. `duration` (seconds) and `count` (requests) exclude each other; giving neither
    means 10 s. After construction exactly one of each pair is set.
    """

    target: str  # "host:port" (gRPC) or "http://host:port" (REST)
    protocol: Literal["grpc", "rest", "grpc-v2"]
    model_name: str
    inputs: dict[str, np.ndarray]  # one request's inputs, batch dimension included
    signature_name: str = "serving_default"
    version: int | None = None
    version_label: str | None = None
    concurrency: int | None = None
    rate: float | None = None
    arrival: Literal["poisson", "constant"] = "poisson"  # open loop inter-arrival times
    duration: float | None = None
    count: int | None = None
    warmup_requests: int = 5
    timeout: float = 30.0  # seconds per request
    max_outstanding: int | None = None  # open loop cap; None: derived from rate and warmup
    seed: int = 0  # of the Poisson schedule
    rest_format: Literal["columnar", "row"] = "columnar"  # REST body: "inputs" or "instances"

    def __post_init__(self) -> None:
        if self.concurrency is None and self.rate is None:
            object.__setattr__(self, "concurrency", 1)
        if self.duration is None and self.count is None:
            object.__setattr__(self, "duration", DEFAULT_DURATION)
        problem = _spec_problem(self)
        if problem:
            raise ValueError(f"LoadSpec: {problem}")

    @property
    def open_loop(self) -> bool:
        """True when requests follow a rate rather than a number of workers."""
        return self.rate is not None


def _spec_problem(spec: LoadSpec) -> str | None:
    checks = [
        (
            spec.protocol in PROTOCOLS,
            f"protocol is one of {', '.join(PROTOCOLS)}, not {spec.protocol!r}",
        ),
        (
            spec.rest_format in REST_FORMATS,
            f"rest_format is columnar or row, not {spec.rest_format!r}",
        ),
        (
            spec.protocol != "rest" or spec.target.startswith(("http://", "https://")),
            f"a REST target starts with http:// or https://, got {spec.target!r}",
        ),
        (
            spec.protocol == "rest" or not spec.target.startswith(("http://", "https://")),
            f"a gRPC target is host:port (or a gRPC URI such as dns:///), got {spec.target!r}",
        ),
        (bool(spec.model_name), "model_name is empty"),
        (bool(spec.inputs), "inputs is empty"),
        (spec.version is None or spec.version_label is None, "give version or version_label"),
        (spec.concurrency is None or spec.rate is None, "give concurrency or rate, not both"),
        (spec.duration is None or spec.count is None, "give duration or count, not both"),
        (spec.concurrency is None or spec.concurrency >= 1, "concurrency must be >= 1"),
        (spec.rate is None or spec.rate > 0, "rate must be > 0"),
        (spec.arrival in ("poisson", "constant"), f"unknown arrival {spec.arrival!r}"),
        (spec.duration is None or spec.duration > 0, "duration must be > 0"),
        (spec.count is None or spec.count >= 1, "count must be >= 1"),
        (spec.warmup_requests >= 0, "warmup_requests must be >= 0"),
        (spec.timeout > 0, "timeout must be > 0"),
        (spec.max_outstanding is None or spec.max_outstanding >= 1, "max_outstanding >= 1"),
    ]
    return next((message for ok, message in checks if not ok), None)


@dataclass
class LoadResult:
    """What a load run measured. `requests` = `ok` + the sum of `errors`; `throughput` is OK
    requests per second of the measured phase; `latency_ms` (p50, p90, p99, max, mean) covers
    OK requests only and is NaN when none succeeded; `late` counts open-loop requests sent more
    than LATE_AFTER_SECONDS behind schedule."""

    requests: int
    ok: int
    errors: dict[str, int]
    seconds: float
    throughput: float
    latency_ms: dict[str, float]
    late: int = 0

    def to_json(self) -> dict:
        """A JSON-ready dict (NaN latencies become null)."""
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": dict(sorted(self.errors.items())),
            "seconds": self.seconds,
            "throughput": self.throughput,
            "latency_ms": {k: None if math.isnan(v) else v for k, v in self.latency_ms.items()},
            "late": self.late,
        }


@dataclass
class _Tally:
    latencies: list[float] = field(default_factory=list)  # seconds, OK requests only
    errors: Counter = field(default_factory=Counter)
    late: int = 0

    def record(self, error: str | None, seconds: float) -> None:
        if error is None:
            self.latencies.append(seconds)
        else:
            self.errors[error] += 1

    def result(self, seconds: float) -> LoadResult:
        ok = len(self.latencies)
        return LoadResult(
            requests=ok + sum(self.errors.values()),
            ok=ok,
            errors=dict(self.errors),
            seconds=seconds,
            throughput=ok / seconds if seconds > 0 else 0.0,
            latency_ms=latency_summary(self.latencies),
            late=self.late,
        )


def latency_summary(seconds: list[float]) -> dict[str, float]:
    """p50, p90, p99, max and mean in milliseconds (NaN for an empty list)."""
    if not seconds:
        return dict.fromkeys(("p50", "p90", "p99", "max", "mean"), math.nan)
    ms = np.asarray(seconds) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(ms.max()),
        "mean": float(ms.mean()),
    }


# --- requests, built once ---------------------------------------------------------------------


def predict_request_bytes(spec: LoadSpec) -> bytes:
    """The serialized PredictRequest every gRPC call of the run sends."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = spec.model_name
    request.model_spec.signature_name = spec.signature_name
    if spec.version is not None:
        request.model_spec.version.value = spec.version
    if spec.version_label is not None:
        request.model_spec.version_label = spec.version_label
    for name, value in spec.inputs.items():
        request.inputs[name].CopyFrom(to_tensor_proto(value))
    return request.SerializeToString()


def _json_strings(value):
    """bytes -> {"b64": ...} (TF Serving's binary convention), str as is, lists recursively."""
    if isinstance(value, list):
        return [_json_strings(item) for item in value]
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    return value


def _json_values(array: np.ndarray) -> list:
    values = array.tolist()
    return _json_strings(values) if array.dtype.kind in "OSU" else values


def rest_predict_body(spec: LoadSpec) -> bytes:
    """The JSON body of every REST call: columnar ({"signature_name", "inputs": {name: values}})
    or, with `rest_format="row"`, TF Serving's row format ({"signature_name", "instances": [...]}:
    one value per row for a single input, else one {name: value} object per row)."""
    arrays = {name: np.asarray(value) for name, value in spec.inputs.items()}
    if spec.rest_format == "row":
        if len(arrays) == 1:
            instances = _json_values(next(iter(arrays.values())))
        else:
            columns = {name: _json_values(array) for name, array in arrays.items()}
            rows = len(next(iter(columns.values())))
            instances = [{name: column[i] for name, column in columns.items()} for i in range(rows)]
        body = {"signature_name": spec.signature_name, "instances": instances}
    else:
        inputs = {name: _json_values(array) for name, array in arrays.items()}
        body = {"signature_name": spec.signature_name, "inputs": inputs}
    return json.dumps(body, separators=(",", ":")).encode()


def model_infer_request_bytes(spec: LoadSpec) -> bytes:
    """The serialized v2 ModelInferRequest (inputs as raw little-endian contents) of every
    grpc-v2 call; a version label has no v2 equivalent and is refused."""
    from convstack.client.wire import inference_v2_pb2

    if spec.version_label is not None:
        raise ValueError("LoadSpec: the v2 protocol has no version labels")
    request = inference_v2_pb2.ModelInferRequest(model_name=spec.model_name)
    if spec.version is not None:
        request.model_version = str(spec.version)
    for name, value in spec.inputs.items():
        array = np.ascontiguousarray(value)
        datatype = V2_DATATYPES.get(array.dtype.name)
        if datatype is None:
            raise ValueError(f"LoadSpec: input {name!r} is {array.dtype}, not a v2 numeric type")
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    return request.SerializeToString()


def rest_model_url(
    target: str, model_name: str, version: int | None = None, label: str | None = None
) -> str:
    """TF Serving's REST address of a model: `<target>/v1/models/<name>`, then
    `/versions/<v>` or `/labels/<l>` when given (a version wins over a label)."""
    url = f"{target.rstrip('/')}/v1/models/{model_name}"
    if version is not None:
        return f"{url}/versions/{version}"
    if label is not None:
        return f"{url}/labels/{label}"
    return url


def rest_predict_url(spec: LoadSpec) -> str:
    """`<target>/v1/models/<name>[/versions/<v>|/labels/<l>]:predict`."""
    return rest_model_url(spec.target, spec.model_name, spec.version, spec.version_label) + (
        ":predict"
    )


# --- transports -------------------------------------------------------------------------------


class _GrpcTransport:
    """One grpc.aio channel (HTTP/2 multiplexes every concurrent call over it); TF Serving's
    Predict or, for grpc-v2, the v2 protocol's ModelInfer."""

    def __init__(self, spec: LoadSpec):
        self._spec = spec
        if spec.protocol == "grpc-v2":
            from convstack.client.wire import inference_v2_pb2

            self._method = MODEL_INFER_METHOD
            self._request = model_infer_request_bytes(spec)
            self._parse = inference_v2_pb2.ModelInferResponse.FromString
        else:
            self._method = PREDICT_METHOD
            self._request = predict_request_bytes(spec)
            self._parse = predict_pb2.PredictResponse.FromString
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> Sender:
        self._channel = grpc.aio.insecure_channel(
            self._spec.target,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        # No request serializer: the request was serialized once, up front.
        predict = self._channel.unary_unary(
            self._method, request_serializer=None, response_deserializer=self._parse
        )
        request, timeout = self._request, self._spec.timeout

        async def send() -> str | None:
            try:
                await predict(request, timeout=timeout)
            except grpc.aio.AioRpcError as error:
                return error.code().name
            return None

        return send

    async def __aexit__(self, *exc_info) -> None:
        await self._channel.close()


class _RestTransport:
    """One aiohttp session; its connection pool is sized to the requests allowed in flight."""

    def __init__(self, spec: LoadSpec, connections: int):
        self._spec = spec
        self._connections = connections
        self._url = rest_predict_url(spec)
        self._body = rest_predict_body(spec)
        self._session = None

    async def __aenter__(self) -> Sender:
        import aiohttp  # only REST runs pay for importing it

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._connections),
            timeout=aiohttp.ClientTimeout(total=self._spec.timeout),
            headers={"Content-Type": "application/json"},
        )
        session, url, body = self._session, self._url, self._body

        async def send() -> str | None:
            try:
                async with session.post(url, data=body) as response:
                    payload = await response.read()
                    if response.status != 200:
                        return f"HTTP_{response.status}"
            except TimeoutError:
                return "DEADLINE_EXCEEDED"
            except aiohttp.ClientError:
                return "CONNECTION_ERROR"
            try:
                json.loads(payload)  # what any client does with the answer
            except ValueError:
                return "BAD_RESPONSE"
            return None

        return send

    async def __aexit__(self, *exc_info) -> None:
        await self._session.close()


def _transport(spec: LoadSpec, in_flight: int):
    if spec.protocol in ("grpc", "grpc-v2"):
        return _GrpcTransport(spec)
    return _RestTransport(spec, in_flight)


# --- loops ------------------------------------------------------------------------------------


async def _timed(send: Sender) -> tuple[str | None, float]:
    started = time.perf_counter()
    error = await send()
    return error, time.perf_counter() - started


async def _warm_up(send: Sender, requests: int) -> list[float]:
    """Send `requests` one after the other (connections, server caches); OK latencies."""
    latencies = []
    for _ in range(requests):
        error, seconds = await _timed(send)
        if error is None:
            latencies.append(seconds)
    return latencies


async def _closed_loop(spec: LoadSpec, send: Sender, tally: _Tally) -> None:
    issued = 0
    end = None if spec.duration is None else time.perf_counter() + spec.duration

    def another() -> bool:
        nonlocal issued
        if spec.count is not None:
            issued += 1
            return issued <= spec.count
        return time.perf_counter() < end

    async def worker() -> None:
        while another():
            tally.record(*await _timed(send))

    await asyncio.gather(*(worker() for _ in range(spec.concurrency)))


def arrival_offsets(spec: LoadSpec) -> np.ndarray:
    """Send times of the open loop in seconds from its start: the first at 0, `count` of them
    or all those before `duration`."""
    if spec.arrival == "constant":
        total = spec.count or math.ceil(spec.rate * spec.duration)
        offsets = np.arange(total) / spec.rate  # not a cumulative sum: no rounding drift
        return offsets if spec.count else offsets[offsets < spec.duration]
    rng = np.random.default_rng(spec.seed)
    if spec.count is not None:
        return np.concatenate([[0.0], np.cumsum(rng.exponential(1 / spec.rate, spec.count - 1))])
    chunk = max(16, math.ceil(spec.rate * spec.duration))
    offsets = np.zeros(1)
    while offsets[-1] < spec.duration:
        offsets = np.concatenate(
            [offsets, offsets[-1] + np.cumsum(rng.exponential(1 / spec.rate, chunk))]
        )
    return offsets[offsets < spec.duration]


def outstanding_limit(spec: LoadSpec, warmup_latencies: list[float]) -> int:
    """How many open-loop requests may be in flight before due ones are dropped."""
    if spec.max_outstanding is not None:
        return spec.max_outstanding
    expected_seconds = float(np.median(warmup_latencies)) if warmup_latencies else 0.1
    expected = spec.rate * expected_seconds
    return max(MIN_OUTSTANDING, math.ceil(OVERLOAD_FACTOR * expected))


async def _open_loop(spec: LoadSpec, send: Sender, tally: _Tally, limit: int) -> None:
    in_flight: set[asyncio.Task] = set()

    async def one(due: float) -> None:
        # Timed from when it was due (a client falling behind shows in the latency), or from
        # when it left if the timer woke up early.
        started = max(due, time.perf_counter())
        error = await send()
        tally.record(error, time.perf_counter() - started)

    start = time.perf_counter()
    for offset in arrival_offsets(spec):
        due = start + offset
        wait = due - time.perf_counter()
        if wait > TIMER_SLACK_SECONDS:
            # asyncio's timers wake up to a millisecond late; aim that much early.
            await asyncio.sleep(wait - TIMER_SLACK_SECONDS)
        else:
            if -wait > LATE_AFTER_SECONDS:
                tally.late += 1
            await asyncio.sleep(0)  # catching up: still let answers in between sends
        if len(in_flight) >= limit:
            tally.record(CLIENT_OVERLOAD, 0.0)
            continue
        task = asyncio.create_task(one(due))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)


async def run_load(spec: LoadSpec) -> LoadResult:
    """Warm up, then load the server as `spec` says and measure; errors are counted, not raised.

    The measured phase starts after `warmup_requests` sequential requests (not counted) and ends
    when the last request sent has answered.
    """
    tally = _Tally()
    in_flight_hint = spec.concurrency if not spec.open_loop else spec.max_outstanding or 0
    async with _transport(spec, in_flight_hint) as send:
        warmup = await _warm_up(send, spec.warmup_requests)
        started = time.perf_counter()
        if spec.open_loop:
            await _open_loop(spec, send, tally, outstanding_limit(spec, warmup))
        else:
            await _closed_loop(spec, send, tally)
        seconds = time.perf_counter() - started
    return tally.result(seconds)


def run_load_sync(spec: LoadSpec) -> LoadResult:
    """`run_load` on a fresh event loop (not from inside a running one)."""
    return asyncio.run(run_load(spec))
