"""The numeric array of a large REST body, read without building a Python object per number.

A batch of images as JSON is tens of thousands of numbers in nested lists; parsing it into
Python lists (orjson) and converting those with `np.array` costs about 6 ms for 32 digits images
of 28x28. Here pysimdjson parses the body and flattens its one array into a buffer of doubles in
C (1.1 ms), and the array's brackets and commas, compared with those a regular array of its shape
would have, prove it regular (0.5 ms).

It only answers for what it can prove: a body with exactly one array, holding no string or
object, whose brackets and commas are a regular array's, and only numbers at the deepest level.
Anything else gives None, and the caller takes its general path, which also owns every error
message. Pure: bytes in, arrays out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import simdjson

# The deepest array taken here; deeper ones (numpy's own limit is 64) take the general path.
MAX_RANK = 32
# What lies between an array's brackets and commas when it holds only numbers.
_NUMBER_BYTES = b"0123456789+-.eE \t\n\r"
# pysimdjson's errors for a body it refuses or a value that is not what was asked for.
_SIMDJSON_ERRORS = (ValueError, RuntimeError, TypeError, KeyError, IndexError)


@dataclass(frozen=True)
class NumericBody:
    """A body's one array, as doubles, and where it sits.

    `key` is "instances" or "inputs"; `inner_key` names the array inside an "inputs" object
    (None when "inputs" is the array itself); `signature_name` is the body's, "" when absent.
    """

    key: str
    inner_key: str | None
    signature_name: str
    values: np.ndarray


def numeric_body(raw: bytes) -> NumericBody | None:
    """The body's one regular array of numbers, flattened to float64 and shaped; None when the
    body is anything else (the caller's general path decides)."""
    structure = array_structure(raw)
    if structure is None:
        return None
    try:
        document = simdjson.Parser().parse(raw)
        found = _locate(document)
        if found is None:
            return None
        key, inner_key, array, signature_name = found
        shape = _first_lengths(array, structure)
        # The length first: lengths along the first elements need not bound the whole.
        if shape is None or len(structure) != regular_structure_length(shape):
            return None
        if structure != regular_structure(shape):
            return None
        flat = np.frombuffer(array.as_buffer(of_type="d"), np.float64)
    except _SIMDJSON_ERRORS:
        return None
    if flat.size == 0 or flat.size != math.prod(shape):
        return None  # an empty array, which has the brackets of an array of one
    return NumericBody(key, inner_key, signature_name, flat.reshape(shape))


def array_structure(raw: bytes) -> bytes | None:
    """The brackets and commas from the body's first `[` to its last `]`, or None when that
    span holds a string, an object or several arrays. (A span inside one string passes here;
    its body then has no array where `numeric_body` looks.)"""
    first, last = raw.find(b"["), raw.rfind(b"]")
    if first == -1 or last < first:
        return None
    span = raw[first : last + 1]
    if b'"' in span or b"{" in span or b"}" in span:
        return None
    return span.translate(None, _NUMBER_BYTES)


def regular_structure(shape: tuple[int, ...]) -> bytes:
    """The brackets and commas of an array of `shape` (every length at least one)."""
    written = b"[" + b"," * (shape[-1] - 1) + b"]"
    for length in reversed(shape[:-1]):
        written = b"[" + b",".join([written] * length) + b"]"
    return written


def regular_structure_length(shape: tuple[int, ...]) -> int:
    """len(regular_structure(shape)), without writing it."""
    length = shape[-1] + 1
    for count in reversed(shape[:-1]):
        length = count * length + (count - 1) + 2
    return length


def _first_lengths(array, structure: bytes) -> tuple[int, ...] | None:
    """The lengths along the array's first elements, as deep as its brackets go; None when
    deeper than MAX_RANK or when a first element is not an array where the brackets say."""
    rank = len(structure) - len(structure.lstrip(b"["))
    if rank > MAX_RANK:
        return None
    shape = []
    for level in range(rank):
        if not isinstance(array, simdjson.Array) or len(array) == 0:
            return None
        shape.append(len(array))
        if level < rank - 1:
            array = array[0]
    return tuple(shape)


def _locate(document):
    """(key, inner key, the array, signature name) of a body {"instances": [...]},
    {"inputs": [...]} or {"inputs": {"name": [...]}}, with an optional string "signature_name"
    and no repeated keys; None for any other document."""
    if not isinstance(document, simdjson.Object):
        return None
    keys = list(document.keys())
    if len(set(keys)) != len(keys) or ("instances" in keys) == ("inputs" in keys):
        return None
    signature_name = document.get("signature_name", "")
    if not isinstance(signature_name, str):
        return None
    key = "instances" if "instances" in keys else "inputs"
    value, inner_key = document[key], None
    if key == "inputs" and isinstance(value, simdjson.Object):
        inner_keys = list(value.keys())
        if len(inner_keys) != 1:
            return None
        inner_key = inner_keys[0]
        value = value[inner_key]
    if not isinstance(value, simdjson.Array):
        return None
    return key, inner_key, value, signature_name
