"""One loaded model version: its SavedModel signatures, request validation, inference, warmup.

Like TF Serving, a version is the SavedModel's MetaGraphDef (tag `serve`) loaded into a
TensorFlow session of its own, and a signature runs by feeding and fetching the tensor names its
SignatureDef lists. That serves TF1 graphs (reference variables, scalar signatures) and TF2
SavedModels alike, and leaves shapes to the graph: a shape it cannot take fails in the kernel,
with the kernel's INVALID_ARGUMENT, as in TF Serving. Measured here on the digits model, a
session callable answers a batch-1 call in ~325 us against ~407 us for the restored concrete
function (632 vs 659 us at batch 32), so the session is also the faster path.

Requests are checked before they reach TensorFlow in TF Serving's order and with its messages
(predict_util.cc): the signature, the input keys, the dtypes, the output filter. Safe to call
from many threads at once (a Session is).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf import message as protobuf_message
from google.protobuf import text_format
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, prediction_log_pb2

from convstack.serving.errors import (
    FailedPrecondition,
    InvalidArgument,
    ServingError,
    error_for_code,
)

logger = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
SERVE_TAG = "serve"
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
# TF Serving refuses a version whose warmup file holds more records than this.
MAX_WARMUP_RECORDS = 1000
# TF2 SavedModels list their initializer as a signature; it is metadata, not an endpoint.
INIT_OP_SIGNATURE = "__saved_model_init_op"
# tensorflow.error.Code numbers -> canonical names (the gRPC status codes).
_CODE_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
# Eager op errors carry "{{function_node ...}} " and " [Op:Name] name: " around the real text.
_OP_NOISE = re.compile(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:[^\]]*\].*$", re.DOTALL)

# Session callables kept per version (one per feed/fetch combination requests use).
_MAX_RUNNERS = 64

SignatureDefMap = get_model_metadata_pb2.SignatureDefMap


class LoadError(ServingError):
    """A version that cannot be loaded or warmed up; `code` is the status TF Serving reports."""

    code = "INTERNAL"

    def __init__(self, message: str, code: str = "INTERNAL"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TensorInfo:
    """One signature input or output as the SignatureDef describes it."""

    key: str
    dtype: np.dtype
    dtype_enum: int  # tensorflow.core.framework.types_pb2.DataType
    shape: tuple[int | None, ...] | None  # None: unknown rank; None entries: unknown dims


@dataclass(frozen=True)
class SignatureInfo:
    """A servable signature: its key, method name, inputs and outputs."""

    key: str
    method_name: str
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]


def dtype_name(dtype_enum: int) -> str:
    """TensorFlow's short name of a DataType ("float", "int64", "string"), as its messages use."""
    try:
        return types_pb2.DataType.Name(dtype_enum).removeprefix("DT_").lower()
    except ValueError:
        return f"<unknown dtype {dtype_enum}>"


def _numpy_dtype(dtype_enum: int) -> np.dtype:
    if dtype_enum == types_pb2.DT_STRING:
        return np.dtype(object)
    try:
        return np.dtype(tf.dtypes.as_dtype(dtype_enum).as_numpy_dtype)
    except TypeError:
        return np.dtype(object)


def _tensor_info(key: str, info: meta_graph_pb2.TensorInfo) -> TensorInfo:
    proto_shape = info.tensor_shape
    shape = (
        None
        if proto_shape.unknown_rank
        else tuple(dim.size if dim.size >= 0 else None for dim in proto_shape.dim)
    )
    return TensorInfo(key, _numpy_dtype(info.dtype), int(info.dtype), shape)


def _signature_info(key: str, signature: meta_graph_pb2.SignatureDef) -> SignatureInfo:
    return SignatureInfo(
        key=key,
        method_name=signature.method_name,
        inputs={k: _tensor_info(k, v) for k, v in sorted(signature.inputs.items())},
        outputs={k: _tensor_info(k, v) for k, v in sorted(signature.outputs.items())},
    )


def _format_shape(shape: Sequence[int | None]) -> str:
    return "[" + ",".join("-1" if dim is None else str(dim) for dim in shape) + "]"


def _given_dtype_enum(array: np.ndarray) -> int:
    if array.dtype.kind in "OSU":
        return types_pb2.DT_STRING
    try:
        return tf.dtypes.as_dtype(array.dtype).as_datatype_enum
    except TypeError:
        return types_pb2.DT_INVALID


