"""TensorFlow Serving's REST JSON codec: request bodies -> numpy, outputs -> JSON-ready dicts.

Pure and transport-free: no HTTP here. Behaviour and error wording follow TF Serving's
`util/json_tensor.cc` and `model_servers/http_rest_api_util.cc`:

* row format `{"instances": [...]}`: one entry per batch row, either plain values (one input) or
  objects keyed by input name (every object has exactly the signature's keys); inputs get a
  leading batch dimension. Columnar format `{"inputs": value-or-object}`: tensors as given.
* The body is parsed as TF Serving's rapidjson does (kParseIterativeFlag | kParseNanAndInfFlag |
  kParseStopWhenDoneFlag): NaN / Infinity / -Infinity are numbers, whatever follows the root
  value is ignored, a leading UTF-8 BOM is skipped, a number beyond double's range is "Number
  too big to be stored in double.", an unpaired high surrogate escape is "The surrogate pair in
  string is invalid." (an unpaired low one is kept, as its three UTF-8 bytes). Integer literals
  beyond int64/uint64 are doubles, as in rapidjson. Nesting is bounded (MAX_JSON_DEPTH) before
  Python's recursive decoder sees the body.
* JSON numbers convert to the signature's dtype under TF Serving's rules: integer dtypes take
  only integer literals in range; float and double take any number, rounded to the dtype
  (1.797e308 is inf as a float; TF Serving dropped its "loss of precision" check); bool takes
  true/false only.
  DT_STRING takes JSON strings (UTF-8) and `{"b64": "..."}` objects. half, bfloat16, uint16 and
  complex inputs are UNIMPLEMENTED in TF Serving's REST API, and here.
* Output strings of tensors whose name ends in `_bytes` are `{"b64": ...}`; float32 values are
  written with their shortest round-tripping decimal (0.1, not 0.10000000149011612), as TF
  Serving does. NaN and +-Infinity become the bare tokens `NaN`, `Infinity`, `-Infinity`, which
  `json.dumps` (allow_nan=True, its default) and TF Serving both write.

Numeric inputs take a vectorised path (`np.array` over the parsed lists) whenever it provably
gives what TF Serving's element-by-element walk would; anything else (strings, b64, errors,
edge values) takes the exact walk, which also produces TF Serving's error for the first bad
element.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import orjson
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2

from convstack.serving import rest_json_arrays
from convstack.serving.errors import InvalidArgument, Unimplemented

__all__ = [
    "COLUMNAR",
    "MAX_JSON_DEPTH",
    "ROW",
    "InputSpec",
    "RestFormatError",
    "RestUnimplementedError",
    "SignatureInputs",
    "TensorSpecLike",
    "debug_string",
    "decode_b64",
    "float32_json_values",
    "format_metadata",
    "format_predict_response",
    "format_status",
    "is_b64_object",
    "json_type",
    "parse_json_object",
    "parse_predict_body",
    "signature_name_of",
    "utf8_bytes",
]

ROW = "row"
COLUMNAR = "columnar"

_B64 = "b64"
_BYTES_SUFFIX = "_bytes"

# TensorFlow's DataTypeString() names, used in TF Serving's messages.
_TF_TYPE_NAMES = {
    "float32": "float",
    "float64": "double",
    "float16": "half",
    "bfloat16": "bfloat16",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "bool": "bool",
    "complex64": "complex64",
    "complex128": "complex128",
    "object": "string",
}
# tensorflow.DataType enum values (types.proto) -> numpy dtype names.
_ENUM_NAMES = {
    1: "float32",
    2: "float64",
    3: "int32",
    4: "uint8",
    5: "int16",
    6: "int8",
    7: "object",
    8: "complex64",
    9: "int64",
    10: "bool",
    14: "bfloat16",
    17: "uint16",
    18: "complex128",
    19: "float16",
    22: "uint32",
    23: "uint64",
}
# int8/int16/uint8 travel in TF's int32 `int_val` field: JSON must be an int32, then C-cast.
_INT32_FIELD = {"int8", "int16", "int32", "uint8"}
_INT_RANGES = {
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
}
_FLOATS = {"float32", "float64"}
_MAX_RANK = 64  # numpy's limit on dimensions
# Arrays and objects nested deeper than this are refused before parsing (rapidjson parses
# iteratively, without a limit; Python's decoder recurses). Valid tensors nest at most 65 deep.
MAX_JSON_DEPTH = 512
# TF Serving's JsonValueToDebugString stops writing a value once this many bytes are out.
_DEBUG_STRING_BYTES = 256

# rapidjson's wording for the Python json module's parse errors (TF Serving echoes rapidjson's).
_PARSE_ERRORS = {
    "Expecting value": "Invalid value.",
    "Extra data": "The document root must not be followed by other values.",
    "Expecting property name enclosed in double quotes": "Missing a name for object member.",
    "Expecting ':' delimiter": "Missing a colon after a name of object member.",
    "Unterminated string starting at": "Missing a closing quotation mark in string.",
    "Invalid \\escape": "Invalid escape character in string.",
    "Invalid \\uXXXX escape": "Incorrect hex digit after \\u escape in string.",
    "Invalid control character at": "Invalid escape character in string.",
}
_NUMBER_TOO_BIG = "Number too big to be stored in double."
_SURROGATE = "The surrogate pair in string is invalid."


class RestFormatError(InvalidArgument, ValueError):
    """A request TF Serving's REST API rejects with INVALID_ARGUMENT (HTTP 400)."""


class RestUnimplementedError(Unimplemented, ValueError):
    """A JSON value for a dtype TF Serving's REST API cannot convert (UNIMPLEMENTED, HTTP 501)."""


