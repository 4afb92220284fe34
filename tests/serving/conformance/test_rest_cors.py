"""CORS over REST as TF Serving's HTTP server does it: preflights answered whatever the flag,
and --rest_api_enable_cors_support adding its three headers to every /v1/ answer."""

from __future__ import annotations

import http.client
import json

import pytest

from tests.serving.conformance.conftest import MODEL
from tests.serving.conformance.requests import images
from tests.serving.helpers import make_repository

pytestmark = pytest.mark.slow

CORS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "POST, GET",
    "access-control-allow-headers": "Content-Type",
}


def exchange(server, method: str, path: str, headers=None, body: bytes | None = None):
    """(status, lower-cased headers, body bytes) of one HTTP request."""
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def cors_headers(headers: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name.startswith("access-control-")}


@pytest.fixture
def model_dir(tmp_path, exported_version):
    return make_repository(tmp_path / "models", exported_version, [1])


def test_a_preflight_is_answered_without_the_flag_and_no_cors_header_is_added(
    start_server, model_dir
):
    server = start_server([f"--model_name={MODEL}", f"--model_base_path={model_dir}"])
    path = f"/v1/models/{MODEL}:predict"
    status, headers, body = exchange(server, "OPTIONS", path, {"Origin": "https://app.example"})
    assert (status, body, cors_headers(headers)) == (200, b"", {})
    # No Origin (or one that is not an http(s) origin): refused, still without a body.
    status, _, body = exchange(server, "OPTIONS", path)
    assert (status, body) == (400, b"")
    status, _, body = exchange(server, "OPTIONS", path, {"Origin": "null"})
    assert (status, body) == (400, b"")
    status, headers, _ = exchange(server, "GET", f"/v1/models/{MODEL}")
    assert status == 200 and cors_headers(headers) == {}


def test_the_cors_flag_adds_its_headers_to_every_v1_answer(start_server, model_dir):
    server = start_server(
        [
            f"--model_name={MODEL}",
            f"--model_base_path={model_dir}",
            "--rest_api_enable_cors_support=true",
        ]
    )
    origin = {"Origin": "http://localhost:3000"}
    status, headers, _ = exchange(server, "OPTIONS", f"/v1/models/{MODEL}:predict", origin)
    assert status == 200 and cors_headers(headers) == CORS
    body = json.dumps({"instances": images(1).tolist()}).encode()
    status, headers, _ = exchange(server, "POST", f"/v1/models/{MODEL}:predict", origin, body)
    assert status == 200 and cors_headers(headers) == CORS
    # Errors carry them too, so that a browser can read the message.
    status, headers, _ = exchange(server, "GET", "/v1/models/no_such_model", origin)
    assert status == 404 and cors_headers(headers) == CORS
    status, headers, _ = exchange(server, "POST", f"/v1/models/{MODEL}:predict", origin, b"{")
    assert status == 400 and cors_headers(headers) == CORS


def test_the_v1_prefix_is_taken_in_any_case(start_server, model_dir):
    server = start_server([f"--model_name={MODEL}", f"--model_base_path={model_dir}"])
    status, _, body = exchange(server, "GET", f"/V1/models/{MODEL}")
    assert status == 200, body
    assert b'"AVAILABLE"' in body
