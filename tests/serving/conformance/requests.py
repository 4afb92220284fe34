"""Raw TF Serving request builders for the conformance tests (tf.make_tensor_proto, not our
client)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
)

from tests.serving.conformance.conftest import MODEL
from tests.trainer import export_helpers


def images(count: int = 4) -> np.ndarray:
    return export_helpers.held_out_data()[0][:count]


def predict_request(
    inputs: dict | None = None,
    *,
    name: str = MODEL,
    version: int | None = None,
    label: str | None = None,
    signature: str = "",
    output_filter: tuple[str, ...] = (),
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.model_spec.signature_name = signature
    for key, value in (inputs if inputs is not None else {"images": images()}).items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    request.output_filter.extend(output_filter)
    return request


def status_request(name: str = MODEL, version: int | None = None):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    return request


def metadata_request(name: str = MODEL, fields=("signature_def",), version: int | None = None):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    request.metadata_field.extend(fields)
    return request


def versions_by_state(reply) -> dict[int, str]:
    names = get_model_status_pb2.ModelVersionStatus.State.Name
    return {s.version: names(s.state) for s in reply.model_version_status}
