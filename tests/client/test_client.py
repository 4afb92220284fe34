"""PredictionClient against real servers on loopback: the embedded server in a subprocess
(versions 1 and 2, labels stable=1 and canary=2) and a scripted gRPC server for failures."""

from __future__ import annotations

import math
import random
import threading

import grpc
import numpy as np
import pytest

from convstack.client import PredictionClient, PredictionError
from convstack.client.connection import ConnectionSettings, RetryPolicy
from convstack.common.ports import free_ports
from tests.client.conftest import (
    MODEL,
    config_text,
    count_delta,
    images,
    launch,
    request_counts,
    start_server,
    wait_ready,
)
from tests.serving.helpers import make_repository

pytestmark = pytest.mark.slow

X = images(12)


@pytest.fixture
def client(server):
    with PredictionClient(server.target, MODEL) as c:
        yield c


# --- predict ----------------------------------------------------------------------------------


def test_predict_returns_outputs_and_the_serving_version(client):
    prediction = client.predict(X)

    assert prediction.version == 2  # the highest loaded version
    assert prediction.label is None
    assert prediction.signature == "serving_default"
    assert prediction["probabilities"].shape == (12, 10)
    assert np.array_equal(prediction["classes"], prediction["probabilities"].argmax(axis=1))


@pytest.mark.parametrize(
    ("choice", "version", "label"),
    [
        ({"version": 1}, 1, None),
        ({"version": 2}, 2, None),
        ({"version_label": "stable"}, 1, "stable"),
        ({"version_label": "canary"}, 2, "canary"),
    ],
)
def test_version_and_label_select_what_serves(server, choice, version, label):
    with PredictionClient(server.target, MODEL, **choice) as client:
        prediction = client.predict(X[:2])

    assert (prediction.version, prediction.label) == (version, label)


def test_dict_inputs_lists_and_output_filter(client):
    prediction = client.predict({"images": X[:2].tolist()}, output_filter=["classes"])

    assert list(prediction.outputs) == ["classes"]
    assert np.array_equal(prediction["classes"], client.predict(X[:2])["classes"])


def test_server_errors_carry_code_and_message(server):
    client = PredictionClient(server.target, MODEL, version=9)
    with client, pytest.raises(PredictionError) as caught:
        client.predict(X[:1])

    assert caught.value.code == "NOT_FOUND"
    assert caught.value.message == f"Servable not found for request: Specific({MODEL}, 9)"
    assert caught.value.details["target"] == server.target


def test_predict_many_reassembles_results_in_input_order(client):
    """Against the trained Keras model called in-process (no client, no server involved), and
    against one-by-one predicts."""
    import tensorflow as tf

    from tests.trainer import export_helpers

    rows = images(23, seed=11)
    logits = export_helpers.trained_model()(rows, training=False)
    expected = tf.nn.softmax(logits).numpy()
    one_by_one = [client.predict(rows[i : i + 1]) for i in range(len(rows))]

    outputs = client.predict_many(rows, batch_size=4, concurrency=3)

    assert np.array_equal(outputs["classes"], expected.argmax(axis=1))
    np.testing.assert_allclose(outputs["probabilities"], expected, atol=1e-5)
    assert np.array_equal(outputs["classes"], [p["classes"][0] for p in one_by_one])


@pytest.mark.parametrize("batch_size", [None, 1000])
def test_predict_many_keeps_every_request_under_the_message_limit(server, batch_size):
    rows = images(30, seed=12)
    limit = 20_000  # about six rows of 3,136 bytes
    before = request_counts(server)
    with PredictionClient(server.target, MODEL, max_message_bytes=limit) as client:
        outputs = client.predict_many(rows, batch_size=batch_size)
        expected = client.predict(rows[:5])["classes"]

    requests = count_delta(before, request_counts(server))["OK"] - 1
    assert requests >= math.ceil(rows.nbytes / limit)
    assert np.array_equal(outputs["classes"][:5], expected)
    assert outputs["probabilities"].shape == (30, 10)


