"""The one place the client imports TensorFlow / TensorFlow Serving message definitions.

Every other client module takes its protos from here, so the client can later switch to its own
generated copies of these messages without the rest of `client/` noticing.

Why that matters: `tensorflow.core.framework` is a subpackage of `tensorflow`, so importing any
`*_pb2` module from it first executes `tensorflow/__init__.py`, i.e. the whole TensorFlow runtime
plus Keras. Measured here (TF 2.21, 2 CPUs, warm page cache): about 3.0 s and ~3,760 modules in
`sys.modules` (about 4.3 s for a cold `python -c`), against ~0.1 s for numpy alone.
`tensorflow_serving.apis` imports those same modules, so it pays the same price and then adds
only ~0.02 s of its own.
"""

from __future__ import annotations

from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

__all__ = [
    "classification_pb2",
    "get_model_metadata_pb2",
    "get_model_status_pb2",
    "inference_pb2",
    "model_management_pb2",
    "model_pb2",
    "model_server_config_pb2",
    "model_service_pb2_grpc",
    "predict_pb2",
    "prediction_service_pb2_grpc",
    "regression_pb2",
    "tensor_pb2",
    "tensor_shape_pb2",
    "types_pb2",
]