class TensorSpecLike(Protocol):
    """Anything with a numpy-compatible `dtype` (a tf.DType works too); shape is not needed."""

    dtype: Any


InputSpec = TensorSpecLike | tuple  # or (dtype, shape), shape unused here
SignatureInputs = Mapping[str, InputSpec] | Callable[[str], Mapping[str, InputSpec]]


# ---------------------------------------------------------------------------------------------
# JSON helpers

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')


def _escape_char(match: re.Match) -> str:
    char = match.group()
    return _ESCAPES.get(char) or f"\\u{ord(char):04X}"


def _quote(text: str) -> str:
    """A JSON string as rapidjson's Writer writes it (non-ASCII raw, control chars \\u00XX)."""
    return '"' + _NEEDS_ESCAPE.sub(_escape_char, text) + '"'


def _rapidjson_double(number: float) -> str | None:
    """rapidjson's Writer::Double text (Grisu shortest digits, then its Prettify layout), or
    None for NaN and infinities, which its Writer refuses to write."""
    if not math.isfinite(number):
        return None
    sign = "-" if math.copysign(1.0, number) < 0 else ""
    if number == 0:
        return sign + "0.0"
    mantissa, _, exponent = repr(abs(number)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    k = (int(exponent) if exponent else 0) - len(fraction)
    stripped = digits.rstrip("0")
    k += len(digits) - len(stripped)
    digits = stripped
    length = len(digits)
    kk = length + k  # 10^(kk-1) <= number < 10^kk
    if k >= 0 and kk <= 21:
        text = digits + "0" * k + ".0"
    elif 0 < kk <= 21:
        text = f"{digits[:kk]}.{digits[kk:]}"
    elif -6 < kk <= 0:
        text = "0." + "0" * -kk + digits
    elif length == 1:
        text = f"{digits}e{kk - 1}"
    else:
        text = f"{digits[0]}.{digits[1:]}e{kk - 1}"
    return sign + text


def _dump(value, limit: int = _DEBUG_STRING_BYTES) -> str:
    """A JSON value as TF Serving quotes it in messages: JsonValueToDebugString, i.e. rapidjson's
    PrettyWriter (4-space indent, arrays on one line) that stops before the first token it would
    start once `limit` bytes are written. Iterative, so any nesting depth is fine."""
    out: list[str] = []
    size = 0
    # Each level: [is_array, values_written, iterator over its items].
    levels: list[list] = []

    def emit(text: str) -> bool:
        nonlocal size
        if size >= limit:
            return False
        out.append(text)
        size += len(text.encode("utf-8", "surrogatepass"))
        return True

    def prefix() -> str:
        if not levels:
            return ""
        level = levels[-1]
        count = level[1]
        level[1] += 1
        if level[0]:
            return ", " if count else ""
        if count % 2:
            return ": "
        return ("," if count else "") + "\n" + " " * 4 * len(levels)

    def scalar(item) -> bool:
        if size >= limit:
            return False
        lead = prefix()
        if item is None:
            token = "null"
        elif isinstance(item, bool):
            token = "true" if item else "false"
        elif isinstance(item, str):
            token = _quote(item)
        elif isinstance(item, float):
            token = _rapidjson_double(item)
            if token is None:  # the prefix is out, then the writer gives up
                emit(lead)
                return False
        else:
            token = str(item)
        return emit(lead + token)

    def start(item) -> bool:
        if size >= limit:
            return False
        is_array = isinstance(item, list)
        if not emit(prefix() + ("[" if is_array else "{")):
            return False
        items = iter(item) if is_array else iter(item.items())
        levels.append([is_array, 0, items])
        return True

    def visit(item) -> bool:
        return start(item) if isinstance(item, (list, dict)) else scalar(item)

    if not visit(value):
        return "".join(out)
    while levels:
        is_array, _, items = levels[-1]
        entry = next(items, _END)
        if entry is _END:
            if size >= limit:
                break
            count = levels.pop()[1]
            if is_array:
                emit("]")
            else:
                emit(("\n" + " " * 4 * len(levels) if count else "") + "}")
            continue
        if is_array:
            if not visit(entry):
                break
        elif not (scalar(entry[0]) and visit(entry[1])):
            break
    return "".join(out)


_END = object()


def _json_type(value) -> str:
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def _status(error: Exception) -> str:
    """absl::Status::ToString() of a wrapped error, e.g. "INVALID_ARGUMENT: <message>"."""
    return f"{error.code}: {error.message}"


class _NumberTooBig(Exception):
    """Raised from the decoder's number hooks; carries the literal to locate it."""


_DBL_MAX_TENTH = 1.7976931348623157e307  # rapidjson stops growing a big integer past DBL_MAX/10
_UINT64_DIGITS = 20


def _too_big(literal: str) -> bool:
    """Whether rapidjson 1.1.0 (TF Serving's parser) refuses this number literal as too big.

    It reads the integer part in 32 then 64 bits, continues in a double once the value would
    overflow (u)int64 and refuses any digit arriving after that double reached DBL_MAX / 10;
    a positive exponent may be at most 308 plus the fraction digits it kept."""
    negative = literal.startswith("-")
    mantissa, has_exponent, exponent = literal.lstrip("-").replace("E", "e").partition("e")
    whole, _, fraction = mantissa.partition(".")
    overflowed = False
    if len(whole) >= _UINT64_DIGITS:
        limit = 2**63 if negative else 2**64 - 1
        value = 0
        for index, digit in enumerate(whole):
            grown = value * 10 + int(digit)
            if grown > limit:
                overflowed = True
                number = float(value)
                for rest in whole[index:]:
                    if number >= _DBL_MAX_TENTH:
                        return True
                    number = number * 10 + int(rest)
                break
            value = grown
    if not has_exponent or exponent.startswith("-"):
        return False
    exponent = exponent.lstrip("+").lstrip("0") or "0"
    if len(exponent) > 10:
        return True
    kept = 0
    if fraction and not overflowed:
        significant = len(whole) - 1 if whole != "0" else 0
        significand = int(whole)
        index = 0
        while index < len(fraction) and significand <= 2**53 - 1:  # rapidjson's fast path
            significand = significand * 10 + int(fraction[index])
            kept += 1
            index += 1
            if significand:
                significant += 1
        number = float(significand)
        for digit in fraction[index:]:
            if significant >= 17:
                break
            number = number * 10 + int(digit)
            kept += 1
            if number > 0:
                significant += 1
    return int(exponent) > 308 + kept


def _parse_float(literal: str) -> float:
    if ("e" in literal or "E" in literal or len(literal) > 300) and _too_big(literal):
        raise _NumberTooBig(literal)
    return float(literal)


def _parse_int(literal: str):
    if len(literal) < 19:
        return int(literal)
    if _too_big(literal):
        raise _NumberTooBig(literal)
    value = int(literal)
    # rapidjson keeps integers in int64 / uint64; anything else is a double.
    return value if -(2**63) <= value <= 2**64 - 1 else float(literal)


_DECODER = json.JSONDecoder(parse_float=_parse_float, parse_int=_parse_int)
_WHITESPACE = " \t\n\r"
_NUMBER_OR_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?', re.DOTALL)
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _byte_offset(text: str, pos: int, skipped: int) -> int:
    """rapidjson reports byte offsets; Python's decoder counts characters."""
    return len(text[:pos].encode("utf-8", "surrogatepass")) + skipped


def _parse_error(reason: str, text: str, pos: int, skipped: int) -> RestFormatError:
    offset = _byte_offset(text, pos, skipped)
    return RestFormatError(f"JSON Parse error: {reason} at offset: {offset}")


def _too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> int | None:
    """The position of the first array or object opening beyond `limit` levels, or None.

    Vectorised over the positions of quotes and brackets, so it costs little even on large
    bodies; bodies with few brackets skip it altogether."""
    if text.count("[") + text.count("{") <= limit:
        return None
    data = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return _depth_beyond(data, "\\" in text, limit)


def _depth_beyond(data: np.ndarray, backslashes: bool, limit: int) -> int | None:
    """`_too_deep` over code units: UTF-32 characters, or UTF-8 bytes (whose multi-byte
    sequences never hold an ASCII byte, so quotes and brackets are found alike; the position
    is then a byte offset)."""
    quotes = np.flatnonzero(data == 34)
    if len(quotes) and backslashes:
        escaped = quotes[(quotes > 0) & (data[np.maximum(quotes - 1, 0)] == 92)]
        drop = []
        for position in escaped.tolist():
            run = 0
            while position - run - 1 >= 0 and data[position - run - 1] == 92:
                run += 1
            if run % 2:
                drop.append(position)
        if drop:
            quotes = np.setdiff1d(quotes, np.array(drop, dtype=quotes.dtype))
    opens = np.flatnonzero((data == 91) | (data == 123))
    closes = np.flatnonzero((data == 93) | (data == 125))
    # A bracket is inside a string when an odd number of (unescaped) quotes precede it.
    opens = opens[np.searchsorted(quotes, opens) % 2 == 0]
    closes = closes[np.searchsorted(quotes, closes) % 2 == 0]
    events = np.concatenate([opens, closes])
    steps = np.concatenate([np.ones(len(opens), np.int64), -np.ones(len(closes), np.int64)])
    order = np.argsort(events, kind="stable")
    depth = np.cumsum(steps[order])
    beyond = np.flatnonzero(depth > limit)
    return int(events[order][beyond[0]]) if len(beyond) else None


def _check_surrogates(text: str, skipped: int) -> None:
    """rapidjson 1.1.0 refuses a high surrogate escape not followed by a low one; a lone low
    surrogate passes (and becomes its three UTF-8 bytes)."""
    if not _MAYBE_SURROGATE.search(text):
        return
    pending_high = None
    for match in _ESCAPE.finditer(text):
        code = int(match.group(1), 16) if match.group(1) else None
        if pending_high is not None:
            if code is None or not 0xDC00 <= code <= 0xDFFF or match.start() != pending_high[1]:
                raise _parse_error(_SURROGATE, text, pending_high[0], skipped)
            pending_high = None
            continue
        if code is not None and 0xD800 <= code <= 0xDBFF:
            pending_high = (match.start(), match.end())
    if pending_high is not None:
        raise _parse_error(_SURROGATE, text, pending_high[0], skipped)


# The fast path: orjson parses most bodies several times faster than the stdlib decoder with
# the rapidjson number hooks. It refuses on its own everything those rules treat specially
# (NaN and Infinity tokens, numbers beyond double's range, content after the root value, a BOM,
# unpaired surrogates, control characters, nesting beyond 1024), and it reads integers as
# rapidjson does (int64/uint64, else a double). What it would accept where rapidjson refuses is
# screened on the bytes first (`_needs_exact_parse`); such bodies, and every body it refuses,
# take the exact parser, which gives TF Serving's value or error.
# A whole part this long may reach the double range where rapidjson stops (DBL_MAX / 10).
_LONG_DIGIT_RUN = 300
# Below this, orjson and np.array cost less than the array scan's fixed numpy overhead.
_NUMERIC_BODY_BYTES = 2048


def _needs_exact_parse(raw: bytes) -> bool:
    """Whether a body could hold what orjson accepts and rapidjson refuses: nesting beyond
    MAX_JSON_DEPTH, a positive exponent of three digits or more ("0e400" is 0.0 for orjson,
    too big for rapidjson), or a run of digits long enough to overflow its integer reading."""
    if _big_exponent(raw) or (len(raw) >= _LONG_DIGIT_RUN and _has_long_digit_run(raw)):
        return True
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
        data = np.frombuffer(raw, dtype=np.uint8)
        return _depth_beyond(data, b"\\" in raw, MAX_JSON_DEPTH) is not None
    return False


def _big_exponent(raw: bytes) -> bool:
    """Whether some number has a positive exponent of three digits or more (or an `e` that
    may be one): a scan with bytes.find, the e's being few in most bodies."""
    for letter in (b"e", b"E"):
        position = raw.find(letter)
        while position != -1:
            if position > 0 and raw[position - 1] in _DIGIT_BYTES:
                after = raw[position + 1 : position + 5]
                if after[:1] == b"+":
                    after = after[1:]
                if len(after) >= 3 and all(byte in _DIGIT_BYTES for byte in after[:3]):
                    return True
            position = raw.find(letter, position + 1)
    return False


_DIGIT_BYTES = frozenset(b"0123456789")
# A run of _LONG_DIGIT_RUN digits is a run of as many zeros once every digit reads as one.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_ZEROS = b"0" * _LONG_DIGIT_RUN


def _has_long_digit_run(text: bytes) -> bool:
    """Whether `text` holds a run of _LONG_DIGIT_RUN digits (one translate, one search)."""
    return _LONG_ZEROS in text.translate(_DIGITS_TO_ZERO)


# The numeric path's cheaper form of the digit-run screen (`_numeric_body`). simdjson refuses
# every number beyond the double range, so rapidjson's refusals it could accept are the long
# whole parts a negative exponent brings back into range: only the text before each such
# exponent is screened, up to a bounded number of them.
_EXPONENTS_SCREENED = 64
# How far back from an exponent its number's digits are screened: a number (digits and one
# point) that fills more than twice the run holds a long run within this window.
_EXPONENT_WINDOW = 2 * _LONG_DIGIT_RUN + 2


def _long_run_before_negative_exponent(raw: bytes) -> bool:
    """Whether some number with a negative exponent may have a long run of digits: the window
    before each `e-` is screened (past _EXPONENTS_SCREENED letters e, the whole body).
    Found with single-byte `find`s, which are far faster than searching for `e-` itself."""
    seen = 0
    for letter in (b"e", b"E"):
        position = raw.find(letter)
        while position != -1:
            seen += 1
            if seen > _EXPONENTS_SCREENED:
                return _has_long_digit_run(raw)
            if raw[position + 1 : position + 2] == b"-" and _long_run_before(raw, position):
                return True
            position = raw.find(letter, position + 1)
    return False


def _long_run_before(raw: bytes, position: int) -> bool:
    return _has_long_digit_run(raw[max(0, position - _EXPONENT_WINDOW) : position])


_NOT_PARSED = object()


def _fast_parse(raw: bytes):
    """The document as orjson reads it, or _NOT_PARSED when the exact parser must decide."""
    if _needs_exact_parse(raw):
        return _NOT_PARSED
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _NOT_PARSED


def _parse_json(body: bytes | str):
    if isinstance(body, bytes) and body:
        document = _fast_parse(body)
        if document is not _NOT_PARSED:
            return document
    if not body:
        raise RestFormatError("JSON Parse error: The document is empty")
    if isinstance(body, bytes):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RestFormatError(
                f"JSON Parse error: Invalid encoding in string. at offset: {exc.start}"
            ) from None
    else:
        text = body
    skipped = 0
    if text.startswith("\ufeff"):  # rapidjson's UTF-8 stream skips a BOM
        text, skipped = text[1:], 3
    start = len(text) - len(text.lstrip(_WHITESPACE))
    if start == len(text):
        raise _parse_error("The document is empty.", text, start, skipped)
    deep = _too_deep(text)
    if deep is not None:
        raise _parse_error(
            f"The document nests arrays and objects deeper than {MAX_JSON_DEPTH} levels.",
            text,
            deep,
            skipped,
        )
    try:
        # raw_decode: as with kParseStopWhenDoneFlag, whatever follows the root is not read.
        document, _ = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError as exc:
        raise _parse_error(_PARSE_ERRORS.get(exc.msg, exc.msg), text, exc.pos, skipped) from None
    except _NumberTooBig as exc:
        literal = exc.args[0]
        pos = next((m.start() for m in _NUMBER_OR_STRING.finditer(text) if m.group() == literal), 0)
        raise _parse_error(_NUMBER_TOO_BIG, text, pos, skipped) from None
    except RecursionError:  # not expected below MAX_JSON_DEPTH; never a 500 regardless
        raise RestFormatError("JSON Parse error: document nested too deeply") from None
    _check_surrogates(text, skipped)
    return document


def _utf8(text: str) -> bytes:
    """A parsed JSON string as the bytes rapidjson holds (a lone low surrogate escape included)."""
    return text.encode("utf-8", "surrogatepass")


def parse_json_object(body: bytes | str) -> dict:
    """A request body parsed as TF Serving's ParseJson does: rapidjson's flags and errors, and
    the root must be an object ("JSON Value: ... Is not object")."""
    if isinstance(body, (bytearray, memoryview)):
        body = bytes(body)
    document = _parse_json(body)
    if not isinstance(document, dict):
        raise RestFormatError(f"JSON Value: {_dump(document)} Is not object")
    return document


def signature_name_of(document: dict) -> str:
    """The optional "signature_name" of a parsed body ("" when absent), as FillSignature."""
    signature_name = document.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise RestFormatError(
            f"JSON Value: {_dump(document)} not formatted correctly. 'signature_name' key must "
            "be a string value."
        )
    return signature_name


def float32_json_values(values) -> list:
    """float32 values as the decimals TF Serving writes (json_tensor.cc WriteDecimal): six
    significant digits when they round-trip through float32, else nine. Returned as Python
    floats holding exactly those decimals, so json.dumps writes 0.1 (not float32's exact
    0.10000000149011612) and 0.333333343 for float32(1/3), as TF Serving does."""
    flat = np.asarray(values, dtype=np.float32)
    return (
        np.array([_tf_serving_decimal(value) for value in flat.ravel().tolist()], dtype=np.float64)
        .reshape(flat.shape)
        .tolist()
    )


def _tf_serving_decimal(value: float) -> float:
    if not math.isfinite(value):
        return value
    short = float(f"{value:g}")
    return short if np.float32(short) == np.float32(value) else float(f"{value:.9g}")


# Public names for the other REST codecs (rest_examples).
debug_string = _dump
json_type = _json_type
utf8_bytes = _utf8


# ---------------------------------------------------------------------------------------------
# Signature input dtypes


def _spec_dtype(spec) -> np.dtype:
    if isinstance(spec, tuple):
        dtype = spec[0]
    elif isinstance(spec, (np.dtype, type, str, int)):
        dtype = spec
    else:
        dtype = spec.dtype  # TensorSpec, TensorInfo, or any object with a dtype
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        dtype = _enum_dtype(dtype)
    dtype = getattr(dtype, "as_numpy_dtype", dtype)  # tf.DType -> numpy type, no TF import
    dtype = np.dtype(dtype)
    return np.dtype(object) if dtype.kind in "SU" else dtype


def _enum_dtype(enum: int) -> np.dtype:
    """A tensorflow.DataType enum value (e.g. TensorInfo.dtype) as a numpy dtype."""
    name = _ENUM_NAMES.get(enum)
    if name is None:
        raise RestUnimplementedError(f"Conversion of JSON values to DataType {enum}")
    if name == "bfloat16":
        import ml_dtypes  # installed with TensorFlow; only needed to name this dtype

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _type_name(dtype: np.dtype) -> str:
    return _TF_TYPE_NAMES.get(dtype.name, dtype.name)


def _input_dtypes(signature_inputs: SignatureInputs, signature_name: str) -> dict[str, np.dtype]:
    specs = signature_inputs(signature_name) if callable(signature_inputs) else signature_inputs
    if not specs:
        raise RestFormatError(
            f"Failed to get input map for signature: {signature_name or 'DEFAULT'}"
        )
    return {name: _spec_dtype(spec) for name, spec in specs.items()}


# ---------------------------------------------------------------------------------------------
# Exact element-by-element conversion (TF Serving's FillTensorProto / AddValueToTensor)


def _type_error(value, dtype: np.dtype) -> RestFormatError:
    return RestFormatError(
        f"JSON Value: {_dump(value)} Type: {_json_type(value)} "
        f"is not of expected type: {_type_name(dtype)}"
    )


def _is_b64_object(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(_B64), str)


def is_b64_object(value) -> bool:
    """{"b64": "<string>"} and nothing else (IsValBase64Object)."""
    return _is_b64_object(value)


def decode_b64(value) -> bytes:
    """The bytes of a {"b64": ...} object (JsonDecodeBase64Object)."""
    return _decode_b64(value)


def _decode_b64(value) -> bytes:
    if not _is_b64_object(value):
        raise RestFormatError(f"JSON Value: {_dump(value)} not formatted correctly for base64 data")
    text = value[_B64]
    try:
        # absl::Base64Unescape accepts missing padding; the strict decoder needs it.
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise RestFormatError("Unable to base64 decode") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _convert(value, dtype: np.dtype):
    """One JSON scalar (or b64 object) -> a Python value ready for an array of `dtype`."""
    name = dtype.name
    if isinstance(value, dict):
        if name == "object":
            return _decode_b64(value)
        raise _type_error(value, dtype)
    if name in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(value, dtype)
        return float(value)  # rapidjson's GetDouble; GetFloat is its cast to float
    if name == "object":
        if not isinstance(value, str):
            raise _type_error(value, dtype)
        return _utf8(value)
    if name == "bool":
        if not isinstance(value, bool):
            raise _type_error(value, dtype)
        return value
    range_name = "int32" if name in _INT32_FIELD else name
    if range_name in _INT_RANGES:
        low, high = _INT_RANGES[range_name]
        if not (_is_int(value) and low <= value <= high):
            raise _type_error(value, dtype)
        return value
    raise RestUnimplementedError(
        f"Conversion of JSON Value: {_dump(value)} to type: {_type_name(dtype)}"
    )


def _dense_shape(value) -> list[int]:
    """TF Serving's shape of a nested list: follow the first element down."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _fill(value, level: int, shape: list[int], dtype: np.dtype, out: list) -> None:
    if not isinstance(value, list):
        if level != len(shape):
            raise RestFormatError(
                f"JSON Value: {_dump(value)} found at incorrect level: {level + 1} in the JSON "
                f"DOM. Expected at level: {len(shape)}"
            )
        out.append(_convert(value, dtype))
        return
    if level >= len(shape):
        raise RestFormatError(
            f"Encountered list at unexpected level: {level} expected < {len(shape)}"
        )
    if len(value) != shape[level]:
        raise RestFormatError(
            f"Encountered list at unexpected size: {len(value)} at level: {level} "
            f"expected size: {shape[level]}"
        )
    for item in value:
        _fill(item, level + 1, shape, dtype, out)


def _tensor_values(value, dtype: np.dtype) -> tuple[list[int], list]:
    shape = _dense_shape(value)
    values: list = []
    _fill(value, 0, shape, dtype, values)
    return shape, values


def _to_array(values: list, shape: list[int], dtype: np.dtype) -> np.ndarray:
    if len(shape) > _MAX_RANK:
        raise RestFormatError(f"JSON value nested {len(shape)} lists deep; at most {_MAX_RANK}")
    if dtype.kind == "O":
        array = np.empty(len(values), dtype=dtype)
        array[:] = values
        return array.reshape(shape)
    if dtype.kind in "iu":
        # Values are range-checked ints; the int64 detour makes int8/int16/uint8 wrap like
        # TF's C++ cast from int_val, and uint64 keeps its full range.
        wide = np.uint64 if dtype == np.uint64 else np.int64
        return np.array(values, dtype=wide).astype(dtype).reshape(shape)
    if dtype.kind == "f":
        with np.errstate(over="ignore"):  # a double beyond float's range is inf, as in C++
            return np.array(values, dtype=np.float64).astype(dtype).reshape(shape)
    return np.array(values, dtype=dtype).reshape(shape)


def _shape_text(shape: list[int]) -> str:
    return "[" + ",".join(str(size) for size in shape) + "]"


class _RowBatch:
    """Accumulates one input across instances, checking each has the first one's shape."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self.shape: list[int] | None = None
        self.size = 0
        self.values: list = []

    def add(self, item) -> None:
        shape, values = _tensor_values(item, self.dtype)
        if self.shape is None:
            self.shape, self.size = shape, len(values)
        elif self.size != len(values):
            raise RestFormatError(f"Expecting tensor size: {self.size} but got: {len(values)}")
        elif self.shape != shape:
            raise RestFormatError(
                f"Expecting shape {_shape_text(self.shape)} but got: {_shape_text(shape)}"
            )
        self.values.extend(values)

    def array(self, rows: int) -> np.ndarray:
        return _to_array(self.values, [rows, *(self.shape or [])], self.dtype)


def _add_instance_item(item, name: str, dtypes, batches: dict[str, _RowBatch]) -> None:
    if name not in dtypes:
        raise RestFormatError(f"JSON object: does not have named input: {name}")
    batch = batches.get(name)
    if batch is None:
        batch = batches[name] = _RowBatch(dtypes[name])
    batch.add(item)


def _is_element_object(value) -> bool:
    return isinstance(value, dict) and not _is_b64_object(value)


def _exact_rows(instances: list, dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    names = sorted(dtypes)
    objects = _is_element_object(instances[0])
    batches: dict[str, _RowBatch] = {}
    for index, element in enumerate(instances):
        if objects:
            _add_object_row(index, element, names, dtypes, batches)
            continue
        if _is_element_object(element):
            raise RestFormatError(
                f"Expecting value/list but got object at item {index} of input list"
            )
        try:
            _add_instance_item(element, names[0], dtypes, batches)
        except (RestFormatError, RestUnimplementedError) as exc:
            raise RestFormatError(
                f"Failed to process element: {index} of 'instances' list. Error: {_status(exc)}"
            ) from None
    return {name: batches[name].array(len(instances)) for name in dtypes if name in batches}


def _add_object_row(index: int, element, names: list[str], dtypes, batches) -> None:
    if not _is_element_object(element):
        raise RestFormatError(f"Expecting object but got list at item {index} of input list")
    for key, item in element.items():
        try:
            _add_instance_item(item, key, dtypes, batches)
        except (RestFormatError, RestUnimplementedError) as exc:
            raise RestFormatError(
                f"Failed to process element: {index} key: {key} of 'instances' list. "
                f"Error: {_status(exc)}"
            ) from None
    if set(element) != set(names):
        raise RestFormatError(
            f"Failed to process element: {index} of 'instances' list. JSON object: "
            f"{_dump(element)} keys must be equal to: {','.join(names)}"
        )


def _exact_tensor(value, dtype: np.dtype) -> np.ndarray:
    shape, values = _tensor_values(value, dtype)
    return _to_array(values, shape, dtype)


# ---------------------------------------------------------------------------------------------
# Vectorised path: used only where it provably matches the exact walk


def _fast_numeric(value, dtype: np.dtype, bool_tokens: bool) -> np.ndarray | None:
    """`value` as an array of `dtype`, or None when only the exact walk can decide."""
    name = dtype.name
    if name != "bool":
        numeric = name in _FLOATS or name in _INT_RANGES or name in _INT32_FIELD
        # numpy silently turns JSON true/false into 1/0 where TF Serving rejects them, so a
        # body with those tokens anywhere (even inside strings) takes the exact walk.
        if not numeric or bool_tokens:
            return None
    try:
        array = np.array(value)
    except (ValueError, OverflowError):
        return None  # ragged, or an integer beyond 64 bits
    if name == "bool":
        return array if array.dtype == np.bool_ else None
    if name in _FLOATS:
        return _fast_float(array, dtype)
    return _fast_int(array, name, dtype)


def _fast_int(array: np.ndarray, name: str, dtype: np.dtype) -> np.ndarray | None:
    if array.dtype.kind not in "iu" or array.size == 0:
        return None  # a float anywhere is a type error; let the exact walk name it
    low, high = _INT_RANGES["int32" if name in _INT32_FIELD else name]
    if int(array.min()) < low or int(array.max()) > high:
        return None
    return array.astype(dtype)


def _fast_float(array: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    if array.dtype.kind not in "iuf" or array.size == 0:
        return None
    # Through double, as rapidjson's GetFloat (int64 -> double -> float rounds twice).
    with np.errstate(over="ignore"):
        return array.astype(np.float64).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Request parsing


def _rows(instances: list, dtypes: dict[str, np.dtype], bool_tokens: bool):
    if not isinstance(instances[0], dict) and len(dtypes) > 1:
        raise RestFormatError(
            "instances is a plain list, but expecting list of objects as multiple input "
            "tensors required as per tensorinfo_map"
        )
    if _is_element_object(instances[0]):
        names = set(dtypes)
        if not all(_is_element_object(row) and row.keys() == names for row in instances):
            return _exact_rows(instances, dtypes)
        columns = {name: [row[name] for row in instances] for name in dtypes}
    else:
        columns = {sorted(dtypes)[0]: instances}
    fast = {}
    for name, column in columns.items():
        array = _fast_numeric(column, dtypes[name], bool_tokens)
        if array is None:
            return _exact_rows(instances, dtypes)
        fast[name] = array
    return fast


def _columns(inputs, dtypes: dict[str, np.dtype], bool_tokens: bool):
    if not isinstance(inputs, dict) or _is_b64_object(inputs):
        if len(dtypes) > 1:
            raise RestFormatError(
                "inputs is a plain value/list, but expecting an object as multiple input "
                "tensors required as per tensorinfo_map"
            )
        values = {sorted(dtypes)[0]: inputs}
    else:
        values = {}
        for name in sorted(dtypes):
            if name not in inputs:
                raise RestFormatError(f"Missing named input: {name} in 'inputs' object.")
            values[name] = inputs[name]
    tensors = {}
    for name in dtypes:
        if name in values:
            array = _fast_numeric(values[name], dtypes[name], bool_tokens)
            tensors[name] = (
                array if array is not None else _exact_tensor(values[name], dtypes[name])
            )
    return tensors


def parse_predict_body(
    body: bytes | str, signature_inputs: SignatureInputs
) -> tuple[str, dict[str, np.ndarray], str]:
    """Parse a `:predict` body into (signature_name or "", inputs, "row" | "columnar").

    `signature_inputs` maps input key -> spec (an object with `.dtype`, or a `(dtype, shape)`
    tuple), or is a callable taking the body's signature name ("" if absent) and returning that
    mapping, because the signature is only known once the body is parsed; whatever it raises
    (e.g. an unknown signature) propagates. Inputs come back as arrays of the signature dtypes,
    DT_STRING as object arrays of bytes; columnar extra keys are ignored, as TF Serving does.
    Raises RestFormatError (INVALID_ARGUMENT) with TF Serving's wording, or
    RestUnimplementedError for dtypes TF Serving cannot fill from JSON.
    """
    if isinstance(body, (bytearray, memoryview)):
        body = bytes(body)
    if isinstance(body, bytes):
        fast = _numeric_body(body, signature_inputs)
        if fast is not None:
            return fast
    document = parse_json_object(body)
    signature_name = signature_name_of(document)
    dtypes = _input_dtypes(signature_inputs, signature_name)
    if isinstance(body, str):
        bool_tokens = "true" in body or "false" in body
    else:
        bool_tokens = b"true" in body or b"false" in body
    if "instances" in document:
        if "inputs" in document:
            raise RestFormatError(
                f"JSON Value: {_dump(document)} Not formatted correctly expecting only one of "
                "'inputs' or 'instances' keys to exist "
            )
        instances = document["instances"]
        if not isinstance(instances, list):
            raise RestFormatError(
                f"JSON Value: {_dump(document)} Excepting 'instances' to be an list/array"
            )
        if not instances:
            raise RestFormatError(f"JSON Value: {_dump(document)} No values in 'instances' array")
        return signature_name, _guarded(_rows, instances, dtypes, bool_tokens), ROW
    if "inputs" in document:
        inputs = _guarded(_columns, document["inputs"], dtypes, bool_tokens)
        return signature_name, inputs, COLUMNAR
    raise RestFormatError("Missing 'inputs' or 'instances' key")


def _numeric_body(body: bytes, signature_inputs: SignatureInputs):
    """`parse_predict_body`'s answer for a body whose one input is a float tensor written as one
    regular array of numbers, read by `rest_json_arrays` without Python lists; None for any other
    body (or one where orjson and rapidjson could disagree), which takes the general path."""
    # Nesting needs no screening here: rest_json_arrays takes no array deeper than its
    # MAX_RANK, far below MAX_JSON_DEPTH.
    if len(body) < _NUMERIC_BODY_BYTES or _big_exponent(body):
        return None
    if _long_run_before_negative_exponent(body):
        return None
    found = rest_json_arrays.numeric_body(body)
    if found is None:
        return None
    dtypes = _input_dtypes(signature_inputs, found.signature_name)
    if len(dtypes) != 1:
        return None
    ((name, dtype),) = dtypes.items()
    if dtype.name not in _FLOATS or found.inner_key not in (None, name):
        return None
    with np.errstate(over="ignore"):
        tensor = found.values.astype(dtype)
    return found.signature_name, {name: tensor}, ROW if found.key == "instances" else COLUMNAR


def _guarded(convert, value, dtypes, bool_tokens):
    try:
        return convert(value, dtypes, bool_tokens)
    except RecursionError:
        raise RestFormatError("JSON value nested too deeply") from None


# ---------------------------------------------------------------------------------------------
# Response formatting


def _string_value(item, as_bytes: bool):
    if isinstance(item, str):
        if not as_bytes:
            return item
        item = item.encode("utf-8")
    elif not as_bytes:
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            pass  # TF Serving would write the raw bytes, i.e. invalid JSON; b64 keeps them
    return {_B64: base64.b64encode(item).decode("ascii")}


def _json_values(name: str, array: np.ndarray):
    """A tensor as nested lists of JSON-ready Python values."""
    array = np.asarray(array)
    kind = array.dtype.kind
    if kind in "OSU":
        as_bytes = name.endswith(_BYTES_SUFFIX)
        flat = [_string_value(item, as_bytes) for item in array.ravel().tolist()]
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(array.shape).tolist()
    type_name = array.dtype.name
    if type_name == "float32":
        return float32_json_values(array)
    if type_name in ("float64", "bool") or type_name in _INT_RANGES or type_name in _INT32_FIELD:
        return array.tolist()
    raise RestFormatError(f"Failed to write JSON value for tensor type: {_type_name(array.dtype)}")


def _batch_size(outputs: Mapping[str, np.ndarray]) -> int:
    batch = 0
    for name in sorted(outputs):
        shape = np.shape(outputs[name])
        if not shape:
            raise RestFormatError(f"Tensor name: {name} has no shape information ")
        if shape[0] < 1:
            raise RestFormatError(f"Tensor name: {name} has invalid batch size: {shape[0]}")
        if batch and shape[0] != batch:
            raise RestFormatError(
                f"Tensor name: {name} has inconsistent batch size: {shape[0]} expecting: {batch}"
            )
        batch = shape[0]
    return batch


def format_predict_response(outputs: Mapping[str, np.ndarray], fmt: str) -> dict:
    """Outputs as TF Serving's JSON: row -> {"predictions": [...]}, columnar -> {"outputs": ...}.

    One output is written without its name; several give one object per row (row format) or
    one object keyed by name (columnar). Serialize with `json.dumps` (allow_nan stays True).
    """
    if not outputs:
        raise RestFormatError("Cannot convert empty tensor map to JSON")
    if fmt == ROW:
        batch = _batch_size(outputs)
        values = {name: _json_values(name, outputs[name]) for name in sorted(outputs)}
        if len(values) == 1:
            return {"predictions": next(iter(values.values()))}
        return {
            "predictions": [{name: rows[i] for name, rows in values.items()} for i in range(batch)]
        }
    if fmt == COLUMNAR:
        values = {name: _json_values(name, outputs[name]) for name in sorted(outputs)}
        if len(values) == 1:
            return {"outputs": next(iter(values.values()))}
        return {"outputs": values}
    raise RestFormatError("Invalid request format")


# ---------------------------------------------------------------------------------------------
# Model status and metadata


def _message_to_dict(message, *, preserve_names: bool) -> dict:
    # TF Serving prints with always_print_primitive_fields, the old name of this option.
    try:
        return json_format.MessageToDict(
            message,
            preserving_proto_field_name=preserve_names,
            always_print_fields_with_no_presence=True,
        )
    except TypeError:  # protobuf < 5.26
        return json_format.MessageToDict(
            message, preserving_proto_field_name=preserve_names, including_default_value_fields=True
        )


def format_status(statuses: list[tuple[int, str, str | int, str]]) -> dict:
    """[(version, state, error_code, error_message)] -> GetModelStatusResponse JSON.

    `state` is a ModelVersionStatus.State name (START, LOADING, AVAILABLE, UNLOADING, END),
    `error_code` a tensorflow.error.Code name or number. Versions keep the given order (TF
    Serving lists them newest first). As TF Serving's ToStatusProto, the message is only kept
    for a non-OK code.
    """
    response = get_model_status_pb2.GetModelStatusResponse()
    for version, state, error_code, error_message in statuses:
        entry = response.model_version_status.add(version=int(version))
        entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
        status = entry.status
        status.SetInParent()
        code_field = status.DESCRIPTOR.fields_by_name["error_code"]
        if isinstance(error_code, str):
            if error_code not in code_field.enum_type.values_by_name:
                raise ValueError(f"unknown tensorflow.error.Code name {error_code!r}")
            error_code = code_field.enum_type.values_by_name[error_code].number
        status.error_code = error_code
        if error_code != 0:
            status.error_message = error_message
    return _message_to_dict(response, preserve_names=False)


def _signature_def_map(signature_defs) -> get_model_metadata_pb2.SignatureDefMap:
    if isinstance(signature_defs, get_model_metadata_pb2.SignatureDefMap):
        return signature_defs
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature_def in signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature_def)
    return signature_map


def format_metadata(model_name: str, version: int, signature_def_map_proto) -> dict:
    """GetModelMetadata JSON as TF Serving's REST API writes it.

    `signature_def_map_proto` is a `SignatureDefMap` or a mapping of key -> SignatureDef (e.g.
    `MetaGraphDef.signature_def`). TF Serving prints `model_spec` and the unpacked
    SignatureDefMap separately, both with proto field names and default values included.
    """
    model_spec = model_pb2.ModelSpec(name=model_name)
    model_spec.version.value = int(version)
    signature_map = _signature_def_map(signature_def_map_proto)
    return {
        "model_spec": _message_to_dict(model_spec, preserve_names=True),
        "metadata": {"signature_def": _message_to_dict(signature_map, preserve_names=True)},
    }