def _error_from_op(exc: tf.errors.OpError) -> ServingError:
    code = _CODE_NAMES[exc.error_code] if 0 <= exc.error_code < len(_CODE_NAMES) else "UNKNOWN"
    return error_for_code(code, _op_message(exc))


def _op_message(exc: tf.errors.OpError) -> str:
    """The op error's text on one line, without the eager wrapper's function and op names."""
    return " ".join(_OP_NOISE.sub("", exc.message).split())


class Servable:
    """A loaded version: its SignatureDefs, request checks, and runs by tensor name.

    Subclasses provide `run_tensors` (feed tensors by graph name, fetch by graph name) and
    `close`; everything TF Serving checks before running lives here, shared by the SavedModel
    session and the TFLite interpreters."""

    def __init__(
        self,
        name: str,
        version: int,
        path: Path,
        signature_defs: Mapping[str, meta_graph_pb2.SignatureDef],
    ):
        self.name = name
        self.version = version
        self.path = Path(path)
        self.signature_defs: dict[str, meta_graph_pb2.SignatureDef] = dict(signature_defs)
        self.signatures: dict[str, SignatureInfo] = {
            key: _signature_info(key, signature)
            for key, signature in sorted(self.signature_defs.items())
            if key != INIT_OP_SIGNATURE
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.version}, {str(self.path)!r})"

    def close(self) -> None:
        """Release what the version holds."""

    def run_tensors(
        self, feeds: Mapping[str, np.ndarray], fetches: Sequence[str]
    ) -> list[np.ndarray]:
        raise NotImplementedError

    def signature_def_map(self) -> SignatureDefMap:
        """Every SignatureDef of the MetaGraphDef, as TF Serving's GetModelMetadata returns it."""
        result = SignatureDefMap()
        for key, signature in self.signature_defs.items():
            result.signature_def[key].CopyFrom(signature)
        return result

    def signature(self, key: str) -> SignatureInfo:
        """The signature `key` ("" is serving_default); FailedPrecondition if there is none."""
        key = key or DEFAULT_SIGNATURE
        try:
            return self.signatures[key]
        except KeyError:
            raise FailedPrecondition(f'Serving signature key "{key}" not found.') from None

    def validate(
        self,
        key: str,
        inputs: Mapping[str, np.ndarray],
        output_filter: Sequence[str] = (),
        *,
        batched: bool = False,
    ) -> SignatureInfo:
        """The signature, after checking the request against it (InvalidArgument if it fails).

        Checks, in TF Serving's order: the input keys, each input's dtype, and the
        output_filter aliases. Shapes are the graph's business, as in TF Serving; only requests
        that will be merged into one batch (`batched`) must agree on dimension 0.
        """
        signature = self.signature(key)
        check_input_keys(signature, inputs)
        arrays = {alias: np.asarray(value) for alias, value in inputs.items()}
        for alias in sorted(arrays):
            _check_dtype(signature.inputs[alias], arrays[alias])
        if batched:
            _check_batch(arrays)
        _check_output_filter(signature, output_filter)
        return signature

    def run(
        self, key: str, inputs: Mapping[str, np.ndarray], output_filter: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        """Validate, run the signature and return its outputs (only `output_filter` if given)."""
        arrays = {alias: np.asarray(value) for alias, value in inputs.items()}
        signature = self.validate(key, arrays, output_filter)
        definition = self.signature_defs[signature.key]
        wanted = list(output_filter) or list(signature.outputs)
        feeds = {definition.inputs[alias].name: array for alias, array in arrays.items()}
        fetched = self.run_tensors(feeds, [definition.outputs[alias].name for alias in wanted])
        return dict(zip(wanted, fetched, strict=True))

    def warmup(self, iterations: int = 1) -> int:
        """Replay assets.extra/tf_serving_warmup_requests, each record `iterations` times (TF
        Serving's --num_request_iterations_for_warmup); the number of records (0 if none).

        Like TF Serving: more than 1000 records fails (INVALID_ARGUMENT), an unreadable TFRecord
        file fails (DATA_LOSS), and any request that fails fails the load with its status.
        `predict_log` records run through `run`; records with no log are counted and skipped;
        classify, regress, multi-inference and session-run logs are UNIMPLEMENTED here.
        """
        path = self.path / WARMUP_FILE
        if not path.exists():
            logger.info("No warmup data file found at %s", path)
            return 0
        records = _read_warmup_records(path)
        for index, record in enumerate(records):
            for _ in range(max(1, iterations)):
                self._replay(path, index, record)
        return len(records)

    def _replay(self, path: Path, index: int, record: prediction_log_pb2.PredictionLog) -> None:
        kind = record.WhichOneof("log_type")
        if kind is None:
            return
        if kind != "predict_log":
            raise LoadError(
                f"{path}: record {index}: Unsupported log_type for warmup: {kind} (the embedded "
                "server replays predict_log records only)",
                code="UNIMPLEMENTED",
            )
        request = record.predict_log.request
        try:
            inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
        except (TypeError, ValueError) as exc:
            raise LoadError(
                f"{path}: record {index}: tensor parsing error: {exc}", code="INVALID_ARGUMENT"
            ) from exc
        try:
            self.run(request.model_spec.signature_name, inputs, list(request.output_filter))
        except ServingError as exc:
            raise LoadError(f"{path}: record {index}: {exc.message}", code=exc.code) from exc


class LoadedVersion(Servable):
    """A SavedModel version: its MetaGraphDef in a TensorFlow session of its own."""

    def __init__(
        self,
        name: str,
        version: int,
        path: Path,
        session: tf.compat.v1.Session,
        meta_graph: meta_graph_pb2.MetaGraphDef,
    ):
        super().__init__(name, version, path, meta_graph.signature_def)
        self._session = session
        self._runners: dict[tuple, object] = {}
        self._runners_lock = threading.Lock()

    def close(self) -> None:
        """Release the session (and the memory of the graph's variables)."""
        self._session.close()

    def run_tensors(
        self, feeds: Mapping[str, np.ndarray], fetches: Sequence[str]
    ) -> list[np.ndarray]:
        """Run the graph: feed tensors by name, return the fetched tensors in `fetches` order.

        A TensorFlow error becomes the ServingError of its status code (a shape the graph cannot
        take is the kernel's INVALID_ARGUMENT)."""
        names = sorted(feeds)
        try:
            runner = self._runner(tuple(names), tuple(fetches))
            return [np.asarray(value) for value in runner(*(feeds[name] for name in names))]
        except tf.errors.OpError as exc:
            raise _error_from_op(exc) from exc

    def _runner(self, feed_names: tuple[str, ...], fetch_names: tuple[str, ...]):
        """A cached C++ Session callable (Session::MakeCallable, what TF Serving runs).

        Session.run and make_callable with feeds go through Python's feed checks, which refuse
        any shape the placeholder does not declare; TF Serving feeds the C++ session directly
        and leaves shapes to the kernels. The callable is also ~3x faster per call."""
        key = (feed_names, fetch_names)
        runner = self._runners.get(key)
        if runner is None:
            options = config_pb2.CallableOptions(feed=feed_names, fetch=fetch_names)
            with self._runners_lock:
                if len(self._runners) >= _MAX_RUNNERS:
                    self._runners.clear()  # bounded, whatever output filters requests send
                runner = self._runners[key] = self._session._make_callable_from_options(options)
        return runner


def check_input_keys(signature: SignatureInfo, inputs: Mapping[str, object]) -> None:
    """TF Serving's input-key checks (VerifyRequestInputsSize, then GetInputValues)."""
    sent, expected = set(inputs), set(signature.inputs)
    if len(sent) != len(expected):
        raise InvalidArgument(
            f"input size does not match signature: {len(sent)}!={len(expected)} "
            f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
            f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
            f"Missing but required: {{{','.join(sorted(expected - sent))}}}."
        )
    unknown = sorted(sent - expected)
    if unknown:
        raise InvalidArgument(
            f"input tensor alias not found in signature: {unknown[0]}. "
            f"Inputs expected to be in the set {{{','.join(sorted(expected))}}}."
        )


def _check_dtype(expected: TensorInfo, array: np.ndarray) -> None:
    given = _given_dtype_enum(array)
    if given != expected.dtype_enum:
        raise InvalidArgument(
            f'Expects input "{expected.key}" to be {dtype_name(expected.dtype_enum)} but '
            f"{dtype_name(given)} is provided"
        )


def _check_batch(arrays: Mapping[str, np.ndarray]) -> None:
    # Requests merged into one batch are cut apart again along dimension 0.
    rows = None  # a loop, not sets and generators: it runs on every batched request
    for array in arrays.values():
        if not array.ndim or rows not in (None, array.shape[0]):
            break
        rows = array.shape[0]
    else:
        return
    sizes = ", ".join(
        f'"{alias}" has shape {_format_shape(array.shape)}'
        for alias, array in sorted(arrays.items())
    )
    raise InvalidArgument(
        "Batching session Run() input tensors must have equal 0th-dimension size: " + sizes
    )


def _check_output_filter(signature: SignatureInfo, output_filter: Sequence[str]) -> None:
    seen: set[str] = set()
    for alias in output_filter:
        if alias not in signature.outputs:
            raise InvalidArgument(
                f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                f"the set {{{','.join(sorted(signature.outputs))}}}."
            )
        if alias in seen:
            raise InvalidArgument(f"duplicate output tensor alias: {alias}")
        seen.add(alias)


def _read_warmup_records(path: Path) -> list[prediction_log_pb2.PredictionLog]:
    """Parse up to MAX_WARMUP_RECORDS records; LoadError beyond that or on a corrupt file."""
    records = []
    try:
        for index, serialized in enumerate(tf.data.TFRecordDataset(str(path)).as_numpy_iterator()):
            if index >= MAX_WARMUP_RECORDS:
                raise LoadError(
                    "Number of warmup records exceeds the maximum "
                    f"({MAX_WARMUP_RECORDS}) at {path}",
                    code="INVALID_ARGUMENT",
                )
            try:
                records.append(prediction_log_pb2.PredictionLog.FromString(serialized))
            except protobuf_message.DecodeError as exc:
                raise LoadError(
                    f"Failed to parse warmup record {index} from {path}", code="INVALID_ARGUMENT"
                ) from exc
    except tf.errors.DataLossError as exc:
        message = _op_message(exc)
        raise LoadError(
            f"{path}: {message}. Please verify your warmup data is in TFRecord format.",
            code="DATA_LOSS",
        ) from exc
    except tf.errors.OpError as exc:
        error = _error_from_op(exc)
        raise LoadError(f"{path}: {error.message}", code=error.code) from exc
    return records


def _read_saved_model_proto(path: Path) -> saved_model_pb2.SavedModel:
    """The SavedModel proto, with the status TF's C++ loader reports when it cannot be read."""
    proto = saved_model_pb2.SavedModel()
    binary, text = path / "saved_model.pb", path / "saved_model.pbtxt"
    try:
        if binary.is_file():
            proto.ParseFromString(binary.read_bytes())
        elif text.is_file():
            text_format.Parse(text.read_text(encoding="utf-8"), proto)
        else:
            raise LoadError(
                "Could not find SavedModel .pb or .pbtxt at supplied export directory path: "
                f"{path}. Check that the directory exists and that you have the right "
                "permissions for accessing it.",
                code="NOT_FOUND",
            )
    except (protobuf_message.DecodeError, text_format.ParseError, UnicodeDecodeError) as exc:
        source = binary if binary.is_file() else text
        raise LoadError(f"Can't parse {source} as binary proto", code="DATA_LOSS") from exc
    except OSError as exc:
        raise LoadError(f"Cannot read the SavedModel at {path}: {exc}", code="UNKNOWN") from exc
    return proto


def _serve_meta_graph(proto: saved_model_pb2.SavedModel, path: Path):
    for meta_graph in proto.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return meta_graph
    raise LoadError(
        f"Could not find meta graph def matching supplied tags: {{ {SERVE_TAG} }} in {path}. "
        "To inspect available tag-sets in the SavedModel, please use the SavedModel CLI: "
        "`saved_model_cli`",
        code="NOT_FOUND",
    )


def load_version(name: str, version: int, path: Path) -> LoadedVersion:
    """Load the SavedModel (tag serve) at `path` as version `version` of `name`.

    Raises LoadError with the code TF Serving reports for the same failure: NOT_FOUND for a
    missing saved_model.pb or serve tag, DATA_LOSS for an unparsable one, the TensorFlow
    status code for a failing restore, INTERNAL otherwise.
    """
    path = Path(path)
    meta_graph = _serve_meta_graph(_read_saved_model_proto(path), path)
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    try:
        with graph.as_default():
            _load_meta_graph(session, path)
            unrestored = _uninitialized_variables(session, graph, meta_graph)
    except Exception as exc:
        session.close()
        raise _load_failure(exc, path) from exc
    if unrestored:
        # TF Serving serves such a version too, and every request reading them fails.
        logger.warning(
            "%s version %d: %d variable(s) neither restored nor initialised by the SavedModel "
            "(%s); requests that read them fail with FAILED_PRECONDITION. Keras 3 models saved "
            "with tf.saved_model.save under a distribution strategy do this; export them with "
            "keras.export.ExportArchive (or model.export) instead",
            name,
            version,
            len(unrestored),
            ", ".join(unrestored[:5]) + (", ..." if len(unrestored) > 5 else ""),
        )
    return LoadedVersion(name, version, path, session, meta_graph)


def _signature_output_ops(graph: tf.Graph, meta_graph) -> list:
    """The ops behind every signature's outputs (an init-op signature names an op, not a
    tensor); names the graph lacks are skipped, and fail when a request asks for them."""
    ops = []
    for signature in meta_graph.signature_def.values():
        for info in signature.outputs.values():
            try:
                element = graph.as_graph_element(info.name, allow_operation=True)
            except (KeyError, ValueError):
                continue
            ops.append(getattr(element, "op", element))
    return ops


def _ops_signatures_read(graph: tf.Graph, meta_graph) -> set[str]:
    """Names of the ops the signatures' outputs depend on (data and control inputs)."""
    pending = _signature_output_ops(graph, meta_graph)
    seen: set[str] = set()
    while pending:
        op = pending.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        pending.extend(tensor.op for tensor in op.inputs)
        pending.extend(op.control_inputs)
    return seen


def _uninitialized_variables(
    session: tf.compat.v1.Session, graph: tf.Graph, meta_graph
) -> list[str]:
    """Resource variables that a signature reads and that the restore and the init ops left
    empty. Variables no signature reads do not count: a Keras 3 ExportArchive written under
    MirroredStrategy keeps an unused, never-restored handle for each layer variable beside the
    restored copy its functions capture."""
    read = _ops_signatures_read(graph, meta_graph)
    handles = [
        op.outputs[0]
        for op in graph.get_operations()
        if op.type == "VarHandleOp" and op.name in read
    ]
    if not handles:
        return []
    checks = [tf.raw_ops.VarIsInitializedOp(resource=handle) for handle in handles]
    initialized = session.run(checks)
    return [
        handle.op.get_attr("shared_name").decode() or handle.op.name
        for handle, ready in zip(handles, initialized, strict=True)
        if not ready
    ]


def _load_meta_graph(session: tf.compat.v1.Session, path: Path) -> None:
    """Import the serve MetaGraphDef into the session's graph, restore the variables and run
    the init ops (TF1 main op / legacy init op, TF2 __saved_model_init_op)."""
    # The v1 loader logs a deprecation notice on first use; it is the API for sessions.
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.setLevel(max(level, logging.ERROR))
    try:
        tf.compat.v1.saved_model.loader.load(session, [SERVE_TAG], str(path))
    finally:
        tf_logger.setLevel(level)


def _load_failure(exc: Exception, path: Path) -> LoadError:
    """LoadError with the status code of the TensorFlow error behind `exc`, if there is one."""
    # tf.saved_model.load re-raises some op errors as Python ones (NotFoundError as
    # FileNotFoundError); the op error in the chain carries the code TF Serving would report.
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, tf.errors.OpError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, tf.errors.OpError):
        message = _error_from_op(exc).message
    else:
        message = " ".join(str(exc).split())
    if cause is not None:
        code = _error_from_op(cause).code
    elif isinstance(exc, ValueError) and "not a valid checkpoint" in message:
        # The Python loader checks the checkpoint before restoring; TF Serving's C++ restore
        # fails on the same missing files with NOT_FOUND.
        code = "NOT_FOUND"
    else:
        code = "INTERNAL"
    return LoadError(f"Loading {path} failed: {message}", code=code)
