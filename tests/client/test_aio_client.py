"""AsyncPredictionClient against the same real servers as the sync client."""

from __future__ import annotations

import asyncio
import random

import grpc
import numpy as np
import pytest

from convstack.client import AsyncPredictionClient, PredictionClient, PredictionError
from tests.client.conftest import MODEL, images, request_counts

pytestmark = pytest.mark.slow

X = images(10, seed=21)


def run(coroutine):
    return asyncio.run(coroutine)


def test_predict_with_version_label_and_latest(server):
    async def predictions():
        async with AsyncPredictionClient(server.target, MODEL) as latest:
            newest = await latest.predict(X)
        async with AsyncPredictionClient(server.target, MODEL, version_label="stable") as stable:
            labelled = await stable.predict({"images": X[:2]}, output_filter=["classes"])
        async with AsyncPredictionClient(server.target, MODEL, version=1) as pinned:
            first = await pinned.predict(X[:2])
        return newest, labelled, first

    newest, labelled, first = run(predictions())

    assert (newest.version, newest.label, newest["probabilities"].shape) == (2, None, (10, 10))
    assert (labelled.version, labelled.label, list(labelled.outputs)) == (1, "stable", ["classes"])
    assert first.version == 1
    assert np.array_equal(labelled["classes"], first["classes"])


def test_results_match_the_model_and_the_sync_client(server):
    """Against the trained Keras model called in-process (an oracle that shares no client or
    server code), and against the sync client."""
    import tensorflow as tf

    from tests.trainer import export_helpers

    async def outputs():
        async with AsyncPredictionClient(server.target, MODEL) as client:
            return await client.predict(X), await client.predict_many(X, batch_size=3)

    single, many = run(outputs())
    with PredictionClient(server.target, MODEL) as client:
        sync = client.predict(X)
    model = tf.nn.softmax(export_helpers.trained_model()(X, training=False)).numpy()

    assert np.array_equal(single["classes"], model.argmax(axis=1))
    np.testing.assert_allclose(single["probabilities"], model, atol=1e-5)
    assert np.array_equal(many["classes"], model.argmax(axis=1))
    np.testing.assert_allclose(many["probabilities"], model, atol=1e-5)
    assert np.array_equal(sync["classes"], single["classes"])


def test_predict_many_keeps_order_with_concurrency(server):
    rows = images(17, seed=22)

    async def outputs():
        async with AsyncPredictionClient(server.target, MODEL) as client:
            one_by_one = await asyncio.gather(*(client.predict(rows[i : i + 1]) for i in range(17)))
            many = await client.predict_many(rows, batch_size=2, concurrency=5)
            return one_by_one, many

    one_by_one, many = run(outputs())

    from tests.trainer import export_helpers

    model_classes = export_helpers.trained_model()(rows, training=False).numpy().argmax(axis=1)
    assert np.array_equal(many["classes"], model_classes)
    assert np.array_equal(many["classes"], [p["classes"][0] for p in one_by_one])


def test_metadata_status_and_waiting(server):
    async def calls():
        async with AsyncPredictionClient(server.target, MODEL) as client:
            return (
                await client.metadata(),
                await client.status(),
                await client.wait_until_available(1),
                await client.served_version(),
            )

    metadata, status, waited, served = run(calls())

    assert metadata["serving_default"]["inputs"]["images"]["shape"] == [-1, 28, 28, 1]
    assert [(s["version"], s["state"]) for s in status] == [(2, "AVAILABLE"), (1, "AVAILABLE")]
    assert (waited, served) == (1, 2)


def test_reload_config_and_its_errors(server):
    async def reload():
        async with AsyncPredictionClient(server.target, MODEL) as client:
            await client.reload_config(server.config_text)  # the same config: nothing changes
            with pytest.raises(PredictionError) as caught:
                await client.reload_config("model_config_list { config { bogus: 1 } }")
            return caught.value, await client.predict(X[:1])

    error, prediction = run(reload())

    assert error.code == "INVALID_ARGUMENT"
    assert prediction.version == 2


def test_validation_fails_locally_and_sends_nothing(server):
    async def mistake():
        async with AsyncPredictionClient(server.target, MODEL) as client:
            await client.metadata()
            before = request_counts(server)
            with pytest.raises(PredictionError) as caught:
                await client.predict(X.astype(np.float16))
            return caught.value, before

    error, before = run(mistake())

    assert error.code == "INVALID_ARGUMENT"
    assert "'images'" in error.message and "float16" in error.message
    assert request_counts(server) == before


def test_server_errors_and_deadlines_are_prediction_errors(server, batching_server):
    async def failures():
        async with AsyncPredictionClient(server.target, "nope") as missing:
            with pytest.raises(PredictionError) as not_found:
                await missing.predict(X[:1])
        async with AsyncPredictionClient(batching_server.target, MODEL, retries=0) as held:
            await held.metadata()
            with pytest.raises(PredictionError) as expired:
                await held.predict(X[:1], timeout=0.5)  # a lone row waits 10 s for its batch
        return not_found.value, expired.value

    not_found, expired = run(failures())

    assert not_found.code == "NOT_FOUND"
    assert "Latest(nope)" in not_found.message
    assert expired.code == "DEADLINE_EXCEEDED"


def test_canary_split_reports_the_label_that_served(server):
    async def split():
        async with AsyncPredictionClient(
            server.target, MODEL, canary_fraction=0.5, rng=random.Random(5)
        ) as client:
            return [await client.predict(X[:1]) for _ in range(40)]

    served = run(split())

    assert {(p.label, p.version) for p in served} == {("stable", 1), ("canary", 2)}


def test_unavailable_is_retried_and_metadata_sent(scripted):
    scripted.service.failures = [grpc.StatusCode.UNAVAILABLE] * 2

    async def call():
        async with AsyncPredictionClient(
            scripted.target, MODEL, backoff=(0.01, 0.05), metadata=[("authorization", "Bearer a")]
        ) as client:
            return await client.predict(np.ones((2, 2), np.float32))

    prediction = run(call())

    assert prediction.version == 7
    np.testing.assert_array_equal(prediction["y"], np.ones((2, 2), np.float32))
    assert [call["authorization"] for call in scripted.service.calls] == ["Bearer a"] * 3


def test_closed_client_refuses_calls(server):
    async def closed():
        client = AsyncPredictionClient(server.target, MODEL)
        await client.status()
        await client.close()
        with pytest.raises(PredictionError) as caught:
            await client.status()
        return caught.value

    assert run(closed()).code == "FAILED_PRECONDITION"
