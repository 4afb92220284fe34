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


def _float_proto(shape, values=None, content: bytes | None = None):
    from tensorflow.core.framework import tensor_pb2

    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    for size in shape:
        proto.tensor_shape.dim.add().size = size
    if values is not None:
        proto.float_val.extend(values)
    if content is not None:
        proto.tensor_content = content
    return proto


def test_the_decoder_bounds_what_requests_make_it_fill():
    """A few bytes can declare thousands of images that TensorFlow's rules zero-fill: beyond
    --max_request_fill_bytes that is refused before anything is allocated; the same tensor
    sent whole, or a small broadcast of one value, decodes."""
    import pytest

    from convstack.serving.errors import InvalidArgument
    from convstack.serving.grpc_api import tensor_decoder

    decode = tensor_decoder(256 * 1024 * 1024, 1024 * 1024)
    images = [2048, 28, 28, 1]

    with pytest.raises(InvalidArgument) as caught:
        decode({"images": _float_proto(images)})
    sent = decode({"images": _float_proto(images, content=bytes(2048 * 784 * 4))})
    broadcast = decode({"x": _float_proto([1000], values=[0.5])})

    assert caught.value.message.startswith("tensor parsing error: images (the request's tensors")
    assert "--max_request_fill_bytes" in caught.value.message
    assert sent["images"].shape == tuple(images)
    assert broadcast["x"].shape == (1000,) and float(broadcast["x"][-1]) == 0.5
