"""What a model's signatures expect, as plain Python, and the local check of a request's inputs.

`parse_signature_def_map` turns the `SignatureDefMap` of GetModelMetadata into `SignatureSpec`s
(dtypes as numpy names, "string" for DT_STRING; shapes with -1 for any size, None for unknown
rank). `prepare_inputs` checks inputs against one of them before anything is sent, so that a
wrong name, dtype or shape fails here with INVALID_ARGUMENT and a message naming the input,
instead of a round trip (or, against some servers, a kernel error deep inside the graph).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from convstack.client._protos import types_pb2
from convstack.client.errors import PredictionError, invalid_argument
from convstack.client.tensors import ENUM_TO_DTYPE

__all__ = [
    "STRING",
    "SignatureSpec",
    "TensorSpec",
    "check_output_filter",
    "dtype_label",
    "find_signature",
    "parse_signature_def_map",
    "prepare_inputs",
]

STRING = "string"
# Signatures such as `__saved_model_init_op` are SavedModel plumbing, not something to call.
_INTERNAL_PREFIX = "__"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: numpy dtype name ("string" for DT_STRING) and shape (-1: any size;
    None: unknown rank)."""

    dtype: str
    shape: tuple[int, ...] | None

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}

    @classmethod
    def from_dict(cls, value: Mapping) -> TensorSpec:
        shape = value["shape"]
        return cls(value["dtype"], None if shape is None else tuple(shape))


@dataclass(frozen=True)
class SignatureSpec:
    """A signature's inputs and outputs by key (the aliases clients use) and its method name."""

    name: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    method_name: str = ""

    def as_dict(self) -> dict:
        return {
            "inputs": {key: spec.as_dict() for key, spec in sorted(self.inputs.items())},
            "outputs": {key: spec.as_dict() for key, spec in sorted(self.outputs.items())},
            "method_name": self.method_name,
        }

    @classmethod
    def from_dict(cls, name: str, value: Mapping) -> SignatureSpec:
        """The inverse of as_dict (e.g. of one entry of `PredictionClient.metadata()`)."""
        return cls(
            name,
            {key: TensorSpec.from_dict(spec) for key, spec in value["inputs"].items()},
            {key: TensorSpec.from_dict(spec) for key, spec in value["outputs"].items()},
            value.get("method_name", ""),
        )


def dtype_label(enum: int) -> str:
    """numpy's name of a DataType ("float32", "int64"), "string", or the enum's own name in
    lower case without its DT_ prefix for types numpy has no counterpart for ("resource")."""
    if enum == types_pb2.DT_STRING:
        return STRING
    dtype = ENUM_TO_DTYPE.get(enum)
    if dtype is not None:
        return dtype.name
    try:
        return types_pb2.DataType.Name(enum).removeprefix("DT_").lower()
    except ValueError:
        return f"dtype_{enum}"


def _tensor_spec(info) -> TensorSpec:
    shape_proto = info.tensor_shape
    if shape_proto.unknown_rank:
        return TensorSpec(dtype_label(info.dtype), None)
    return TensorSpec(dtype_label(info.dtype), tuple(dim.size for dim in shape_proto.dim))


def parse_signature_def_map(signature_def_map) -> dict[str, SignatureSpec]:
    """Signature name -> SignatureSpec for every callable signature of a `SignatureDefMap`."""
    specs = {}
    for name, signature in sorted(signature_def_map.signature_def.items()):
        if name.startswith(_INTERNAL_PREFIX):
            continue
        specs[name] = SignatureSpec(
            name=name,
            inputs={key: _tensor_spec(info) for key, info in signature.inputs.items()},
            outputs={key: _tensor_spec(info) for key, info in signature.outputs.items()},
            method_name=signature.method_name,
        )
    return specs


def find_signature(specs: Mapping[str, SignatureSpec], name: str, model: str) -> SignatureSpec:
    """The named signature, or the error TF Serving gives for an unknown one."""
    spec = specs.get(name)
    if spec is None:
        known = ", ".join(sorted(specs)) or "none"
        raise PredictionError(
            "FAILED_PRECONDITION",
            f'Serving signature key "{name}" not found (model {model!r} has: {known})',
            {"signature": name},
        )
    return spec


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def _convert_python(name: str, value, expected: str) -> np.ndarray:
    """Lists and Python scalars take the signature's dtype, unless that would lose meaning
    (floats into an int input, text into a number)."""
    if expected == STRING:
        return np.array(value, dtype=object)
    try:
        inferred = np.asarray(value)
        target = np.dtype(expected)
        if inferred.dtype.kind in "USO" or not np.can_cast(inferred.dtype, target, "same_kind"):
            raise invalid_argument(
                f"input {name!r}: expected dtype {expected}, got a list of {inferred.dtype}",
                input=name,
                expected=expected,
                given=str(inferred.dtype),
            )
        return np.asarray(value, dtype=target)
    except (TypeError, ValueError, OverflowError) as exc:
        raise invalid_argument(
            f"input {name!r}: cannot convert to {expected}: {exc}", input=name, expected=expected
        ) from None


