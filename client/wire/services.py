"""Thin gRPC stubs for TF Serving's PredictionService and ModelService over our messages.

Written by hand rather than generated: a generated stub would take its method paths from our
protobuf package (`/convstack.wire.tensorflow.serving.PredictionService/...`), while servers
answer only TF Serving's paths. Works on `grpc.Channel` and `grpc.aio.Channel` alike.
"""

from __future__ import annotations

from convstack.client.wire import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    predict_pb2,
)

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"

__all__ = ["MODEL_SERVICE", "PREDICTION_SERVICE", "ModelServiceStub", "PredictionServiceStub"]


def _method(channel, service: str, name: str, response_type):
    return channel.unary_unary(
        f"/{service}/{name}",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response_type.FromString,
    )


class PredictionServiceStub:
    """Predict and GetModelMetadata of `tensorflow.serving.PredictionService`."""

    def __init__(self, channel) -> None:
        self.Predict = _method(channel, PREDICTION_SERVICE, "Predict", predict_pb2.PredictResponse)
        self.GetModelMetadata = _method(
            channel,
            PREDICTION_SERVICE,
            "GetModelMetadata",
            get_model_metadata_pb2.GetModelMetadataResponse,
        )


class ModelServiceStub:
    """GetModelStatus and HandleReloadConfigRequest of `tensorflow.serving.ModelService`."""

    def __init__(self, channel) -> None:
        self.GetModelStatus = _method(
            channel, MODEL_SERVICE, "GetModelStatus", get_model_status_pb2.GetModelStatusResponse
        )
        self.HandleReloadConfigRequest = _method(
            channel,
            MODEL_SERVICE,
            "HandleReloadConfigRequest",
            model_management_pb2.ReloadConfigResponse,
        )
