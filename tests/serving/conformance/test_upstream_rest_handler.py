"""TF Serving's http_rest_api_handler_test.cc, case by case, over real HTTP.

Upstream serves half_plus_two as `saved_model_half_plus_two_2_versions` with the version policy
`specific { versions: 123 }` and the label `Version_Label` -> 123, and calls the handler
in-process; here the same config is served by a server process and asked over HTTP. JSON is
compared as parsed values, as upstream's CompareJson compares rapidjson documents.
"""

from __future__ import annotations

import json

import pytest

from tests.serving.conformance.conftest import serving

pytestmark = pytest.mark.slow

MODEL = "saved_model_half_plus_two_2_versions"
LABEL = "Version_Label"
POLICY = (
    "model_version_policy { specific { versions: 123 } } "
    f'version_labels {{ key: "{LABEL}" value: 123 }}'
)
REGRESS_80 = '{"signature_name": "regress_x_to_y", "examples": [ { "x": 80.0 } ] }'
TWO_ROWS = [[2.5, 3.0], [3.5, 4.0]]
STATUS_123 = {
    "model_version_status": [
        {
            "version": "123",
            "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""},
        }
    ]
}


@pytest.fixture(scope="module")
def server(upstream_backend, upstream_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream-rest")
    # Upstream assigns the label by a reload once 123 is AVAILABLE; a label in the initial
    # config needs this flag, in TF Serving as here.
    flags = ["--allow_version_labels_for_unavailable_models"]
    models = {MODEL: (upstream_models / MODEL, POLICY)}
    with serving(root, upstream_backend, models, flags, "rest") as server:
        yield server


def post(server, path: str, body: str):
    return server.rest("POST", path, body.encode())


def error_of(reply) -> str:
    return reply["error"] if isinstance(reply, dict) else str(reply)


@pytest.mark.parametrize(
    ("method", "path", "message"),
    [
        ("GET", "/v1/foo", "Malformed request"),
        ("POST", "/v1/foo", "Malformed request"),
        ("GET", "/v1/models", "Missing model name"),
        ("GET", "/v1/models/debug/model_name", "Malformed request"),
        ("POST", "/v1/models", "Malformed request"),
        ("GET", "/v1/models/foo:predict", "Malformed request"),
        ("GET", "/v1/models/foo/version/50:predict", "Malformed request"),
        ("POST", "/v1/models/foo/version/50:regress", "Malformed request"),
        ("POST", "/v1/models/foo/versions/HELLO:regress", "Malformed request"),
        ("POST", f"/v1/models/foo/versions/{2**64 - 1}:regress", "Failed to convert version"),
        ("POST", "/v1/models/foo/metadata", "Malformed request"),
        ("POST", "/v1/models/foo/label/some_label:regress", "Malformed request"),
        ("POST", "/v1/models/foo/versions/50/labels/some_label:regress", "Malformed request"),
        ("POST", "/v1/models/foo/versions/some_label:regress", "Malformed request"),
    ],
)
def test_unsupported_api_calls(server, method, path, message):
    """HttpRestApiHandlerTest.UnsupportedApiCalls: each is INVALID_ARGUMENT (400)."""
    status, reply = server.rest(method, path, b"" if method == "POST" else None)
    assert status == 400
    if server.backend == "embedded" or "version" not in message:  # TF Serving: empty body
        assert message in error_of(reply)


def test_predict_model_name_version_errors(server):
    """HttpRestApiHandlerTest.PredictModelNameVersionErrors: all NOT_FOUND (404)."""
    body = '{ "instances": [1] }'
    for path in (
        "/v1/models/foo:predict",
        "/v1/models/foo/versions/50:predict",
        f"/v1/models/{MODEL}99:predict",
    ):
        status, _ = post(server, path, body)
        assert status == 404, path


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        (f"/v1/models/{MODEL}:predict", "", "JSON Parse error: The document is empty"),
        (f"/v1/models/{MODEL}:predict", "instances = [1, 2]", "JSON Parse error: Invalid value"),
        (
            f"/v1/models/{MODEL}:predict",
            '{ "instances": ["x", "y"] }',
            "not of expected type: float",
        ),
        (
            f"/v1/models/{MODEL}/labels/nonexistent_label:predict",
            '{ "instances": ["x", "y"] }',
            "Unrecognized servable version label",
        ),
        (
            f"/v1/models/{MODEL}:predict",
            '{ "signature_name": 100 }',
            "'signature_name' key must be a string value.",
        ),
    ],
    ids=["empty", "bad-json", "wrong-type", "unknown-label", "signature-name-type"],
)
def test_predict_request_errors(server, path, body, message):
    """HttpRestApiHandlerTest.PredictRequestErrors: INVALID_ARGUMENT (400) naming the problem."""
    status, reply = post(server, path, body)
    assert status == 400
    assert message in error_of(reply)


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (":predict", '{"instances": [[1.0, 2.0], [3.0, 4.0]]}', {"predictions": TWO_ROWS}),
        ("/versions/123:predict", '{"instances": [1.0, 2.0]}', {"predictions": [2.5, 3.0]}),
        (f"/labels/{LABEL}:predict", '{"instances": [1.0, 2.0]}', {"predictions": [2.5, 3.0]}),
        (
            "/versions/123:predict",
            '{"signature_name": "serving_default", "instances": [3.0, 4.0]}',
            {"predictions": [3.5, 4.0]},
        ),
        (
            "/versions/123:predict",
            '{"signature_name": "serving_default", "inputs": [3.0, 4.0]}',
            {"outputs": [3.5, 4.0]},
        ),
        (":regress", REGRESS_80, {"results": [42]}),
        (
            "/versions/123:regress",
            REGRESS_80,
            {"results": [42]},
        ),
        (
            f"/labels/{LABEL}:regress",
            REGRESS_80,
            {"results": [42]},
        ),
        (
            ":classify",
            '{"signature_name": "classify_x_to_y", "examples": [ { "x": 20.0 } ] }',
            {"results": [[["", 12]]]},
        ),
        (
            f"/labels/{LABEL}:classify",
            '{"signature_name": "classify_x_to_y", "examples": [ { "x": 10.0 } ] }',
            {"results": [[["", 7]]]},
        ),
    ],
    ids=[
        "Predict-latest",
        "Predict-version",
        "Predict-label",
        "Predict-signature",
        "Predict-columnar",
        "Regress-latest",
        "Regress-version",
        "Regress-label",
        "Classify-latest",
        "Classify-label",
    ],
)  # fmt: skip
def test_predict_regress_classify(server, path, body, expected):
    """HttpRestApiHandlerTest.Predict, .Regress and .Classify: the answers, as JSON values,
    with Content-Type application/json."""
    status, reply = post(server, f"/v1/models/{MODEL}{path}", body)
    assert status == 200, reply
    assert reply == expected


@pytest.mark.parametrize("path", ["", "/versions/123", f"/labels/{LABEL}"])
def test_get_status(server, path):
    """HttpRestApiHandlerTest.GetStatus: all versions, one version, and by label."""
    assert server.rest("GET", f"/v1/models/{MODEL}{path}") == (200, STATUS_123)


def test_get_model_metadata(server, upstream_models):
    """HttpRestApiHandlerTest.GetModelMetadata: exactly
    saved_model_half_plus_two_2_versions_metadata.json."""
    expected = json.loads(
        (upstream_models / "saved_model_half_plus_two_2_versions_metadata.json").read_text()
    )
    assert server.rest("GET", f"/v1/models/{MODEL}/metadata") == (200, expected)
