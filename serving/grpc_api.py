"""TensorFlow Serving's gRPC API (PredictionService, ModelService) on grpc.aio, translating
protos to InferenceService calls and ServingErrors to gRPC status codes in one place."""

from __future__ import annotations

import functools
import logging
import time

import grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from convstack.client.tensors import to_ndarray, to_tensor_proto
from convstack.serving.errors import InvalidArgument, ServingError, Unimplemented
from convstack.serving.inference import InferenceService, ModelRef, PredictResult

log = logging.getLogger(__name__)

CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
SIGNATURE_DEF_FIELD = "signature_def"


def model_ref(request) -> ModelRef:
    """The ModelSpec of a request as a ModelRef (version or label, never both)."""
    if not request.HasField("model_spec"):
        raise InvalidArgument("Missing ModelSpec")
    spec = request.model_spec
    choice = spec.WhichOneof("version_choice")
    version = spec.version.value if choice == "version" else None
    label = spec.version_label if choice == "version_label" else None
    return ModelRef(spec.name, version, label)


def grpc_errors(method):
    """Map ServingError (and anything unexpected) to a gRPC status: a request never kills the
    server, whatever it sends."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except ServingError as error:
            await context.abort(grpc.StatusCode[error.code], error.message)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    return wrapper


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def decode_inputs(request) -> dict:
    inputs = {}
    for key, proto in request.inputs.items():
        try:
            inputs[key] = to_ndarray(proto)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"Input {key!r} is not a valid TensorProto: {exc}") from exc
    return inputs


def predict_response(result: PredictResult) -> predict_pb2.PredictResponse:
    """The PredictResponse of a result. The outputs go in through the constructor: filling
    `response.outputs[key]` entry by entry costs twice as much, on every request."""
    response = predict_pb2.PredictResponse(
        outputs={key: to_tensor_proto(array) for key, array in result.outputs.items()}
    )
    response.model_spec.name = result.model_name
    response.model_spec.version.value = result.version
    response.model_spec.signature_name = result.signature_name
    return response


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, service: InferenceService) -> None:
        self._service = service

    @grpc_errors
    async def Predict(self, request, context):
        ref = model_ref(request)
        try:
            inputs = decode_inputs(request)
        except ServingError as error:
            self._service.metrics.record_request(ref.name, "predict", "GRPC", error.code, 0.0)
            raise
        result = await self._service.predict(
            ref,
            request.model_spec.signature_name,
            inputs,
            list(request.output_filter),
            deadline=_deadline(context),
            entrypoint="GRPC",
        )
        return predict_response(result)

    @grpc_errors
    async def GetModelMetadata(self, request, context):
        ref = model_ref(request)
        fields = list(request.metadata_field)
        if not fields:
            raise InvalidArgument(
                "GetModelMetadataRequest must specify at least one metadata_field"
            )
        for field in fields:
            if field != SIGNATURE_DEF_FIELD:
                raise InvalidArgument(f"Metadata field {field} is not supported")
        version, signature_def_map = self._service.metadata(ref)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = ref.name
        response.model_spec.version.value = version
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_def_map)
        return response

    @grpc_errors
    async def Classify(self, request, context):
        self._require_method(model_ref(request), request.model_spec.signature_name, "classify")
        return classification_pb2.ClassificationResponse()

    @grpc_errors
    async def Regress(self, request, context):
        self._require_method(model_ref(request), request.model_spec.signature_name, "regress")
        return regression_pb2.RegressionResponse()

    @grpc_errors
    async def MultiInference(self, request, context):
        if not request.tasks:
            raise InvalidArgument("MultiInferenceRequest must contain at least one task")
        if len({task.model_spec.name for task in request.tasks}) > 1:
            raise InvalidArgument(
                "All ModelSpecs in a MultiInferenceRequest must access the same model name."
            )
        for task in request.tasks:
            ref = model_ref(task)
            if task.method_name == CLASSIFY_METHOD:
                self._require_method(ref, task.model_spec.signature_name, "classify")
            elif task.method_name == REGRESS_METHOD:
                self._require_method(ref, task.model_spec.signature_name, "regress")
            else:
                raise Unimplemented(f"Unsupported signature method_name: {task.method_name}")
        return inference_pb2.MultiInferenceResponse()

    def _require_method(self, ref: ModelRef, signature_name: str, kind: str) -> None:
        """TF Serving's checks before Classify/Regress: the signature exists and has the
        matching method_name. Models exported by convstack only have predict signatures."""
        expected, noun = (
            (CLASSIFY_METHOD, "classification") if kind == "classify" else
            (REGRESS_METHOD, "regression")
        )  # fmt: skip
        found = self._service.signature_method(ref, signature_name)
        if found is None:
            raise InvalidArgument(
                f"No signature was found with the name: {signature_name or 'serving_default'}"
            )
        _, method_name = found
        if method_name != expected:
            raise InvalidArgument(
                f"Expected {noun} signature method_name to be {expected}. Was: {method_name}"
            )
        raise InvalidArgument(f"{noun} signatures are not supported by the embedded server")


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, service: InferenceService) -> None:
        self._service = service

    @grpc_errors
    async def GetModelStatus(self, request, context):
        statuses = self._service.status(model_ref(request))
        response = get_model_status_pb2.GetModelStatusResponse()
        for status in statuses:
            entry = response.model_version_status.add()
            entry.version = status.version
            entry.state = int(status.state)
            entry.status.error_code = grpc.StatusCode[status.error_code].value[0]
            entry.status.error_message = status.error_message
        return response

    @grpc_errors
    async def HandleReloadConfigRequest(self, request, context):
        if request.config.WhichOneof("config") != "model_config_list":
            raise InvalidArgument(
                "ServerModelConfig type not supported by HandleReloadConfigRequest. Only "
                "ModelConfigList is currently supported"
            )
        await self._service.reload_config(request.config)
        return model_management_pb2.ReloadConfigResponse()
