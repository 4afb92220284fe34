"""serving.rest_json: TF Serving's REST predict format, errors, status and metadata JSON."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2

from convstack.serving.errors import InvalidArgument, NotFound, ServingError
from convstack.serving.rest_json import (
    COLUMNAR,
    MAX_JSON_DEPTH,
    ROW,
    RestFormatError,
    RestUnimplementedError,
    format_metadata,
    format_predict_response,
    format_status,
    parse_predict_body,
)

IMAGES = {"images": (np.float32, (None, 28, 28, 1))}
IMAGE_BYTES = {"image_bytes": (np.object_, (None,))}
# Forces the exact element-by-element walk: TF Serving ignores unknown top-level keys, and any
# true/false token in a body disables the vectorised path.
FORCE_EXACT = ', "note": "true"'


def parse(body, specs):
    text = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return parse_predict_body(text, specs)


def error_message(body, specs, error=RestFormatError) -> str:
    with pytest.raises(error) as info:
        parse(body, specs)
    return info.value.message


# --- row format -------------------------------------------------------------------------------


def test_row_single_input_batches_the_instances():
    images = np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)
    name, inputs, fmt = parse({"instances": images.tolist()}, IMAGES)
    assert (name, fmt) == ("", ROW)
    assert list(inputs) == ["images"]
    assert inputs["images"].dtype == np.float32
    np.testing.assert_array_equal(inputs["images"], images)


def test_row_signature_name_is_returned():
    name, inputs, _ = parse({"signature_name": "predict_images", "instances": [[1, 2]]}, IMAGES)
    assert name == "predict_images"
    assert inputs["images"].shape == (1, 2)


def test_row_scalars_and_named_objects_for_one_input():
    _, plain, _ = parse({"instances": [1, 2, 3]}, {"x": (np.int64, None)})
    _, named, _ = parse({"instances": [{"x": 1}, {"x": 2}, {"x": 3}]}, {"x": (np.int64, None)})
    np.testing.assert_array_equal(plain["x"], [1, 2, 3])
    np.testing.assert_array_equal(named["x"], [1, 2, 3])
    assert plain["x"].dtype == named["x"].dtype == np.int64


def test_row_several_inputs_of_different_dtypes():
    specs = {
        "int_tensor": (np.int32, None),
        "str_tensor": (object, None),
        "float_tensor": (np.float32, None),
        "dbl_tensor": (np.float64, None),
    }
    body = """{"instances": [
        {"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"],
         "float_tensor": [1.0, NaN], "dbl_tensor": [NaN]},
        {"int_tensor": [[7,8],[9,0],[1,2]], "str_tensor": ["baz", "bat"],
         "float_tensor": [2.0, Infinity], "dbl_tensor": [2.0]}]}"""
    _, inputs, fmt = parse_predict_body(body, specs)
    assert fmt == ROW
    assert inputs["int_tensor"].shape == (2, 3, 2)
    assert inputs["int_tensor"].dtype == np.int32
    np.testing.assert_array_equal(
        inputs["int_tensor"].ravel(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]
    )
    assert inputs["str_tensor"].tolist() == [[b"foo", b"bar"], [b"baz", b"bat"]]
    np.testing.assert_array_equal(inputs["float_tensor"], [[1.0, np.nan], [2.0, np.inf]])
    assert inputs["float_tensor"].dtype == np.float32
    np.testing.assert_array_equal(inputs["dbl_tensor"], [[np.nan], [2.0]])
    assert inputs["dbl_tensor"].dtype == np.float64


def test_ints_convert_to_float_inputs_and_floats_round_to_float32():
    _, inputs, _ = parse('{"instances": [1, 2.0, 3, 5.003, 0.007, 0]}', IMAGES)
    expected = np.array([1, 2.0, 3, 5.003, 0.007, 0], dtype=np.float32)
    np.testing.assert_array_equal(inputs["images"], expected)


def test_b64_instances_decode_to_bytes():
    images = [b"\x89PNG\r\n\x1a\n\x00\xff", b"hello"]
    body = {"instances": [{"b64": base64.b64encode(image).decode()} for image in images]}
    _, inputs, _ = parse(body, IMAGE_BYTES)
    assert inputs["image_bytes"].dtype == object
    assert inputs["image_bytes"].tolist() == images


def test_b64_without_padding_and_plain_utf8_strings():
    _, inputs, _ = parse({"instances": [{"b64": "aGVsbG8"}, "wörld"]}, {"s": (np.bytes_, None)})
    assert inputs["s"].tolist() == [b"hello", "wörld".encode()]


def test_named_b64_lists():
    body = {"instances": [{"default": [[{"b64": "aGVsbG8="}], [{"b64": "d29ybGQ="}]]}]}
    _, inputs, _ = parse(body, {"default": (object, None)})
    assert inputs["default"].shape == (1, 2, 1)
    assert inputs["default"].ravel().tolist() == [b"hello", b"world"]


# --- columnar format --------------------------------------------------------------------------


def test_columnar_single_input_named_or_plain():
    value = [[[1, 2], [3, 4], [5, 6]]]
    for body in ({"inputs": {"int_tensor": value}}, {"inputs": value}):
        name, inputs, fmt = parse(body, {"int_tensor": (np.int32, None)})
        assert (name, fmt) == ("", COLUMNAR)
        assert inputs["int_tensor"].shape == (1, 3, 2)
        np.testing.assert_array_equal(inputs["int_tensor"].ravel(), [1, 2, 3, 4, 5, 6])


def test_columnar_several_inputs_with_different_batch_sizes():
    specs = {
        "int_tensor": (np.int32, None),
        "str_tensor": (object, None),
        "bin_tensor": (object, None),
    }
    body = {
        "inputs": {
            "int_tensor": [[[1, 2], [3, 4], [5, 6]]],
            "str_tensor": ["foo", "bar"],
            "bin_tensor": {"b64": "aGVsbG8="},
            "ignored": [1, 2, 3],
        }
    }
    _, inputs, fmt = parse(body, specs)
    assert fmt == COLUMNAR
    assert set(inputs) == set(specs)  # TF Serving ignores keys the signature does not have
    assert inputs["int_tensor"].shape == (1, 3, 2)
    assert inputs["str_tensor"].tolist() == [b"foo", b"bar"]
    assert inputs["bin_tensor"].shape == ()
    assert inputs["bin_tensor"].item() == b"hello"


def test_columnar_scalar():
    _, inputs, _ = parse({"inputs": 2.5}, {"x": (np.float64, None)})
    assert inputs["x"].shape == ()
    assert inputs["x"].dtype == np.float64
    assert inputs["x"].item() == 2.5


# --- dtype conversion -------------------------------------------------------------------------

CONVERSIONS = [
    (np.float32, [1, -2.5, 16777215, 3.4e38, 16777217.0], None),
    (np.float64, [1, -2.5, 9007199254740991, 1e308], None),
    (np.int8, [-128, 127, 0], None),
    (np.int16, [-32768, 32767], None),
    (np.int32, [-(2**31), 2**31 - 1], None),
    (np.uint8, [0, 255, 300, -1], [0, 255, 44, 255]),  # TF C-casts int_val values
    (np.int64, [-(2**63), 2**63 - 1], None),
    (np.uint32, [0, 2**32 - 1], None),
    (np.uint64, [0, 2**64 - 1], None),
    (np.bool_, [True, False], None),
]


@pytest.mark.parametrize("force_exact", [False, True], ids=["vectorised", "exact"])
@pytest.mark.parametrize(("dtype", "values", "expected"), CONVERSIONS, ids=str)
def test_numbers_convert_to_the_signature_dtype(dtype, values, expected, force_exact):
    specs = {"x": (dtype, None)}
    extra = FORCE_EXACT if force_exact else ""
    for body, batch in (
        (f'{{"instances": {json.dumps(values)}{extra}}}', (len(values),)),
        (f'{{"inputs": [{json.dumps(values)}]{extra}}}', (1, len(values))),
    ):
        _, inputs, _ = parse_predict_body(body, specs)
        array = inputs["x"]
        assert array.dtype == np.dtype(dtype)
        assert array.shape == batch
        want = np.array(expected if expected is not None else values, dtype=object).astype(dtype)
        np.testing.assert_array_equal(array.ravel(), want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64, np.bool_, object])
def test_vectorised_and_exact_paths_agree(dtype):
    rng = np.random.default_rng(7)
    if dtype is object:
        values = [[f"s{i}{j}" for j in range(3)] for i in range(4)]
    elif dtype is np.bool_:
        values = rng.integers(0, 2, (4, 3)).astype(bool).tolist()
    elif np.dtype(dtype).kind == "f":
        values = (rng.normal(size=(4, 3)) * 1e3).tolist()
    else:
        values = rng.integers(-1000, 1000, (4, 3)).tolist()
    specs = {"x": (dtype, None)}
    body = json.dumps({"instances": values})
    fast = parse_predict_body(body, specs)[1]["x"]
    exact = parse_predict_body(body[:-1] + FORCE_EXACT + "}", specs)[1]["x"]
    assert fast.dtype == exact.dtype == np.dtype(dtype)
    assert fast.shape == exact.shape == (4, 3)
    assert fast.tolist() == exact.tolist()


def test_vectorised_and_exact_paths_agree_for_named_rows():
    specs = {"a": (np.float32, None), "b": (np.int64, None)}
    instances = [{"a": [0.5, 1e-3], "b": 7}, {"b": -7, "a": [2.0, 3]}]
    body = json.dumps({"instances": instances})
    fast = parse_predict_body(body, specs)[1]
    exact = parse_predict_body(body[:-1] + FORCE_EXACT + "}", specs)[1]
    for name in specs:
        assert fast[name].dtype == exact[name].dtype == np.dtype(specs[name][0])
        assert fast[name].tolist() == exact[name].tolist()
    assert fast["a"].tolist() == [[0.5, np.float32(1e-3)], [2.0, 3.0]]
    assert fast["b"].tolist() == [7, -7]


def test_empty_inner_lists_give_empty_tensors():
    _, inputs, _ = parse({"instances": [[], []]}, {"x": (np.int32, None)})
    assert inputs["x"].shape == (2, 0)
    assert inputs["x"].dtype == np.int32


def test_tf_dtype_specs_and_spec_objects_are_accepted():
    import tensorflow as tf

    class Spec:
        dtype = tf.string
        shape = (None,)

    _, inputs, _ = parse({"instances": ["a"]}, {"s": Spec()})
    assert inputs["s"].tolist() == [b"a"]
    _, inputs, _ = parse({"instances": [1]}, {"x": tf.TensorSpec([None], tf.float32)})
    assert inputs["x"].dtype == np.float32


def test_signature_inputs_callable_gets_the_signature_name():
    seen = []

    def lookup(signature_name):
        seen.append(signature_name)
        return IMAGES

    parse({"instances": [1.0]}, lookup)
    parse({"signature_name": "other", "inputs": [1.0]}, lookup)
    assert seen == ["", "other"]


def test_errors_from_the_signature_lookup_propagate():
    def lookup(signature_name):
        raise NotFound(f"no signature {signature_name}")

    with pytest.raises(NotFound, match="no signature nope"):
        parse({"signature_name": "nope", "instances": [1]}, lookup)


# --- errors, with TF Serving's wording --------------------------------------------------------

INT = {"default": (np.int32, None)}


@pytest.mark.parametrize(
    ("body", "specs", "expected"),
    [
        ("", INT, "JSON Parse error: The document is empty"),
        ("  ", INT, "JSON Parse error: The document is empty. at offset: 2"),
        ('{"instances": [1,}', INT, "JSON Parse error: Invalid value. at offset: 17"),
        ("[1, 2]", INT, "JSON Value: [1, 2] Is not object"),
        ('{"x": 1}', INT, "Missing 'inputs' or 'instances' key"),
        (
            '{"signature_name": 5, "instances": [1]}',
            INT,
            "'signature_name' key must be a string value.",
        ),
        (
            '{"instances": [1], "inputs": [1]}',
            INT,
            "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist ",
        ),
        ('{"instances": {"a": 1}}', INT, "Excepting 'instances' to be an list/array"),
        ('{"instances": []}', INT, 'JSON Value: {\n    "instances": []\n} No values in'),
        ('{"instances": [1]}', {}, "Failed to get input map for signature: DEFAULT"),
        (
            '{"signature_name": "s", "instances": [1]}',
            {},
            "Failed to get input map for signature: s",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 30 else None,
)
def test_document_errors(body, specs, expected):
    assert expected in error_message(body, specs)


@pytest.mark.parametrize("force_exact", [False, True], ids=["vectorised", "exact"])
@pytest.mark.parametrize(
    ("instances", "dtype", "expected"),
    [
        (
            [[1, 2], [3, 4], [5, 6, 7]],
            np.int32,
            "Failed to process element: 2 of 'instances' list. Error: INVALID_ARGUMENT: "
            "Expecting tensor size: 2 but got: 3",
        ),
        (
            [[1, 2], [3, 4], [[5, 6]]],
            np.int32,
            "Failed to process element: 2 of 'instances' list. Error: INVALID_ARGUMENT: "
            "Expecting shape [2] but got: [1,2]",
        ),
        ([1, [1]], np.int32, "Expecting shape [] but got: [1]"),
        (
            [[[1, 2], [3]]],
            np.int32,
            "Encountered list at unexpected size: 1 at level: 1 expected size: 2",
        ),
        (
            [[[1], 2]],
            np.int32,
            "JSON Value: 2 found at incorrect level: 2 in the JSON DOM. Expected at level: 2",
        ),
        ([[1, [2]]], np.int32, "Encountered list at unexpected level: 1 expected < 1"),
        ([[[1], [[2]]]], np.int32, "Encountered list at unexpected level: 2 expected < 2"),
        (
            [[1, 2], ["a", "b"]],
            np.int32,
            "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: "
            'JSON Value: "a" Type: String is not of expected type: int32',
        ),
        ([1.5], np.int64, "JSON Value: 1.5 Type: Number is not of expected type: int64"),
        ([2**31], np.int32, "Type: Number is not of expected type: int32"),
        ([-1], np.uint32, "Type: Number is not of expected type: uint32"),
        ([2**64], np.uint64, "Type: Number is not of expected type: uint64"),
        ([1], np.bool_, "JSON Value: 1 Type: Number is not of expected type: bool"),
        ([True], np.float32, "JSON Value: true Type: True is not of expected type: float"),
        ([None], np.float64, "JSON Value: null Type: Null is not of expected type: double"),
        ([5], object, "JSON Value: 5 Type: Number is not of expected type: string"),
        (
            [{"b64": "aGk="}],
            np.float32,
            'JSON Value: {\n    "b64": "aGk="\n} Type: Object is not of expected type: float',
        ),
        ([{"b64": "!!!"}], object, "Error: INVALID_ARGUMENT: Unable to base64 decode"),
        (
            [[{"b64": 5}]],
            object,
            'JSON Value: {\n    "b64": 5\n} not formatted correctly for base64 data',
        ),
        (
            [1.5],
            np.float16,
            "Error: UNIMPLEMENTED: Conversion of JSON Value: 1.5 to type: half",
        ),
    ],
)
def test_value_errors_in_rows(instances, dtype, expected, force_exact):
    body = json.dumps({"instances": instances})
    if force_exact:
        body = body[:-1] + FORCE_EXACT + "}"
    message = error_message(body, {"default": (dtype, None)})
    assert expected in message
    assert message.startswith("Failed to process element: ")


def test_float_literal_beyond_float32_exact_ints_is_accepted():
    # 16777217 as an integer is lossy for float; as a decimal TF Serving takes it (and rounds).
    _, inputs, _ = parse('{"instances": [16777217.0]}', IMAGES)
    assert inputs["images"].tolist() == [16777216.0]


@pytest.mark.parametrize("force_exact", [False, True], ids=["vectorised", "exact"])
@pytest.mark.parametrize(
    ("literal", "dtype", "expected"),
    [
        ("1435774380", np.float32, 1435774336.0),
        ("1435774380.0", np.float32, 1435774336.0),
        ("16777217", np.float32, 16777216.0),
        ("1.797e308", np.float32, np.inf),
        ("-1.797e308", np.float32, -np.inf),
        ("1e39", np.float32, np.inf),
        ("9007199254740993", np.float64, 9007199254740992.0),
        ("1.8e308", np.float64, np.inf),  # within rapidjson's exponent bound: a double inf
        ("18446744073709551616", np.float64, 2.0**64),  # beyond uint64: a double
        ("NaN", np.float32, np.nan),
        ("-Infinity", np.float64, -np.inf),
    ],
)
def test_float_inputs_take_any_number_rounded_to_the_dtype(literal, dtype, expected, force_exact):
    """json_tensor_test.cc FloatTensorWithPrecisionLoss / FloatTensorThatExceedsMaxReturnsInf:
    TF Serving dropped IsLosslessDecimal, DT_FLOAT is GetFloat() of the parsed double.
    (Before: "Cannot convert JSON value: ... without loss of precision.")"""
    extra = FORCE_EXACT if force_exact else ""
    _, inputs, _ = parse(f'{{"instances": [{literal}]{extra}}}', {"x": (dtype, None)})
    assert inputs["x"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(inputs["x"], np.array([expected], dtype=dtype))


@pytest.mark.parametrize(
    ("body", "offset"),
    [
        ('{"instances": [1e999]}', 15),
        ('{"instances": [-1e309]}', 15),
        ('{"instances": [0e400]}', 15),  # rapidjson bounds the exponent, not the value
        ("1" * 5000, 0),  # was ValueError from Python's int-digit limit (HTTP 500)
        ('{"instances": [' + "9" * 400 + "]}", 15),
        ('{"instances": [' + "9" * 400 + ".5]}", 15),
        ('{"a": "1e999", "instances": [1e999]}', 29),  # the number, not the string
    ],
    ids=["1e999", "-1e309", "0e400", "5000-digit-root", "400-digit-int", "400-digit-float", "str"],
)
def test_numbers_beyond_double_are_rapidjsons_number_too_big(body, offset):
    """rapidjson (reader.h ParseNumber, TF Serving's parser): kParseErrorNumberTooBig at the
    number's start offset."""
    assert error_message(body, IMAGES) == (
        f"JSON Parse error: Number too big to be stored in double. at offset: {offset}"
    )


def test_huge_but_parseable_integer_literals_are_doubles():
    """rapidjson keeps integers beyond (u)int64 as doubles: fine for float, a type error for
    int64 (TF Serving's AddValueToTensor IsInt64 check)."""
    literal = "1" * 309  # 1.1e308: still a double
    _, inputs, _ = parse(f'{{"instances": [{literal}]}}', {"x": (np.float64, None)})
    assert inputs["x"].tolist() == [float(literal)]
    message = error_message('{"instances": [-9223372036854775809]}', {"x": (np.int64, None)})
    assert "Type: Number is not of expected type: int64" in message


def test_nan_and_infinity_tokens_are_numbers():
    """json_tensor.cc parses with kParseNanAndInfFlag."""
    _, inputs, _ = parse('{"instances": [NaN, Infinity, -Infinity]}', IMAGES)
    values = inputs["images"]
    assert np.isnan(values[0]) and values[1] == np.inf and values[2] == -np.inf


def test_whatever_follows_the_root_value_is_ignored():
    """json_tensor.cc parses with kParseStopWhenDoneFlag: no "root must not be followed"."""
    _, inputs, _ = parse('{"instances": [1]} trailing garbage {', IMAGES)
    assert inputs["images"].tolist() == [1.0]


def test_a_utf8_bom_is_skipped():
    """rapidjson's EncodedInputStream<UTF8> skips a leading BOM."""
    _, inputs, _ = parse('\ufeff{"instances": [2]}'.encode(), IMAGES)
    assert inputs["images"].tolist() == [2.0]


@pytest.mark.parametrize("escape", ["\\ud800", "\\ud800x", "\\ud800\\u0041", "\\udbff\\n"], ids=str)
def test_unpaired_high_surrogates_are_rapidjsons_surrogate_error(escape):
    """rapidjson 1.1.0 ParseStringToStream: a high surrogate escape not followed by a low one
    is kParseErrorStringUnicodeSurrogateInvalid at the escape. (Before: UnicodeEncodeError, a
    500.)"""
    body = '{"instances": ["ok", "' + escape + '"]}'
    assert error_message(body, IMAGE_BYTES) == (
        "JSON Parse error: The surrogate pair in string is invalid. at offset: 22"
    )


def test_surrogate_pairs_and_lone_low_surrogates_are_kept_as_rapidjson_does():
    """A pair is one code point; rapidjson 1.1.0 does not check a lone low surrogate and
    encodes it as three UTF-8 bytes. An escaped backslash before "ud800" is no escape."""
    body = '{"instances": ["\\ud83d\\ude00", "\\udc00", "\\\\ud800"]}'
    _, inputs, _ = parse(body, IMAGE_BYTES)
    assert inputs["image_bytes"].tolist() == [
        "\U0001f600".encode(),
        b"\xed\xb0\x80",
        b"\\ud800",
    ]


@pytest.mark.parametrize(
    "body",
    [
        '{"instances": ' + "[" * 5000 + "]" * 5000 + "}",
        "[" * 100000,
        '{"instances": [' + '{"a": ' * 3000 + "1" + "}" * 3000 + "]}",
    ],
    ids=["arrays", "unclosed", "objects"],
)
def test_nesting_depth_is_bounded_before_parsing(body):
    """rapidjson parses iteratively (kParseIterativeFlag); Python's decoder recurses, so depth
    is bounded first, with a 400 naming the limit."""
    message = error_message(body, IMAGES)
    assert message.startswith(
        f"JSON Parse error: The document nests arrays and objects deeper than "
        f"{MAX_JSON_DEPTH} levels. at offset: "
    )


def test_brackets_inside_strings_do_not_count_as_nesting():
    body = json.dumps({"instances": ["[" * 2000, '\\"[[[' * 300]})
    _, inputs, _ = parse(body, IMAGE_BYTES)
    assert inputs["image_bytes"][0] == b"[" * 2000


def test_values_in_messages_are_written_as_tf_servings_debug_string():
    """json_tensor.cc JsonValueToDebugString: PrettyWriter with single-line arrays, stopping
    once 256 bytes are written (so a huge value is not echoed whole)."""
    message = error_message({"big": list(range(100000)), "instances": []}, INT)
    assert message.startswith('JSON Value: {\n    "big": [0, 1, 2, ')
    assert message.endswith(" No values in 'instances' array")
    assert len(message) < 256 + 60  # the prefix, ~256 bytes of value, the suffix
    rows = [{"x": list(range(1000))}]
    message = error_message({"instances": rows}, {"x": (np.int32, None), "z": (object, None)})
    value = message.split("JSON object: ", 1)[1].split(" keys must be equal to")[0]
    assert value.startswith('{\n    "x": [0, 1, 2, 3, ')
    assert 256 <= len(value) < 270  # whole tokens, stopping past 256 bytes
    assert message.endswith(" keys must be equal to: x,z")


SEVERAL = {"int_tensor": (np.int32, None), "str_tensor": (object, None)}


@pytest.mark.parametrize(
    ("instances", "expected"),
    [
        ([[1, 2]], "instances is a plain list, but expecting list of objects as multiple input"),
        (
            [{"int_tensor": 1, "str_tensor": "a"}, [1, 20, 30]],
            "Expecting object but got list at item 1 of input list",
        ),
        (
            [{"int_tensor": 1, "str_tensor": "a", "extra": 1}],
            "Failed to process element: 0 key: extra of 'instances' list. Error: "
            "INVALID_ARGUMENT: JSON object: does not have named input: extra",
        ),
        (
            [{"int_tensor": 1}],
            "Failed to process element: 0 of 'instances' list. JSON object: {\n"
            '    "int_tensor": 1\n} keys must be equal to: int_tensor,str_tensor',
        ),
        (
            [
                {"int_tensor": [1, 2], "str_tensor": "a"},
                {"int_tensor": [[1, 2]], "str_tensor": "b"},
            ],
            "Failed to process element: 1 key: int_tensor of 'instances' list. Error: "
            "INVALID_ARGUMENT: Expecting shape [2] but got: [1,2]",
        ),
        (
            [{"int_tensor": [1, 2], "str_tensor": "a"}, {"int_tensor": [1], "str_tensor": "b"}],
            "Expecting tensor size: 2 but got: 1",
        ),
    ],
)
def test_row_object_errors(instances, expected):
    assert expected in error_message({"instances": instances}, SEVERAL)


def test_row_plain_value_after_object_is_an_error():
    message = error_message({"instances": [["baz"], {"s": ["bat"]}]}, {"s": (object, None)})
    assert message == "Expecting value/list but got object at item 1 of input list"


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ([1, 2], "inputs is a plain value/list, but expecting an object as multiple input"),
        ({"b64": "aGk="}, "inputs is a plain value/list, but expecting an object as multiple"),
        ({"int_tensor": [1]}, "Missing named input: str_tensor in 'inputs' object."),
        (
            {"int_tensor": [1, "x"], "str_tensor": ["a"]},
            'JSON Value: "x" Type: String is not of expected type: int32',
        ),
    ],
)
def test_columnar_errors(inputs, expected):
    assert expected in error_message({"inputs": inputs}, SEVERAL)