# --- local validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "name"),
    [
        ({"imagez": X}, "imagez"),
        (X.astype(np.float64), "images"),
        (X[0], "images"),
        (X[:, :20], "images"),
    ],
)
def test_mistakes_fail_locally_and_send_nothing(server, client, inputs, name):
    client.metadata()  # the signature is cached: only Predict calls could reach the server
    before = request_counts(server)

    with pytest.raises(PredictionError) as caught:
        client.predict(inputs)

    assert caught.value.code == "INVALID_ARGUMENT"
    assert repr(name) in caught.value.message
    assert request_counts(server) == before


def test_without_validation_the_server_rejects_the_same_mistake(server):
    before = request_counts(server)
    client = PredictionClient(server.target, MODEL, validate=False)
    with client, pytest.raises(PredictionError) as caught:
        client.predict({"images": X.astype(np.float64)})

    assert caught.value.code == "INVALID_ARGUMENT"
    assert count_delta(before, request_counts(server)) == {"INVALID_ARGUMENT": 1.0}


# --- metadata, status, waiting, reloading -----------------------------------------------------


def test_metadata_is_plain_python(client):
    signatures = client.metadata()

    assert set(signatures) == {"serving_default", "predict_image_bytes"}
    assert signatures["serving_default"] == {
        "inputs": {"images": {"dtype": "float32", "shape": [-1, 28, 28, 1]}},
        "outputs": {
            "classes": {"dtype": "int64", "shape": [-1]},
            "probabilities": {"dtype": "float32", "shape": [-1, 10]},
        },
        "method_name": "tensorflow/serving/predict",
    }
    assert signatures["predict_image_bytes"]["inputs"] == {
        "image_bytes": {"dtype": "string", "shape": [-1]}
    }
    assert client.served_version() == 2


def test_status_lists_versions_newest_first(client):
    available = {"state": "AVAILABLE", "error_code": "OK", "error_message": ""}

    assert client.status() == [{"version": 2, **available}, {"version": 1, **available}]
    assert client.status(1) == [{"version": 1, **available}]
    with pytest.raises(PredictionError) as caught:
        client.status(7)
    assert caught.value.code == "NOT_FOUND"


def test_wait_until_available(server, client):
    assert client.wait_until_available() == 2
    assert client.wait_until_available(1) == 1
    with pytest.raises(PredictionError) as caught:
        client.wait_until_available(9, timeout=0.5)
    assert caught.value.code == "DEADLINE_EXCEEDED"
    assert "version 9" in caught.value.message


def test_reload_config_changes_what_is_served(server, client):
    only_one = config_text(server.base_path, "specific { versions: 1 }", {"stable": 1})
    try:
        client.reload_config(only_one)
        client.wait_until_available(1)
        assert client.predict(X[:1]).version == 1
        assert [s["version"] for s in client.status() if s["state"] == "AVAILABLE"] == [1]
    finally:
        client.reload_config(server.config_text)
        client.wait_until_available(2)
    assert client.predict(X[:1]).version == 2


def test_malformed_config_fails_locally(client):
    with pytest.raises(PredictionError) as caught:
        client.reload_config("model_config_list { nonsense }")

    assert caught.value.code == "INVALID_ARGUMENT"


# --- canary split -----------------------------------------------------------------------------


def test_canary_share_is_within_binomial_bounds_and_labels_match_versions(server):
    calls, fraction = 400, 0.25
    with PredictionClient(
        server.target, MODEL, canary_fraction=fraction, rng=random.Random(2024)
    ) as client:
        served = [client.predict(X[:1]) for _ in range(calls)]

    canary = sum(p.label == "canary" for p in served)
    sigma = math.sqrt(calls * fraction * (1 - fraction))
    assert abs(canary - calls * fraction) <= 4 * sigma
    assert {(p.label, p.version) for p in served} == {("stable", 1), ("canary", 2)}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"version": 1, "version_label": "stable"},
        {"canary_fraction": 0.1, "version_label": "stable"},
        {"canary_fraction": 1.5},
        {"timeout": 0},
        {"backoff": (1.0, 0.5)},
    ],
)
def test_contradictory_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        PredictionClient("127.0.0.1:1", MODEL, **kwargs)


