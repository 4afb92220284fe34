"""Hostile REST traffic: random JSON bodies (deep nesting, huge numbers, NaN, b64 junk), bytes
that are not UTF-8, random paths and methods, and broken HTTP framing (huge or junk headers,
Content-Length longer or shorter than the body, bad chunked encoding), each on a socket of its
own. A client error is never a 5xx (TF Serving maps client errors to 400/404, http_rest_api_
handler.cc); a body that never arrives is a 408 and a framing the server cannot read is a 4xx
or a closed connection, never a hang."""

from __future__ import annotations

import base64
import json
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.serving.adversarial.conftest import (
    CALL_TIMEOUT,
    Budget,
    assert_bounded_growth,
    attack_settings,
)
from tests.serving.conformance.conftest import MODEL

pytestmark = pytest.mark.slow

CLOSED = "CLOSED"  # the server closed the connection without an answer
# Codes for a request whose body or path is junk: never a 5xx.
CLIENT_ERRORS = frozenset({200, 400, 404, 405, 408, 413, 414, 431, 501})
FRAMING = CLIENT_ERRORS | {CLOSED}
JSON_KEYS = ["instances", "inputs", "signature_name", "b64", "examples", "context", "images"]
# Weighted towards the model's predict endpoint, so that most bodies reach its decoder.
VERBS = [":predict", ":predict", ":predict", ":classify", ":regress", "/metadata", "", ":bogus"]

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.sampled_from(JSON_KEYS), st.text(max_size=8)), children),
    ),
    max_leaves=30,
)


@st.composite
def json_bodies(draw) -> bytes:
    """A predict/classify/regress body: mostly shaped like one, with anything inside."""
    shapes = ["instances", "inputs", "examples", "signature", "bare", "image", "image_bytes"]
    shape = draw(st.sampled_from(shapes))
    value = draw(json_values)
    if shape == "image":  # one image of the right shape, every pixel the same random value
        body = {"instances": [[[[value]] * 28] * 28]}
    elif shape == "image_bytes":
        encoded = draw(st.one_of(st.binary(max_size=200).map(base64.b64encode), st.binary()))
        body = {
            "signature_name": "predict_image_bytes",
            "instances": [{"b64": encoded.decode("latin-1")}],
        }
    elif shape == "bare":
        body = value
    elif shape == "signature":
        body = {"signature_name": draw(st.text(max_size=30)), "instances": value}
    elif shape == "instances" and draw(st.booleans()):
        body = {"instances": [{"b64": draw(st.text(max_size=40))}]}
    else:
        body = {shape: value}
    return json.dumps(body, allow_nan=True).encode()


text_bodies = st.one_of(
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),  # nesting past the 512 bound
    st.integers(300, 6000).map(lambda n: b'{"instances": [' + b"9" * n + b"]}"),
    st.sampled_from([b'{"instances": [1e999]}', b'{"instances": [-1e-400]}', b"1" * 5000]),
    st.sampled_from([b'{"instances": ["\\ud800"]}', b'{"instances": [{"b64": "!!!"}]}']),
    st.binary(max_size=300),  # mostly not UTF-8, nor JSON
)
bodies = st.one_of(json_bodies(), text_bodies)
names = st.one_of(
    st.just(MODEL), st.text(st.characters(codec="ascii", exclude_characters="/?#"), max_size=30)
)
versions = st.one_of(
    st.just(""),
    st.just(""),
    st.just(""),
    st.integers(-(2**64), 2**64).map(lambda v: f"/versions/{v}"),
    st.just("/versions/" + "9" * 5000),
    st.text(max_size=10).map(lambda label: f"/labels/{label}"),
)


def quote(text: str) -> str:
    from urllib.parse import quote as url_quote

    return url_quote(text, safe=":/")


@st.composite
def http_requests(draw) -> tuple[bytes, frozenset]:
    """(raw request bytes, the codes it may answer)."""
    method = draw(st.sampled_from(["POST", "POST", "GET", "PUT", "DELETE"]))
    path = quote(f"/v1/models/{draw(names)}{draw(versions)}{draw(st.sampled_from(VERBS))}")
    body = draw(bodies) if method in ("POST", "PUT") else b""
    headers = ["Host: 127.0.0.1", "Connection: close"]
    framing = draw(st.sampled_from(["exact", "exact", "exact", "long", "short", "junk", "huge"]))
    length = len(body)
    if framing == "long":  # declared longer than sent: the body never arrives
        headers.append(f"Content-Length: {length + draw(st.integers(1, 10_000))}")
    elif framing == "short":
        headers.append(f"Content-Length: {max(length - draw(st.integers(1, 50)), 0)}")
    elif framing == "junk":
        headers.append(f"Content-Length: {draw(st.sampled_from(['-1', 'abc', '1e3', '']))}")
    elif framing == "huge":
        headers += [f"Content-Length: {length}", "X-Junk: " + "a" * draw(st.integers(1, 20_000))]
    else:
        headers.append(f"Content-Length: {length}")
    headers.append(f"Content-Type: {draw(st.sampled_from(['application/json', 'text/x', '']))}")
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
    allowed = CLIENT_ERRORS if framing == "exact" else FRAMING
    return head.encode() + body, allowed


def send(target, data: bytes) -> int | str:
    """The HTTP status of the server's answer to `data`, CLOSED, or HANG."""
    with socket.create_connection(("127.0.0.1", target.server.rest_port), CALL_TIMEOUT) as sock:
        try:
            sock.sendall(data)
            answer = b""
            while b"\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            return "HANG"
        except (ConnectionResetError, BrokenPipeError):
            return CLOSED
    if not answer:
        return CLOSED
    return int(answer.split(b" ", 2)[1])


def test_hostile_http_requests(target):
    budget = Budget(35)

    @attack_settings(max_examples=600)
    @given(http_requests())
    def attack(case):
        data, allowed = case
        if budget.spent():
            return
        status = send(target, data)
        target.record(repr(data[:800]), status if status != "HANG" else "HANG", allowed)

    attack()
    target.check_golden()


def test_the_server_kept_its_answer_and_its_memory(target):
    assert_bounded_growth(target)