def test_columnar_unsupported_dtype_is_unimplemented():
    error = None
    with pytest.raises(RestUnimplementedError) as info:
        parse({"inputs": [1]}, {"x": (np.complex64, None)})
    error = info.value
    assert error.message == "Conversion of JSON Value: 1 to type: complex64"
    assert error.code == "UNIMPLEMENTED"
    assert error.http_status == 501


def test_error_types_map_to_http_400():
    with pytest.raises(RestFormatError) as info:
        parse_predict_body(b"{", IMAGES)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, InvalidArgument)
    assert isinstance(info.value, ServingError)
    assert info.value.http_status == 400


def test_non_utf8_body_is_a_parse_error():
    message = error_message(b'{"instances": ["\xff"]}', IMAGE_BYTES)
    assert message.startswith("JSON Parse error: Invalid encoding")


# --- responses --------------------------------------------------------------------------------


def test_row_response_with_one_output_omits_the_name():
    outputs = {"classes": np.array([3, 1, 2**62], dtype=np.int64)}
    assert format_predict_response(outputs, ROW) == {"predictions": [3, 1, 2**62]}
    assert json.dumps(format_predict_response(outputs, ROW)) == (
        '{"predictions": [3, 1, 4611686018427387904]}'
    )


def test_row_response_with_several_outputs_is_one_object_per_row():
    outputs = {
        "probabilities": np.array([[0.1, 0.9], [0.75, 0.25]], dtype=np.float32),
        "classes": np.array([1, 0], dtype=np.int64),
    }
    assert format_predict_response(outputs, ROW) == {
        "predictions": [
            {"probabilities": [0.1, 0.9], "classes": 1},
            {"probabilities": [0.75, 0.25], "classes": 0},
        ]
    }