# --- connection: retries, deadlines, metadata, load balancing ---------------------------------


def test_full_jitter_backoff_stays_within_its_exponential_bound():
    policy = RetryPolicy(retries=8, backoff=(0.05, 0.5))
    rng = random.Random(3)

    for attempt in range(8):
        bound = min(0.5, 0.05 * 2**attempt)
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= bound
        assert max(delays) > bound / 2  # spread over the range, not a fixed pause


def test_resolver_targets_use_round_robin_and_plain_targets_do_not():
    def lb(target, **kwargs):
        options = dict(ConnectionSettings(target, **kwargs).channel_options())
        return options.get("grpc.service_config")

    assert "round_robin" in lb("dns:///serving.default.svc:8500")
    assert "round_robin" in lb("ipv4:10.0.0.1:8500,10.0.0.2:8500")
    assert lb("localhost:8500") is None
    assert "pick_first" in lb("dns:///svc:8500", load_balancing="pick_first")


def test_unavailable_is_retried_with_backoff(scripted):
    scripted.service.failures = [grpc.StatusCode.UNAVAILABLE] * 2

    with PredictionClient(scripted.target, MODEL, retries=3, backoff=(0.01, 0.05)) as client:
        prediction = client.predict(np.ones((1, 2), np.float32))

    assert prediction.version == 7
    assert len(scripted.service.calls) == 3


def test_retries_run_out_with_the_last_error(scripted):
    scripted.service.failures = [grpc.StatusCode.UNAVAILABLE] * 5

    client = PredictionClient(scripted.target, MODEL, retries=2, backoff=(0.01, 0.05))
    with client, pytest.raises(PredictionError) as caught:
        client.predict(np.ones((1, 2), np.float32))

    assert caught.value.code == "UNAVAILABLE"
    assert caught.value.details["attempts"] == 3
    assert len(scripted.service.calls) == 3


def test_a_code_not_configured_for_retry_fails_at_once(scripted):
    scripted.service.failures = [grpc.StatusCode.RESOURCE_EXHAUSTED]
    client = PredictionClient(
        scripted.target, MODEL, retry_codes=("UNAVAILABLE",), backoff=(0.01, 0.05)
    )

    with client, pytest.raises(PredictionError) as caught:
        client.predict(np.ones((1, 2), np.float32))

    assert caught.value.code == "RESOURCE_EXHAUSTED"
    assert len(scripted.service.calls) == 1


def test_a_code_configured_for_retry_is_retried_to_success(scripted):
    scripted.service.failures = [grpc.StatusCode.RESOURCE_EXHAUSTED]
    client = PredictionClient(
        scripted.target,
        MODEL,
        retry_codes=("UNAVAILABLE", "RESOURCE_EXHAUSTED"),
        backoff=(0.01, 0.05),
    )

    with client:
        prediction = client.predict(np.full((1, 2), 3.0, np.float32))

    assert prediction.version == 7  # the scripted server's answer, echoing x as y
    np.testing.assert_array_equal(prediction.outputs["y"], [[3.0, 3.0]])
    assert len(scripted.service.calls) == 2


def test_metadata_goes_with_every_call(scripted):
    with PredictionClient(
        scripted.target, MODEL, metadata=[("Authorization", "Bearer t0ken")]
    ) as client:
        client.predict(np.ones((1, 2), np.float32))
        client.predict(np.ones((1, 2), np.float32), metadata=[("x-request-id", "42")])

    first, second = scripted.service.calls
    assert first["authorization"] == "Bearer t0ken"
    assert "x-request-id" not in first
    assert (second["authorization"], second["x-request-id"]) == ("Bearer t0ken", "42")


