"""REST :classify and :regress on TF Serving's own half_plus_two, as its
tensorflow_model_server_test.py testClassifyREST / testRegressREST expect, plus the path and
body errors around them (http_rest_api_handler.cc, http_rest_api_util.cc)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

UPSTREAM = Path("/work/shared/tfserving-upstream/testdata/saved_model_half_plus_two_cpu")
NAME = "default"


@pytest.fixture
def server(tmp_path, start_server):
    if not UPSTREAM.is_dir():
        pytest.skip(f"{UPSTREAM} is not available")
    model_dir = tmp_path / "half_plus_two"
    shutil.copytree(UPSTREAM, model_dir)  # never serve from (or write under) the shared copy
    return start_server([f"--model_name={NAME}", f"--model_base_path={model_dir}"], wait_for=NAME)


def test_classify_and_regress_rest(server):
    """testClassifyREST / testRegressREST."""
    status, body = server.rest(
        "POST",
        f"/v1/models/{NAME}:classify",
        {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]},
    )
    assert (status, body) == (200, {"results": [[["", 3.0]]]})
    status, body = server.rest(
        "POST",
        f"/v1/models/{NAME}:regress",
        {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]},
    )
    assert (status, body) == (200, {"results": [3.0]})


def test_classify_regress_errors(server):
    """Unknown model: NOT_FOUND once the body parses; malformed bodies are 400 first; a
    version beyond int64 is "Failed to convert version"."""
    body = {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]}
    status, reply = server.rest("POST", "/v1/models/nope:regress", body)
    assert status == 404, reply
    status, reply = server.rest("POST", "/v1/models/nope:classify", {"examples": []})
    assert status == 400, reply
    status, reply = server.rest(
        "POST", f"/v1/models/{NAME}/versions/18446744073709551615:regress", body
    )
    assert status == 400
    if server.backend == "embedded":  # TF Serving answers this 400 with an empty body
        assert reply["error"] == "Failed to convert version: 18446744073709551615 to numeric."
