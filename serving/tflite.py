"""A version served from `<version>/model.tflite` (TF Serving's --prefer_tflite_model).

As TF Serving's tflite_session.cc: the model's SignatureDefs come from its
`signature_defs_metadata` (TensorFlow SignatureDefs stored by the converter's signature tools),
with tensor names matched to the interpreter's, also under their legacy form without `:0`; a
model without them gets one generated `serving_default` whose inputs and outputs are the
interpreter's tensors, keyed by name. A pool of interpreters serves concurrent requests, one
request per interpreter at a time; each resizes its inputs to the request's shapes (so any
batch size runs) and re-allocates only when a shape changes.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
from flatbuffers import flexbuffers
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow.lite.python import schema_py_generated as tflite_schema

from convstack.common.logs import quiet_tflite_interpreter
from convstack.serving.errors import Internal, InvalidArgument
from convstack.serving.servable import DEFAULT_SIGNATURE, LoadError, Servable, load_version

TFLITE_FILE = "model.tflite"
SIGNATURE_DEFS_METADATA = "signature_defs_metadata"
PREDICT_METHOD = "tensorflow/serving/predict"


def legacy_name(tensor_name: str) -> str:
    """A TensorFlow tensor name as early TFLite converters wrote it (without `:0`)."""
    return tensor_name.split(":", 1)[0]


def _metadata_signature_defs(buffer: bytes) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The SignatureDefs stored in the model's metadata (a flexbuffer map of serialized
    SignatureDefs by key); empty when there are none."""
    model = tflite_schema.Model.GetRootAsModel(buffer, 0)
    for index in range(model.MetadataLength()):
        metadata = model.Metadata(index)
        if metadata.Name().decode() != SIGNATURE_DEFS_METADATA:
            continue
        data = model.Buffers(metadata.Buffer()).DataAsNumpy().tobytes()
        entries = flexbuffers.GetRoot(data).AsMap
        result = {}
        for key, value in zip(entries.Keys, entries.Values, strict=True):
            signature = meta_graph_pb2.SignatureDef()
            signature.ParseFromString(value.AsBlob if value.IsBlob else value.AsStringBytes)
            result[key.AsKey] = signature
        return result
    return {}


def _tensor_info(detail: dict) -> meta_graph_pb2.TensorInfo:
    info = meta_graph_pb2.TensorInfo(name=detail["name"])
    info.dtype = tf.as_dtype(detail["dtype"]).as_datatype_enum
    for size in detail["shape"]:
        info.tensor_shape.dim.add().size = int(size)
    return info


def _generated_signature(inputs: list[dict], outputs: list[dict]) -> meta_graph_pb2.SignatureDef:
    signature = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
    for detail in inputs:
        signature.inputs[legacy_name(detail["name"])].CopyFrom(_tensor_info(detail))
    for detail in outputs:
        signature.outputs[legacy_name(detail["name"])].CopyFrom(_tensor_info(detail))
    return signature


def _fix_names(
    signature: meta_graph_pb2.SignatureDef, input_names: set[str], output_names: set[str], path
) -> None:
    """Point every signature tensor at an interpreter tensor (tflite_session.cc's
    FixTfLiteTensorName): as written, or under its legacy name."""
    for kind, infos, names in (
        ("input", signature.inputs, input_names),
        ("output", signature.outputs, output_names),
    ):
        for key, info in infos.items():
            if info.name in names:
                continue
            if legacy_name(info.name) not in names:
                raise LoadError(
                    f"{path}: Signature {kind} {key} references an unknown tensor: Unknown "
                    f"tensor '{info.name}'.",
                    code="INTERNAL",
                )
            info.name = legacy_name(info.name)


