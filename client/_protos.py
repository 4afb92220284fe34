"""The one place the client takes its message definitions from: convstack's own (client/wire),
never TensorFlow's or TF Serving's packages.

Why: `tensorflow.core.framework` is a subpackage of `tensorflow`, so importing any `*_pb2` from
it first runs `tensorflow/__init__.py`, the whole TensorFlow runtime plus Keras (about 5 s and
~3,800 modules here), and `tensorflow_serving.apis` imports those same modules. Ours are the
same bytes on the wire under another protobuf package, so they also load in a process that has
imported TensorFlow, in either order. The names below are those of TF's modules the client
used to import, mapped onto ours.
"""

from __future__ import annotations

from convstack.client.wire import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_pb2,
    predict_pb2,
    services,
    tensor_pb2,
)

# TF spreads these over more files; ours keep them together.
tensor_shape_pb2 = tensor_pb2
types_pb2 = tensor_pb2
model_server_config_pb2 = model_management_pb2
prediction_service_pb2_grpc = services
model_service_pb2_grpc = services

__all__ = [
    "get_model_metadata_pb2",
    "get_model_status_pb2",
    "model_management_pb2",
    "model_pb2",
    "model_server_config_pb2",
    "model_service_pb2_grpc",
    "predict_pb2",
    "prediction_service_pb2_grpc",
    "services",
    "tensor_pb2",
    "tensor_shape_pb2",
    "types_pb2",
]
