"""serving.rest_api over a real loopback socket, with a stand-in InferenceService: path
parsing (http_rest_api_util.cc ParseModelInfo), :classify / :regress dispatch
(http_rest_api_handler.cc ProcessClassifyRequest / ProcessRegressRequest), body limits and
connection timeouts, and bounded echoes of request names."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass

import pytest
from tensorflow_serving.apis import classification_pb2, regression_pb2

from convstack.serving.errors import NotFound
from convstack.serving.inference import ModelRef
from convstack.serving.metrics import MonitoringConfig, ServingMetrics
from convstack.serving.rest_api import ECHO_CHARS, RestApi

MODEL = "m"


@dataclass
class _Result:
    result: object
    model_name: str
    version: int
    signature_name: str


class FakeService:
    """Knows one model, MODEL; records what classify / regress were called with."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.recorded: list[tuple] = []

    def record_request(self, name, api, entrypoint, status, seconds) -> None:
        """What RestApi counts itself (requests refused before they reach the service)."""
        self.recorded.append((name, api, entrypoint, status))

    def _check(self, ref: ModelRef) -> None:
        if ref.name != MODEL:
            raise NotFound(f"Servable not found for request: Latest({ref.name})")
        if ref.version is not None and ref.version != 1:
            raise NotFound(f"Servable not found for request: Specific({ref.name}, {ref.version})")

    async def classify(self, ref, signature_name, model_input, *, deadline=None, entrypoint=""):
        self.calls.append(("classify", ref, signature_name, model_input, entrypoint))
        self._check(ref)
        result = classification_pb2.ClassificationResult()
        result.classifications.add().classes.add(label="", score=3.0)
        return _Result(result, ref.name, 1, signature_name)

    async def regress(self, ref, signature_name, model_input, *, deadline=None, entrypoint=""):
        self.calls.append(("regress", ref, signature_name, model_input, entrypoint))
        self._check(ref)
        result = regression_pb2.RegressionResult()
        result.regressions.add(value=0.1)
        return _Result(result, ref.name, 1, signature_name)

    def status(self, ref):
        self._check(ref)
        return []


class LoopbackServer:
    """RestApi.runner() on 127.0.0.1, its event loop in a thread."""

    def __init__(self, service, **options) -> None:
        self.service = service
        self.api = RestApi(service, ServingMetrics(), MonitoringConfig(), lambda: True, **options)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> int:
        from aiohttp import web

        self.runner = self.api.runner(shutdown_timeout=1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return self.runner.addresses[0][1]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)

    def request(self, method: str, path: str, body: bytes | str | None = None):
        """(status, parsed JSON body) of one request on a fresh connection."""
        data = body.encode() if isinstance(body, str) else (body or b"")
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        with self.connect() as conn:
            conn.sendall(head + data)
            reply = read_all(conn)
        return parse_reply(reply)


def read_all(conn: socket.socket, chunks: list[bytes] | None = None) -> bytes:
    """Everything the server sends until it closes; a reset ends the read too (the server may
    close while the client still sends). `chunks` shows what arrived so far to other threads."""
    chunks = [] if chunks is None else chunks
    try:
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def parse_reply(reply: bytes):
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else None


@pytest.fixture
def server():
    running = []

    def start(**options) -> LoopbackServer:
        running.append(LoopbackServer(FakeService(), **options))
        return running[-1]

    yield start
    for each in running:
        each.stop()


# --- versions in paths ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version", ["18446744073709551615", "9223372036854775808", "9" * 30, "9" * 5000]
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_versions_beyond_int64_fail_to_convert(server, version, method):
    """ParseModelInfo: absl::SimpleAtoi into int64 fails -> INVALID_ARGUMENT "Failed to
    convert version: <v> to numeric." (before: 404 for these, 500 for 5000 digits, whose int()
    exceeds Python's digit limit). The echo is cut for the 5000-digit one."""
    suffix = ":regress" if method == "POST" else ""
    status, body = server().request(method, f"/v1/models/{MODEL}/versions/{version}{suffix}", "{}")
    assert status == 400
    shown = version if len(version) <= ECHO_CHARS else version[:ECHO_CHARS]
    assert body["error"].startswith(f"Failed to convert version: {shown}")
    assert body["error"].endswith(" to numeric.")
    assert len(body["error"]) < ECHO_CHARS + 100


def test_int64_max_and_leading_zeros_are_versions(server):
    """9223372036854775807 converts (then is simply not found); 0001 is version 1."""
    running = server()
    status, body = running.request("GET", f"/v1/models/{MODEL}/versions/9223372036854775807")
    assert status == 404 and "9223372036854775807" in body["error"]
    assert running.request("GET", f"/v1/models/{MODEL}/versions/0001")[0] == 200


# --- classify and regress ---------------------------------------------------------------------


def test_classify_parses_examples_and_writes_results(server):
    """ProcessClassifyRequest: FillClassificationRequestFromJson, then Classify, then
    MakeJsonFromClassificationResult (before: a method-name error for every :classify)."""
    running = server()
    body = {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]}
    status, reply = running.request(
        "POST", f"/v1/models/{MODEL}/versions/1:classify", json.dumps(body)
    )
    assert status == 200, reply
    assert reply == {"results": [[["", 3.0]]]}
    verb, ref, signature_name, model_input, entrypoint = running.service.calls[-1]
    assert (verb, ref, signature_name, entrypoint) == (
        "classify",
        ModelRef(MODEL, 1, None),
        "classify_x_to_y",
        "REST",
    )
    assert list(model_input.example_list.examples[0].features.feature["x"].float_list.value) == [
        2.0
    ]