def test_columnar_response():
    outputs = {
        "probabilities": np.array([[0.5, 0.5]], dtype=np.float32),
        "classes": np.array([0], dtype=np.int64),
    }
    assert format_predict_response(outputs, COLUMNAR) == {
        "outputs": {"probabilities": [[0.5, 0.5]], "classes": [0]}
    }
    single = {"x": np.array([[1, 2], [3, 4]], dtype=np.int32)}
    assert format_predict_response(single, COLUMNAR) == {"outputs": [[1, 2], [3, 4]]}
    assert format_predict_response({"s": np.float64(2.5)}, COLUMNAR) == {"outputs": 2.5}


def test_float32_outputs_are_written_with_tf_serving_decimals():
    """json_tensor.cc WriteDecimal: six significant digits when they round-trip through
    float32 (0.1, 555557.5 needs seven so gets nine), else nine (float32(1/3) is 0.333333343,
    not the shortest 0.33333334): a client reading them as doubles sees TF Serving's values."""
    values = np.array([0.1, 0.2, 1 / 3, 1.0, 9000000.0, 3e-05, 555557.5], dtype=np.float32)
    text = json.dumps(format_predict_response({"x": values}, ROW))
    assert text == ('{"predictions": [0.1, 0.2, 0.333333343, 1.0, 9000000.0, 3e-05, 555557.5]}')
    assert np.array_equal(np.array(json.loads(text)["predictions"], dtype=np.float32), values)


