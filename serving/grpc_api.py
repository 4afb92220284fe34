"""TensorFlow Serving's gRPC API (PredictionService, ModelService) on grpc.aio, translating
protos to InferenceService calls and ServingErrors to gRPC status codes in one place."""

from __future__ import annotations

import functools
import logging
import math
import time

import grpc
from tensorflow.core.framework import tensor_pb2
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

from convstack.client.tensors import (
    ENUM_TO_DTYPE,
    to_ndarray,
    to_tensor_proto,
    to_typed_tensor_proto,
)
from convstack.serving.errors import InvalidArgument, ServingError, bounded_message
from convstack.serving.inference import InferenceService, ModelRef, PredictResult

log = logging.getLogger(__name__)

SIGNATURE_DEF_FIELD = "signature_def"
# What one request's tensors may make the server allocate (--max_request_tensor_bytes).
DEFAULT_MAX_REQUEST_TENSOR_BYTES = 256 * 1024 * 1024
# ... and how much of that the server may make up from repeated or missing values.
DEFAULT_MAX_REQUEST_FILL_BYTES = 1024 * 1024


def model_ref(request) -> ModelRef:
    """The ModelSpec of a request as a ModelRef (version or label, never both)."""
    if not request.HasField("model_spec"):
        raise InvalidArgument("Missing ModelSpec")
    return spec_ref(request.model_spec)


def spec_ref(spec) -> ModelRef:
    choice = spec.WhichOneof("version_choice")
    version = spec.version.value if choice == "version" else None
    label = spec.version_label if choice == "version_label" else None
    return ModelRef(spec.name, version, label)


