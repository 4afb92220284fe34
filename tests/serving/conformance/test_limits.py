"""Limits: message size and bounded concurrency. A refused request never disturbs the others."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from tests.serving.conformance.conftest import MODEL
from tests.serving.conformance.requests import images, predict_request
from tests.serving.helpers import make_repository

pytestmark = pytest.mark.slow


def test_oversized_messages_are_refused_and_the_server_keeps_serving(
    tmp_path, start_server, exported_version
):
    model_dir = make_repository(tmp_path / "models", exported_version, [1])
    server = start_server(
        [f"--model_name={MODEL}", f"--model_base_path={model_dir}", "--max_message_bytes=200000"]
    )
    if server.backend != "embedded":
        pytest.skip("TF Serving's message limit is not configurable this way")
    big = np.repeat(images(1), 100, axis=0)  # 100 x 28 x 28 x 4 bytes = 313 KB
    with pytest.raises(grpc.RpcError) as caught:
        server.prediction().Predict(predict_request({"images": big}), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status, body = server.rest("POST", f"/v1/models/{MODEL}:predict", {"instances": big.tolist()})
    assert status == 413 and "too large" in body["error"]
    assert server.prediction().Predict(predict_request(), timeout=30).outputs


def test_requests_beyond_the_concurrency_limit_are_refused(
    tmp_path, start_server, exported_version
):
    model_dir = make_repository(tmp_path / "models", exported_version, [1])
    batching = tmp_path / "batching.config"
    # A long batch timeout keeps the first request in flight while the second arrives.
    batching.write_text("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 2000000 }\n")
    server = start_server(
        [
            f"--model_name={MODEL}",
            f"--model_base_path={model_dir}",
            "--max_concurrent_requests=1",
            "--enable_batching",
            f"--batching_parameters_file={batching}",
        ]
    )
    if server.backend != "embedded":
        pytest.skip("TF Serving has no max_concurrent_requests flag")
    # Two requests at once: whichever reaches the server second finds the first one waiting out
    # the batch timeout and is refused (on a loaded machine either may arrive first).
    outcomes: list[str] = []

    def predict():
        try:
            reply = server.prediction().Predict(predict_request(), timeout=30)
            outcomes.append(f"served by version {reply.model_spec.version.value}")
        except grpc.RpcError as error:
            outcomes.append(error.code().name)

    threads = [threading.Thread(target=predict) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.2)
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["RESOURCE_EXHAUSTED", "served by version 1"]