def test_unreachable_server_without_retries_is_unavailable():
    (port,) = free_ports(1)
    client = PredictionClient(f"127.0.0.1:{port}", MODEL, retries=0)
    with client, pytest.raises(PredictionError) as caught:
        client.status()

    assert caught.value.code == "UNAVAILABLE"
    assert caught.value.details["attempts"] == 1


def test_a_call_retries_until_a_late_server_comes_up(tmp_path, exported_version):
    base = make_repository(tmp_path / "models", exported_version, [1])
    (port,) = free_ports(1)
    started = []
    timer = threading.Timer(
        1.0,
        lambda: started.append(
            launch(tmp_path, [f"--model_name={MODEL}", f"--model_base_path={base}"], port)
        ),
    )
    client = PredictionClient(
        f"127.0.0.1:{port}", MODEL, retries=1000, backoff=(0.05, 0.5), timeout=120
    )
    timer.start()
    try:
        with client:
            prediction = client.predict(X[:3])  # starts before the server exists
        assert prediction.version == 1
        assert prediction["classes"].shape == (3,)
    finally:
        timer.join()
        for server in started:
            server.stop()


def test_deadline_exceeded_when_the_server_holds_the_request(batching_server):
    with PredictionClient(batching_server.target, MODEL, retries=0) as client:
        client.metadata()
        with pytest.raises(PredictionError) as caught:
            client.predict(X[:1], timeout=0.5)  # a lone row waits 10 s for its batch
        full_batch = client.predict(images(32), timeout=30)  # a full batch runs at once

    assert caught.value.code == "DEADLINE_EXCEEDED"
    assert full_batch["classes"].shape == (32,)


@pytest.fixture(scope="module")
def second_server(tmp_path_factory, exported_version):
    root = tmp_path_factory.mktemp("second")
    base = make_repository(root / "models", exported_version, [2])
    server = start_server(root, [f"--model_name={MODEL}", f"--model_base_path={base}"])
    yield server
    server.stop()


@pytest.mark.parametrize("policy", [None, "pick_first"])
def test_round_robin_spreads_calls_over_every_address(server, second_server, policy):
    target = f"ipv4:127.0.0.1:{server.grpc_port},127.0.0.1:{second_server.grpc_port}"
    before = [request_counts(s) for s in (server, second_server)]
    with PredictionClient(target, MODEL, load_balancing=policy) as client:
        client.wait_until_available()
        for _ in range(20):
            client.predict(X[:1])

    calls = [
        count_delta(b, request_counts(s)).get("OK", 0)
        for b, s in zip(before, (server, second_server), strict=True)
    ]
    assert sum(calls) == 20
    if policy is None:  # an ipv4: list balances round_robin by default
        assert min(calls) > 0
    else:
        assert min(calls) == 0


def test_dns_targets_reach_the_server(server):
    with PredictionClient(f"dns:///localhost:{server.grpc_port}", MODEL) as client:
        assert client.predict(X[:1]).version == 2


def test_closed_client_refuses_calls(server):
    client = PredictionClient(server.target, MODEL)
    client.close()

    with pytest.raises(PredictionError) as caught:
        client.status()
    assert caught.value.code == "FAILED_PRECONDITION"


def test_waiting_covers_a_server_that_is_still_starting(tmp_path, exported_version):
    base = make_repository(tmp_path / "models", exported_version, [3])
    server = launch(tmp_path, [f"--model_name={MODEL}", f"--model_base_path={base}"])
    try:
        with PredictionClient(server.target, MODEL) as client:
            assert client.wait_until_available(timeout=120) == 3
        wait_ready(server)
    finally:
        server.stop()
