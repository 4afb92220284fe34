"""Well-formed but hostile gRPC messages: mutated PredictRequests (names huge and unicode,
versions, labels, signatures, dtypes no enum has, shapes negative, huge and overflowing, values
of any length in any typed field, output_filter junk) and GetModelStatus / GetModelMetadata
junk. Each answer's code must be the one TF Serving's order of checks gives (oracle.py)."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.serving.adversarial import oracle, strategies
from tests.serving.adversarial.conftest import (
    CALL_TIMEOUT,
    Budget,
    assert_bounded_growth,
    attack_settings,
    grpc_code,
)

pytestmark = pytest.mark.slow


def call_code(call, request) -> str:
    """The status code name `call` answers `request` with ("HANG" past the timeout)."""
    try:
        call(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        return grpc_code(error)
    return "OK"


def describe(request) -> str:
    return f"{type(request).__name__} {str(request)[:1500]!r}"


def test_mutated_predict_requests(target):
    predict = target.server.prediction().Predict
    budget = Budget(25)

    @attack_settings(max_examples=2000)
    @given(strategies.predict_requests())
    def attack(request):
        if budget.spent():
            return
        target.record(describe(request), call_code(predict, request), oracle.predict_codes(request))

    attack()
    target.check_golden()


def test_status_and_metadata_junk(target):
    status = target.server.models().GetModelStatus
    metadata = target.server.prediction().GetModelMetadata
    budget = Budget(8)

    @attack_settings(max_examples=600)
    @given(strategies.status_requests(), strategies.metadata_requests())
    def attack(status_request, metadata_request):
        if budget.spent():
            return
        code = call_code(status, status_request)
        target.record(describe(status_request), code, oracle.status_codes(status_request))
        code = call_code(metadata, metadata_request)
        target.record(describe(metadata_request), code, oracle.metadata_codes(metadata_request))

    attack()
    target.check_golden()


def test_bursts_of_concurrent_mutated_requests(target):
    """Bursts of up to 48 mutated Predicts in flight at once: each still gets its own code."""
    predict = target.server.prediction().Predict
    budget = Budget(10)

    @attack_settings(max_examples=25)
    @given(st.lists(strategies.predict_requests(), min_size=8, max_size=48))
    def attack(requests):
        if budget.spent():
            return
        futures = [predict.future(request, timeout=CALL_TIMEOUT) for request in requests]
        for request, future in zip(requests, futures, strict=True):
            try:
                future.result()
                code = "OK"
            except grpc.RpcError as error:
                code = grpc_code(error)
            target.record(describe(request), code, oracle.predict_codes(request))

    attack()
    target.check_golden()


def test_the_server_kept_its_answer_and_its_memory(target):
    assert_bounded_growth(target)