def _check_dtype(name: str, array: np.ndarray, expected: str) -> None:
    given = array.dtype
    if expected == STRING:
        ok = given.kind in "SU" or (
            given.kind == "O" and all(isinstance(item, (bytes, str)) for item in array.flat)
        )
    else:
        try:
            ok = given == np.dtype(expected)
        except TypeError:  # a DataType numpy cannot hold: nothing we could send matches it
            ok = False
    if not ok:
        given_text = STRING if given.kind in "SU" else str(given)
        raise invalid_argument(
            f"input {name!r}: expected dtype {expected}, got {given_text}",
            input=name,
            expected=expected,
            given=given_text,
        )


def _check_shape(name: str, array: np.ndarray, expected: tuple[int, ...] | None) -> None:
    if expected is None:
        return
    given = array.shape
    fits = len(given) == len(expected) and all(
        want < 0 or want == have for want, have in zip(expected, given, strict=True)
    )
    if not fits:
        raise invalid_argument(
            f"input {name!r}: expected shape {_shape_text(expected)} (-1: any size), "
            f"got {_shape_text(given)}",
            input=name,
            expected=list(expected),
            given=list(given),
        )


def _as_dict(spec: SignatureSpec, inputs) -> Mapping[str, object]:
    if isinstance(inputs, Mapping):
        return inputs
    if len(spec.inputs) != 1:
        raise invalid_argument(
            f"signature {spec.name!r} has {len(spec.inputs)} inputs "
            f"({', '.join(sorted(spec.inputs))}): pass a dict of them",
            signature=spec.name,
        )
    return {next(iter(spec.inputs)): inputs}


def _check_names(spec: SignatureSpec, names: Sequence[str]) -> None:
    unknown = sorted(set(names) - set(spec.inputs))
    missing = sorted(set(spec.inputs) - set(names))
    expected = ", ".join(sorted(spec.inputs))
    if unknown:
        raise invalid_argument(
            f"unknown input {unknown[0]!r} for signature {spec.name!r} (its inputs: {expected})",
            input=unknown[0],
            signature=spec.name,
        )
    if missing:
        raise invalid_argument(
            f"missing input {missing[0]!r} for signature {spec.name!r} (its inputs: {expected})",
            input=missing[0],
            signature=spec.name,
        )


def prepare_inputs(spec: SignatureSpec | None, inputs, *, validate: bool = True) -> dict:
    """The inputs of one request as a dict of numpy arrays (or bytes/str values for strings).

    `inputs` is a dict, or one value for a single-input signature. Lists and Python scalars are
    converted to the signature's dtype; numpy arrays must already have it (no silent casts).
    With `validate=False` (or no spec) values pass unchecked and lists keep numpy's inference.
    Raises PredictionError(INVALID_ARGUMENT) naming the offending input.
    """
    if spec is None:
        if not isinstance(inputs, Mapping):
            raise invalid_argument("without a signature to consult, inputs must be a dict")
        return {name: _plain(value) for name, value in inputs.items()}
    named = _as_dict(spec, inputs)
    if not validate:
        return {name: _plain(value) for name, value in named.items()}
    _check_names(spec, list(named))
    prepared = {}
    for name, value in named.items():
        expected = spec.inputs[name]
        if isinstance(value, (np.ndarray, np.generic)):
            array = np.asarray(value)
        else:
            array = _convert_python(name, value, expected.dtype)
        _check_dtype(name, array, expected.dtype)
        _check_shape(name, array, expected.shape)
        prepared[name] = array
    return prepared


def _plain(value):
    return value if isinstance(value, (np.ndarray, bytes, str)) else np.asarray(value)


def check_output_filter(spec: SignatureSpec, output_filter: Sequence[str]) -> None:
    """Unknown output aliases fail locally, as the server would fail them (INVALID_ARGUMENT)."""
    for alias in output_filter:
        if alias not in spec.outputs:
            raise invalid_argument(
                f"output_filter: unknown output {alias!r} for signature {spec.name!r} "
                f"(its outputs: {', '.join(sorted(spec.outputs))})",
                output=alias,
            )
