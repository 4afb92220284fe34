"""Where InferenceService runs a Predict: a lone small request on the event loop's thread (no
hand-off to a request thread and back), anything larger, or concurrent with another, on the
request threads. Real manager and tiny SavedModel; the servable's run records its thread."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from convstack.serving import servable as servable_module
from convstack.serving.batching import INLINE_MAX_ELEMENTS, small_enough_to_run_inline
from convstack.serving.inference import InferenceService, ModelRef
from convstack.serving.manager import ModelManager
from convstack.serving.metrics import ServingMetrics
from tests.serving import helpers

SMALL = np.zeros((1, *helpers.IMAGE_SHAPE), np.float32)
LARGE_ROWS = INLINE_MAX_ELEMENTS // SMALL[0].size + 1
LARGE = np.zeros((LARGE_ROWS, *helpers.IMAGE_SHAPE), np.float32)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    model_dir = helpers.make_model_dir(tmp_path_factory.mktemp("inline"))
    manager = ModelManager(
        helpers.config_for(model_dir), file_system_poll_wait_seconds=0, max_num_load_retries=0
    )
    manager.start()
    try:
        yield InferenceService(manager, ServingMetrics())
    finally:
        manager.stop()


@pytest.fixture
def threads(monkeypatch):
    seen: list[tuple[int, threading.Thread]] = []
    original = servable_module.LoadedVersion.run

    def recording(self, signature_name, inputs, *args, **kwargs):
        seen.append((len(next(iter(inputs.values()))), threading.current_thread()))
        return original(self, signature_name, inputs, *args, **kwargs)

    monkeypatch.setattr(servable_module.LoadedVersion, "run", recording)
    return seen


def _predict(service, images):
    return service.predict(ModelRef(helpers.MODEL_NAME), "", {"images": images})


def test_a_batch_of_32_digits_images_is_not_small_enough_to_block_the_loop():
    """While it runs a request inline the loop reads no other, so they all look lone: a batch
    whose run takes milliseconds must go to a request thread (measured in bench serve)."""
    assert small_enough_to_run_inline({"images": np.zeros((1, 28, 28, 1), np.float32)})
    assert not small_enough_to_run_inline({"images": np.zeros((32, 28, 28, 1), np.float32)})
    assert not small_enough_to_run_inline({"images": np.zeros((8, 28, 28, 1), np.float32)})


def test_a_lone_small_predict_runs_on_the_loops_thread(service, threads):
    result = asyncio.run(_predict(service, SMALL))
    assert result.outputs["classes"].shape == (1,)
    assert threads == [(1, threading.main_thread())]


def test_a_lone_large_predict_runs_on_a_request_thread(service, threads):
    result = asyncio.run(_predict(service, LARGE))
    assert result.outputs["classes"].shape == (LARGE_ROWS,)
    assert [rows for rows, _ in threads] == [LARGE_ROWS]
    assert threads[0][1] is not threading.main_thread()


def test_a_small_predict_beside_another_runs_on_a_request_thread(service, threads):
    async def both():
        large = asyncio.create_task(_predict(service, LARGE))
        await asyncio.sleep(0)  # the large one is inside the server, on a request thread
        small = await _predict(service, SMALL)
        return await large, small

    large, small = asyncio.run(both())
    assert large.outputs["classes"].shape == (LARGE_ROWS,)
    assert small.outputs["classes"].shape == (1,)
    on = {rows: thread for rows, thread in threads}
    assert on[1] is not threading.main_thread() and on[LARGE_ROWS] is not threading.main_thread()


def _batching_service(manager_service, *, at_once: bool) -> InferenceService:
    from convstack.serving.batching import BatchingParameters

    params = BatchingParameters(max_batch_size=8, batch_timeout_micros=60_000_000)
    return InferenceService(
        manager_service.manager,
        ServingMetrics(),
        batching=params,
        run_lone_batches_at_once=at_once,
    )


def test_with_run_lone_batches_at_once_a_lone_batched_predict_does_not_wait(service, threads):
    batched = _batching_service(service, at_once=True)
    result = asyncio.run(asyncio.wait_for(_predict(batched, SMALL), 20))
    assert result.outputs["classes"].shape == (1,)
    assert threads == [(1, threading.main_thread())]


def test_with_run_lone_batches_at_once_predicts_arriving_together_still_merge(service, threads):
    """Requests started in one loop iteration (as a burst the server reads at once) form one
    batch: the first must not be judged alone before the others reach the server."""
    batched = _batching_service(service, at_once=True)

    async def burst():
        return await asyncio.gather(*(_predict(batched, SMALL) for _ in range(3)))

    results = asyncio.run(asyncio.wait_for(burst(), 20))
    assert [r.outputs["classes"].shape for r in results] == [(1,)] * 3
    assert [rows for rows, _ in threads] == [3]


def test_by_default_a_lone_batched_predict_waits_for_the_timeout_as_tf_serving(service, threads):
    batched = _batching_service(service, at_once=False)
    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(_predict(batched, SMALL), 0.5))
    assert threads == []