def test_non_finite_floats_use_tf_serving_tokens():
    outputs = {"x": np.array([[np.nan, np.inf], [3.0, -np.inf]], dtype=np.float32)}
    text = json.dumps(format_predict_response(outputs, ROW))
    assert text == '{"predictions": [[NaN, Infinity], [3.0, -Infinity]]}'
    doubles = {"x": np.array([np.nan, -np.inf], dtype=np.float64)}
    assert json.dumps(format_predict_response(doubles, COLUMNAR)) == '{"outputs": [NaN, -Infinity]}'


def test_string_outputs_bytes_suffix_is_b64_and_text_stays_text():
    outputs = {
        "str_tensor": np.array([[b"foo", "bär".encode()], [b"baz", b"\xff\xfe"]], dtype=object),
        "str_tensor_bytes": np.array([[b"hello", b"world"], [b"tf", b"serving"]], dtype=object),
    }
    assert format_predict_response(outputs, ROW) == {
        "predictions": [
            {
                "str_tensor": ["foo", "bär"],
                "str_tensor_bytes": [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}],
            },
            {
                # Not UTF-8: TF Serving would write raw bytes (invalid JSON); b64 keeps them.
                "str_tensor": ["baz", {"b64": "//4="}],
                "str_tensor_bytes": [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}],
            },
        ]
    }