class _Worker:
    """One interpreter and the input shapes it is allocated for."""

    def __init__(self, buffer: bytes):
        with quiet_tflite_interpreter():
            self.interpreter = tf.lite.Interpreter(model_content=buffer)
            self.interpreter.allocate_tensors()
        self.shapes = {d["index"]: tuple(d["shape"]) for d in self.interpreter.get_input_details()}

    def run(self, feeds: dict[int, np.ndarray], fetches: list[int]) -> list[np.ndarray]:
        resized = False
        for index, array in feeds.items():
            if self.shapes.get(index) != array.shape:
                self.interpreter.resize_tensor_input(index, list(array.shape), strict=False)
                self.shapes[index] = array.shape
                resized = True
        if resized:
            self.interpreter.allocate_tensors()
        for index, array in feeds.items():
            self.interpreter.set_tensor(index, array)
        self.interpreter.invoke()
        return [np.array(self.interpreter.get_tensor(index)) for index in fetches]


class TfLiteVersion(Servable):
    """A version served by a pool of TFLite interpreters."""

    def __init__(self, name: str, version: int, path: Path, buffer: bytes, pool_size: int = 1):
        first = _Worker(buffer)
        inputs = first.interpreter.get_input_details()
        outputs = first.interpreter.get_output_details()
        self._input_index = {d["name"]: d["index"] for d in inputs}
        self._output_index = {d["name"]: d["index"] for d in outputs}
        signature_defs = _metadata_signature_defs(buffer)
        if signature_defs:
            for signature in signature_defs.values():
                _fix_names(signature, set(self._input_index), set(self._output_index), path)
        else:
            signature_defs = {DEFAULT_SIGNATURE: _generated_signature(inputs, outputs)}
        super().__init__(name, version, path, signature_defs)
        self._workers: queue.Queue[_Worker] = queue.Queue()
        self._workers.put(first)
        for _ in range(max(1, pool_size) - 1):
            self._workers.put(_Worker(buffer))

    def run_tensors(
        self, feeds: Mapping[str, np.ndarray], fetches: Sequence[str]
    ) -> list[np.ndarray]:
        """Run one interpreter of the pool (waiting for a free one)."""
        try:
            inputs = {self._input_index[name]: np.asarray(array) for name, array in feeds.items()}
            outputs = [self._output_index[name] for name in fetches]
        except KeyError as exc:
            raise InvalidArgument(f"Unknown tensor {exc.args[0]!r}.") from None
        worker = self._workers.get()
        try:
            return worker.run(inputs, outputs)
        except ValueError as exc:  # a dtype or shape the interpreter cannot take
            raise InvalidArgument(f"TfLite: {' '.join(str(exc).split())}") from exc
        except RuntimeError as exc:
            raise Internal(f"TfLite: {' '.join(str(exc).split())}") from exc
        finally:
            self._workers.put(worker)


def load_tflite_version(name: str, version: int, path: Path, pool_size: int = 1) -> TfLiteVersion:
    """Load `path/model.tflite` as version `version` of `name`; LoadError if it cannot."""
    model_file = Path(path) / TFLITE_FILE
    try:
        buffer = model_file.read_bytes()
    except OSError as exc:
        raise LoadError(f"Cannot read {model_file}: {exc}", code="NOT_FOUND") from exc
    try:
        return TfLiteVersion(name, version, Path(path), buffer, pool_size)
    except LoadError:
        raise
    except (ValueError, RuntimeError) as exc:
        raise LoadError(
            f"Cannot build Interpreter from {model_file}: {' '.join(str(exc).split())}",
            code="INVALID_ARGUMENT",
        ) from exc


def version_loader(
    prefer_tflite_model: bool = False, num_tflite_pools: int = 1, interpreters_per_pool: int = 1
) -> Callable[[str, int, Path], Servable]:
    """How the manager loads a version: with `prefer_tflite_model`, from `<version>/model.tflite`
    when there is one (TF Serving's saved_model_bundle_factory rule), else the SavedModel.
    Requests run on num_tflite_pools x interpreters_per_pool interpreters at once."""
    pool_size = max(1, num_tflite_pools) * max(1, interpreters_per_pool)

    def load(name: str, version: int, path: Path) -> Servable:
        if prefer_tflite_model and (Path(path) / TFLITE_FILE).is_file():
            return load_tflite_version(name, version, path, pool_size)
        return load_version(name, version, path)

    return load
