"""The REST rows of TFSERVING_CONTRACT.md, over plain HTTP."""

from __future__ import annotations

import base64

import pytest

from tests.serving.conformance.conftest import MODEL, write_config
from tests.serving.conformance.requests import images
from tests.serving.helpers import make_repository
from tests.trainer import export_helpers

pytestmark = pytest.mark.slow

# TF Serving refuses labels in the initial config unless this flag is set (the versions are not
# AVAILABLE yet when the config is first applied).
LABEL_FLAG = "--allow_version_labels_for_unavailable_models"

LABELS = 'model_version_policy { all {} } version_labels { key: "stable" value: 1 }'


@pytest.fixture
def server(tmp_path, start_server, exported_version, monitoring_file):
    model_dir = make_repository(tmp_path / "models", exported_version, [1, 2])
    config = write_config(tmp_path / "models.config", [(MODEL, model_dir)], LABELS)
    return start_server(
        [f"--model_config_file={config}", f"--monitoring_config_file={monitoring_file}", LABEL_FLAG]
    )


def test_rest_contract(server):
    batch = images(3)
    expected = export_helpers.trained_model()(batch, training=False).numpy().argmax(axis=1)

    # Row format: instances -> predictions (one object per row, several outputs).
    status, body = server.rest("POST", f"/v1/models/{MODEL}:predict", {"instances": batch.tolist()})
    assert status == 200, body
    assert [row["classes"] for row in body["predictions"]] == expected.tolist()
    assert len(body["predictions"][0]["probabilities"]) == 10

    # Columnar format: inputs -> outputs; version and label paths.
    status, body = server.rest(
        "POST", f"/v1/models/{MODEL}/versions/1:predict", {"inputs": {"images": batch.tolist()}}
    )
    assert status == 200 and body["outputs"]["classes"] == expected.tolist()
    status, body = server.rest(
        "POST",
        f"/v1/models/{MODEL}/labels/stable:predict",
        {"inputs": batch.tolist(), "signature_name": "serving_default"},
    )
    assert status == 200 and body["outputs"]["classes"] == expected.tolist()

    # b64 strings into the image-bytes signature.
    from convstack.trainer.signatures import encode_png

    instances = [{"b64": base64.b64encode(png).decode()} for png in encode_png(batch)]
    status, body = server.rest(
        "POST",
        f"/v1/models/{MODEL}:predict",
        {"signature_name": "predict_image_bytes", "instances": instances},
    )
    assert status == 200, body
    assert [row["classes"] for row in body["predictions"]] == expected.tolist()

    # Status and metadata.
    status, body = server.rest("GET", f"/v1/models/{MODEL}")
    assert status == 200
    assert body["model_version_status"][0] == {
        "version": "2",
        "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""},
    }
    assert [entry["version"] for entry in body["model_version_status"]] == ["2", "1"]
    status, body = server.rest("GET", f"/v1/models/{MODEL}/versions/1")
    assert status == 200 and [e["version"] for e in body["model_version_status"]] == ["1"]
    status, body = server.rest("GET", f"/v1/models/{MODEL}/metadata")
    assert status == 200
    assert body["model_spec"]["name"] == MODEL and body["model_spec"]["version"] == "2"
    signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["images"]["dtype"] == "DT_FLOAT"

    # Errors: TF Serving's JSON and HTTP codes.
    cases = [
        (
            "POST",
            "/v1/models/nope:predict",
            {"instances": batch.tolist()},
            404,
            "Servable not found for request: Latest(nope)",
        ),
        (
            "POST",
            f"/v1/models/{MODEL}/versions/9:predict",
            {"instances": batch.tolist()},
            404,
            f"Specific({MODEL}, 9)",
        ),
        (
            "POST",
            f"/v1/models/{MODEL}/labels/nope:predict",
            {"instances": batch.tolist()},
            400,
            "Unrecognized servable version label: nope",
        ),
        (
            "POST",
            f"/v1/models/{MODEL}:predict",
            {"signature_name": "nope", "instances": [1]},
            400,
            "nope",
        ),
        ("POST", f"/v1/models/{MODEL}:predict", {"rows": []}, 400, "instances"),
        ("POST", f"/v1/models/{MODEL}:predict", b"{not json", 400, ""),
        ("GET", "/v1/models/nope", None, 404, "Could not find any versions of model nope"),
        ("GET", "/v1/nonsense", None, 400, "Malformed request: GET /v1/nonsense"),
        ("POST", f"/v1/models/{MODEL}:explode", {}, 400, "Malformed request"),
    ]
    for method, path, payload, code, message in cases:
        status, body = server.rest(method, path, payload)
        assert status == code, (path, body)
        assert isinstance(body, dict) and message in body["error"], (path, body)

    # Prometheus metrics under TF Serving's names, counting what happened above.
    status, text = server.rest("GET", "/monitoring/prometheus/metrics")
    assert status == 200
    assert f':tensorflow:serving:request_count{{model_name="{MODEL}",status="OK"}}' in text
    assert ":tensorflow:serving:request_latency_bucket" in text
    assert 'status="NOT_FOUND"' in text


def test_readiness_endpoint(server):
    if server.backend != "embedded":
        pytest.skip("TF Serving has no readiness endpoint; that is why convstack adds one")
    assert server.rest("GET", "/readyz") == (200, {"status": "ready"})
    assert server.rest("GET", "/livez")[0] == 200