def test_bool_and_unsigned_outputs():
    outputs = {"b": np.array([True, False]), "u": np.array([2**64 - 1, 0], dtype=np.uint64)}
    assert format_predict_response(outputs, COLUMNAR) == {
        "outputs": {"b": [True, False], "u": [2**64 - 1, 0]}
    }


@pytest.mark.parametrize(
    ("outputs", "fmt", "expected"),
    [
        ({}, ROW, "Cannot convert empty tensor map to JSON"),
        ({"x": np.array([1, 2])}, "rows", "Invalid request format"),
        ({"x": np.int32(1)}, ROW, "Tensor name: x has no shape information "),
        ({"x": np.zeros((0, 2))}, ROW, "Tensor name: x has invalid batch size: 0"),
        (
            {"a": np.zeros((2, 3)), "b": np.zeros((1, 3))},
            ROW,
            "Tensor name: b has inconsistent batch size: 1 expecting: 2",
        ),
        ({"x": np.zeros(2, np.float16)}, COLUMNAR, "for tensor type: half"),
        ({"x": np.zeros(2, np.complex64)}, ROW, "Failed to write JSON value for tensor type: "),
        ({"x": np.zeros(2, np.uint16)}, ROW, "for tensor type: uint16"),
    ],
)
def test_response_errors(outputs, fmt, expected):
    with pytest.raises(RestFormatError) as info:
        format_predict_response(outputs, fmt)
    assert expected in info.value.message