def test_regress_writes_float32_values_as_their_shortest_decimal(server):
    running = server()
    status, reply = running.request(
        "POST", f"/v1/models/{MODEL}/labels/stable:REGRESS", '{"examples": [{"x": 1}]}'
    )
    assert status == 200, reply
    assert reply == {"results": [0.1]}
    assert running.service.calls[-1][1] == ModelRef(MODEL, None, "stable")


@pytest.mark.parametrize("verb", ["classify", "regress"])
def test_unknown_model_is_404_once_the_body_parses(server, verb):
    """The body is parsed before the model is looked up (as in ProcessRegressRequest): a valid
    body for an unknown model is NOT_FOUND (before: a method-name error), a malformed one 400."""
    running = server()
    status, reply = running.request("POST", f"/v1/models/nope:{verb}", '{"examples": [{"x": 1}]}')
    assert status == 404 and reply["error"] == "Servable not found for request: Latest(nope)"
    status, reply = running.request("POST", f"/v1/models/nope:{verb}", '{"examples": []}')
    assert status == 400 and reply["error"].endswith("'examples' value is an empty array")
    # Counted through the service, which bounds the model-name labels, with TF Serving's API name.
    api = {"classify": "Classify", "regress": "Regress"}[verb]
    assert running.service.recorded == [("nope", api, "REST", "INVALID_ARGUMENT")]


def test_giant_model_names_are_cut_in_echoed_errors(server):
    """A 10k-character name in a 404 (whoever wrote the message) and in a malformed path is
    echoed at most ECHO_CHARS long, with an elision marker."""
    running = server()
    name = "n" * 10000
    status, reply = running.request("POST", f"/v1/models/{name}:classify", '{"examples": [{}]}')
    assert status == 404
    assert reply["error"].startswith("Servable not found for request: Latest(" + "n" * ECHO_CHARS)
    assert "more characters>" in reply["error"] and len(reply["error"]) < ECHO_CHARS + 100
    status, reply = running.request("PUT", f"/v1/models/{name}", "")
    assert status == 400 and reply["error"].startswith("Malformed request: PUT /v1/models/nnn")
    assert len(reply["error"]) < ECHO_CHARS + 100


# --- body limits and timeouts -----------------------------------------------------------------


def test_a_body_declared_over_the_limit_is_refused_at_once_and_the_connection_closed(server):
    """Content-Length over the limit with an 18-byte body: 413 with TF Serving's error JSON
    without waiting for the rest, then the connection closes (before: no answer, the connection
    stayed open)."""
    running = server(max_body_bytes=1000, lingering_seconds=0.2)
    with running.connect() as conn:
        conn.sendall(
            b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 1000000000\r\n\r\n" + b'{"instances": [1]}'
        )
        reply = read_all(conn)  # returns only once the server closes the connection
    status, body = parse_reply(reply)
    assert status == 413
    assert body == {
        "error": "Request body too large: 1000000000 bytes declared, the limit is 1000 bytes"
    }


def test_a_chunked_body_over_the_limit_is_413(server):
    running = server(max_body_bytes=1000)
    chunk = b"x" * 2000
    with running.connect() as conn:
        conn.sendall(
            b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n"
        )
        status, body = parse_reply(read_all(conn))
    assert status == 413 and "too large" in body["error"]


def drip(conn: socket.socket, data: bytes, answered: list[bytes] | None = None) -> int:
    """Send one byte per 0.05 s until the server closes or starts answering (`answered` gets
    chunks); how many bytes went out. Stopping at the answer keeps the unread rest of the body
    from making the server's close a reset that could destroy the answer in flight."""
    for sent, byte in enumerate(data):
        if answered:
            return sent
        try:
            conn.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return sent
        time.sleep(0.05)
    return len(data)


@pytest.mark.timeout(120)
def test_a_dripped_request_head_is_closed(server):
    """No complete request head within idle_timeout_seconds: the connection is closed (before:
    never). The head here would take minutes to send at this pace."""
    running = server(idle_timeout_seconds=0.5)
    head = b"GET /v1/models/m HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 4000 + b"\r\n\r\n"
    with running.connect() as conn:
        closed = {}
        reader = threading.Thread(target=lambda: closed.setdefault("data", read_all(conn)))
        reader.start()
        sent = drip(conn, head)
        reader.join(30)
    assert closed["data"] == b""  # closed without an answer
    assert sent < len(head)


@pytest.mark.timeout(120)
def test_a_dripped_body_is_answered_408_and_closed(server):
    """The body must arrive within body_timeout_seconds once the head has."""
    running = server(body_timeout_seconds=0.5, lingering_seconds=0.2)
    body = b'{"examples": [{"x": "' + b"a" * 4000 + b'"}]}'
    head = (
        f"POST /v1/models/m:regress HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with running.connect() as conn:
        conn.sendall(head)
        received, chunks = {}, []
        reader = threading.Thread(
            target=lambda: received.setdefault("data", read_all(conn, chunks))
        )
        reader.start()
        sent = drip(conn, body, chunks)
        reader.join(30)
    status, reply = parse_reply(received["data"])
    assert status == 408
    assert reply == {"error": "Request body not received within 0.5 seconds"}
    assert sent < len(body)