def grpc_errors(method):
    """Map ServingError (and anything unexpected) to a gRPC status: a request never kills the
    server, whatever it sends. Messages are bounded: a request's giant name echoed whole would
    not fit in the status trailer."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except ServingError as error:
            await context.abort(grpc.StatusCode[error.code], bounded_message(error.message))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            await context.abort(
                grpc.StatusCode.INTERNAL, bounded_message(f"{type(exc).__name__}: {exc}")
            )

    return wrapper


class Unparseable:
    """What a request the server cannot parse deserializes to, so that its method answers
    INTERNAL as gRPC C++ does (grpcpp's GenericDeserialize) instead of grpc python's UNKNOWN."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _tolerant(deserializer):
    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or a message nested beyond the parser's limit
            return Unparseable(bounded_message(str(exc) or type(exc).__name__))

    return parse


def _refusing_unparseable(behaviour):
    async def unary_unary(request, context):
        if isinstance(request, Unparseable):
            await context.abort(grpc.StatusCode.INTERNAL, request.message)
        return await behaviour(request, context)

    return unary_unary


def _refusing_handler(handler):
    """`handler` with unparseable requests answered INTERNAL (unary-unary methods only:
    the streaming one, health Watch, keeps grpc's own behaviour)."""
    if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
        return handler
    return handler._replace(
        request_deserializer=_tolerant(handler.request_deserializer),
        unary_unary=_refusing_unparseable(handler.unary_unary),
    )


class _ParseFailuresAsInternal(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}  # only methods the inner serves

    def service(self, handler_call_details):
        handler = self._handlers.get(handler_call_details.method)
        if handler is None:
            handler = _refusing_handler(self._inner.service(handler_call_details))
            if handler is not None:
                self._handlers[handler_call_details.method] = handler
        return handler


class ParseFailuresAsInternal:
    """Stands in for a grpc.aio.Server while a generated `add_*Servicer_to_server` registers
    its handlers, e.g. `add_PredictionServiceServicer_to_server(servicer,
    ParseFailuresAsInternal(server))`: those methods then answer INTERNAL to bytes that do not
    parse as their request message."""

    def __init__(self, server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(map(_ParseFailuresAsInternal, handlers)))

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        wrapped = {name: _refusing_handler(handler) for name, handler in handlers.items()}
        self._server.add_registered_method_handlers(service, wrapped)


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _declared_bytes(key: str, proto) -> int:
    """What decoding `proto` allocates, from its declared dtype and shape alone."""
    dims = [dim.size for dim in proto.tensor_shape.dim]
    if any(size < 0 for size in dims):
        raise InvalidArgument(f"tensor parsing error: {key} (negative dimension in {dims})")
    dtype = ENUM_TO_DTYPE.get(proto.dtype)
    itemsize = 8 if dtype is None or dtype.kind == "O" else dtype.itemsize
    return math.prod(dims) * itemsize


def tensor_decoder(max_bytes: int, max_fill_bytes: int = DEFAULT_MAX_REQUEST_FILL_BYTES):
    """Decode a request's TensorProtos, refusing before allocating any request whose declared
    shapes add up to more than `max_bytes` (a few bytes can declare petabytes of zeros), or
    that would have the server fill more than `max_fill_bytes` beyond what it sent (TensorFlow
    repeats the last typed value, or zeros, up to the shape: 50 bytes can declare a batch of
    85,000 images that the model then runs)."""

    def decode(protos) -> dict:
        total = filled = 0
        inputs = {}
        for key in sorted(protos):
            declared = _declared_bytes(key, protos[key])
            total += declared
            filled += max(0, declared - protos[key].ByteSize())
            if total > max_bytes:
                raise InvalidArgument(
                    f"tensor parsing error: {key} (the request's tensors declare {total} bytes; "
                    f"the server takes at most {max_bytes}, --max_request_tensor_bytes)"
                )
            if filled > max_fill_bytes:
                raise InvalidArgument(
                    f"tensor parsing error: {key} (the request's tensors declare {filled} bytes "
                    f"more than they send; the server fills at most {max_fill_bytes}, "
                    "--max_request_fill_bytes)"
                )
            try:
                inputs[key] = to_ndarray(protos[key])
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(f"tensor parsing error: {key} ({exc})") from exc
        return inputs

    return decode


def predict_response(
    result: PredictResult, *, tensor_content: bool = False
) -> predict_pb2.PredictResponse:
    """The PredictResponse of a result, values in the typed fields as TF Serving answers
    (AsProtoField) unless `tensor_content`. The outputs go in through the constructor: filling
    `response.outputs[key]` entry by entry costs twice as much, on every request."""
    encode = to_tensor_proto if tensor_content else to_typed_tensor_proto
    # The codec builds the client's own TensorProto unless told TensorFlow's class.
    response = predict_pb2.PredictResponse(
        outputs={
            key: encode(array, proto_type=tensor_pb2.TensorProto)
            for key, array in result.outputs.items()
        }
    )
    _fill_spec(response.model_spec, result)
    return response


def _fill_spec(spec, result) -> None:
    spec.name = result.model_name
    spec.version.value = result.version
    spec.signature_name = result.signature_name


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(
        self,
        service: InferenceService,
        *,
        max_request_tensor_bytes: int = DEFAULT_MAX_REQUEST_TENSOR_BYTES,
        max_request_fill_bytes: int = DEFAULT_MAX_REQUEST_FILL_BYTES,
        tensor_content_responses: bool = False,
    ) -> None:
        self._service = service
        self._decode = tensor_decoder(max_request_tensor_bytes, max_request_fill_bytes)
        self._tensor_content = tensor_content_responses

    @grpc_errors
    async def Predict(self, request, context):
        result = await self._service.predict(
            model_ref(request),
            request.model_spec.signature_name,
            request.inputs,
            list(request.output_filter),
            deadline=_deadline(context),
            entrypoint="GRPC",
            decode=self._decode,
        )
        return predict_response(result, tensor_content=self._tensor_content)

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
        return await self._answer_task(
            self._service.classify, classification_pb2.ClassificationResponse, request, context
        )

    @grpc_errors
    async def Regress(self, request, context):
        return await self._answer_task(
            self._service.regress, regression_pb2.RegressionResponse, request, context
        )

    async def _answer_task(self, run, response_type, request, context):
        result = await run(
            model_ref(request),
            request.model_spec.signature_name,
            request.input,
            deadline=_deadline(context),
        )
        response = response_type(result=result.result)
        _fill_spec(response.model_spec, result)
        return response

    @grpc_errors
    async def MultiInference(self, request, context):
        # TF Serving takes the servable from the first task's ModelSpec.
        first = request.tasks[0].model_spec if request.tasks else model_pb2.ModelSpec()
        specs = [
            (task.model_spec.name, task.model_spec.signature_name, task.method_name)
            for task in request.tasks
        ]
        results = await self._service.multi_inference(
            spec_ref(first), specs, request.input, deadline=_deadline(context)
        )
        response = inference_pb2.MultiInferenceResponse()
        for result in results:
            entry = response.results.add()
            field = (
                entry.classification_result
                if isinstance(result.result, classification_pb2.ClassificationResult)
                else entry.regression_result
            )
            field.CopyFrom(result.result)
            _fill_spec(entry.model_spec, result)
        return response


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