# --- status and metadata ----------------------------------------------------------------------


def test_status_json_matches_tf_serving():
    statuses = [(3, "AVAILABLE", "OK", ""), (2, "END", "UNKNOWN", "load failed: bad graph")]
    result = format_status(statuses)
    assert result == {
        "model_version_status": [
            {
                "version": "3",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            },
            {
                "version": "2",
                "state": "END",
                "status": {"error_code": "UNKNOWN", "error_message": "load failed: bad graph"},
            },
        ]
    }
    # The same proto TF Serving's GetModelStatusImpl builds, printed its way.
    expected = get_model_status_pb2.GetModelStatusResponse()
    first = expected.model_version_status.add(
        version=3, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE
    )
    first.status.error_code = 0
    second = expected.model_version_status.add(
        version=2, state=get_model_status_pb2.ModelVersionStatus.END
    )
    second.status.error_code = 2
    second.status.error_message = "load failed: bad graph"
    assert result == json_format.MessageToDict(expected, always_print_fields_with_no_presence=True)
    assert json_format.ParseDict(result, get_model_status_pb2.GetModelStatusResponse()) == expected


def test_status_accepts_numeric_codes_and_drops_ok_messages():
    result = format_status([(1, "LOADING", 0, "ignored"), (2, "START", 5, "missing")])
    assert result["model_version_status"][0]["status"] == {"error_code": "OK", "error_message": ""}
    assert result["model_version_status"][1]["status"] == {
        "error_code": "NOT_FOUND",
        "error_message": "missing",
    }
    with pytest.raises(ValueError):
        format_status([(1, "READY", "OK", "")])
    with pytest.raises(ValueError):
        format_status([(1, "AVAILABLE", "FINE", "")])


