"""The gRPC layer's pure translation: a PredictResult to TF Serving's PredictResponse."""

from __future__ import annotations

import numpy as np
from tensorflow.core.framework import types_pb2

from convstack.client.tensors import to_ndarray
from convstack.serving.grpc_api import predict_response
from convstack.serving.inference import PredictResult


def test_predict_response_carries_the_resolved_spec_and_every_output():
    result = PredictResult(
        outputs={
            "probabilities": np.array([[0.25, 0.75]], dtype=np.float32),
            "classes": np.array([1], dtype=np.int64),
        },
        model_name="digits",
        version=7,
        signature_name="serving_default",
    )

    response = predict_response(result)

    assert response.model_spec.name == "digits"
    assert response.model_spec.version.value == 7
    assert response.model_spec.signature_name == "serving_default"
    assert set(response.outputs) == {"probabilities", "classes"}
    assert response.outputs["probabilities"].dtype == types_pb2.DT_FLOAT
    assert response.outputs["classes"].dtype == types_pb2.DT_INT64
    np.testing.assert_array_equal(to_ndarray(response.outputs["probabilities"]), [[0.25, 0.75]])
    np.testing.assert_array_equal(to_ndarray(response.outputs["classes"]), [1])