@pytest.fixture(scope="module")
def signature_defs(tmp_path_factory):
    """The SignatureDefs of a real SavedModel with a float and a string signature."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    class Model(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32, "images")])
        def serve(self, images):
            return {"classes": tf.argmax(tf.reshape(images, [-1, 784]), axis=-1)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, "image_bytes")])
        def serve_bytes(self, image_bytes):
            return {"lengths": tf.strings.length(image_bytes)}

    model = Model()
    path = tmp_path_factory.mktemp("saved") / "1"
    tf.saved_model.save(
        model,
        str(path),
        signatures={"serving_default": model.serve, "predict_image_bytes": model.serve_bytes},
    )
    saved_model = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    return saved_model.meta_graphs[0].signature_def


def test_signature_tensor_infos_serve_as_input_specs(signature_defs):
    def lookup(signature_name):
        return signature_defs[signature_name or "serving_default"].inputs

    _, inputs, _ = parse({"instances": [[[[0.5]] * 28] * 28]}, lookup)
    assert inputs["images"].dtype == np.float32
    assert inputs["images"].shape == (1, 28, 28, 1)
    _, inputs, _ = parse(
        {"signature_name": "predict_image_bytes", "inputs": [{"b64": "iVBORw=="}]}, lookup
    )
    assert inputs["image_bytes"].tolist() == [b"\x89PNG"]


def test_metadata_json_matches_tf_serving(signature_defs):
    result = format_metadata("digits", 7, signature_defs)
    assert result["model_spec"] == {"name": "digits", "signature_name": "", "version": "7"}
    signatures = result["metadata"]["signature_def"]["signature_def"]
    assert set(signatures) >= {"serving_default", "predict_image_bytes"}
    images = signatures["serving_default"]["inputs"]["images"]
    assert images["dtype"] == "DT_FLOAT"
    assert images["name"] == "serving_default_images:0"
    assert images["tensor_shape"] == {
        "dim": [
            {"size": "-1", "name": ""},
            {"size": "28", "name": ""},
            {"size": "28", "name": ""},
            {"size": "1", "name": ""},
        ],
        "unknown_rank": False,
    }
    assert signatures["serving_default"]["method_name"] == "tensorflow/serving/predict"
    assert signatures["predict_image_bytes"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    assert signatures["predict_image_bytes"]["outputs"]["lengths"]["dtype"] == "DT_INT32"

    # What TF Serving's GetModelMetadataImpl builds, printed as its REST handler prints it.
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = "digits"
    response.model_spec.version.value = 7
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature_def in signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature_def)
    response.metadata["signature_def"].Pack(signature_map)
    unpacked = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(unpacked)
    options = {"preserving_proto_field_name": True, "always_print_fields_with_no_presence": True}
    assert result == {
        "model_spec": json_format.MessageToDict(response.model_spec, **options),
        "metadata": {"signature_def": json_format.MessageToDict(unpacked, **options)},
    }
    assert format_metadata("digits", 7, signature_map) == result
    parsed = json_format.ParseDict(
        result["metadata"]["signature_def"], get_model_metadata_pb2.SignatureDefMap()
    )
    assert parsed == signature_map
    assert json_format.ParseDict(result["model_spec"], model_pb2.ModelSpec()) == response.model_spec


# --- the orjson fast path for bytes bodies ----------------------------------------------------

DBL_MAX_DIGITS = str(int(np.finfo(np.float64).max))  # 309 digits, refused by rapidjson
TRICKY_BODIES = [
    '{"instances": [[1.5, 2.25], [3, 4]]}',
    '{"instances": [0e400]}',
    '{"instances": [0.0e+400]}',
    '{"instances": [1E308, 1e-400, 1e+99, 2e-05]}',
    '{"instances": [1e999]}',
    '{"instances": [' + DBL_MAX_DIGITS + "]}",
    '{"instances": [' + "1" * 309 + "]}",
    '{"instances": [' + "9" * 400 + ".5]}",
    '{"instances": [18446744073709551615, 18446744073709551616, -9223372036854775809]}',
    '{"instances": [NaN, Infinity, -Infinity]}',
    '{"instances": [1]} trailing',
    '\ufeff{"instances": [2]}',
    '{"instances": [1], "s": "\\ud800"}',
    '{"instances": [1], "s": "\\udc00"}',
    '{"instances": [1], "s": "\\ud83d\\ude00 e500 1e500"}',
    '{"instances": [1], "s": "a\tb"}',
    '{"instances": [1], "instances": [2]}',
    '{"instances": [' + "[" * (MAX_JSON_DEPTH + 2) + "1" + "]" * (MAX_JSON_DEPTH + 2) + "]}",
    '  {"inputs": {"images": [[1, 2]]}, "signature_name": "serving_default"}  ',
    '{"instances": [1,}',
    "[1, 2]",
]


def _outcome(body, specs):
    try:
        signature, inputs, form = parse_predict_body(body, specs)
    except (RestFormatError, RestUnimplementedError) as error:
        return ("error", error.message)
    return (signature, form, {k: (v.dtype, v.tolist()) for k, v in inputs.items()})


@pytest.mark.parametrize("body", TRICKY_BODIES, ids=range(len(TRICKY_BODIES)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_bytes_bodies_parse_as_the_exact_rapidjson_path_does(body, dtype):
    """Bytes bodies (what the server gets) may take orjson; str bodies always take the exact
    parser: the value or the error must be the same, including where the two JSON readers
    disagree (0e400, DBL_MAX written out, NaN, trailing content, BOM, surrogates, depth)."""
    specs = {"images": (dtype, None)}
    fast = _outcome(body.encode("utf-8", "surrogatepass"), specs)
    exact = _outcome(body, specs)
    if fast[0] != "error" and any(np.isnan(v).any() for _, v in [fast[2]["images"]]):
        assert str(fast) == str(exact)  # NaN != NaN
    else:
        assert fast == exact


def test_a_plain_numeric_body_is_parsed_by_orjson_not_the_stdlib(monkeypatch):
    from convstack.serving import rest_json

    class Refuse:
        def raw_decode(self, *args):
            raise AssertionError("the stdlib decoder was used")

    monkeypatch.setattr(rest_json, "_DECODER", Refuse())
    body = json.dumps({"instances": np.zeros((2, 3), np.float32).tolist()})
    _, inputs, _ = parse_predict_body(body.encode(), {"x": (np.float32, None)})
    assert inputs["x"].shape == (2, 3)
    with pytest.raises(AssertionError, match="stdlib decoder"):
        parse_predict_body(body, {"x": (np.float32, None)})
