"""The simdjson path for large numeric REST bodies must give exactly what the general path gives
(the exact rapidjson walk for str bodies), and refuse, not guess, whatever it cannot prove."""

import json

import numpy as np
import pytest

from convstack.serving import rest_json, rest_json_arrays
from convstack.serving.rest_json import parse_predict_body
from tests.serving.test_rest_json import TRICKY_BODIES, _outcome

# Past rest_json's size gate for the path (trailing whitespace after the root is ignored).
PADDING = " " * 4096

STRUCTURE_BODIES = [
    '{"instances": [[1, 2], [3], [4, 5, 6]]}',  # ragged, but as many commas as a 3x2
    '{"instances": [[1, 2], 3]}',
    '{"instances": [3, [1, 2]]}',
    '{"instances": [[1], []]}',
    '{"instances": [[], []]}',
    '{"instances": []}',
    '{"instances": [[[1, 2]], [[3, 4]]]}',
    '{"instances": [[1, 2], [3, "4"]]}',
    '{"instances": [[1, true], [0, false]]}',
    '{"instances": [[1, null]]}',
    '{"instances": [{"images": [1, 2]}]}',
    '{"instances": [1, 2], "other": [3]}',
    '{"instances": [1, 2], "signature_name": 7}',
    '{"instances": [1, 2], "signature_name": "serving_default"}',
    '{"instances": [1, 2], "signature_name": "a[b],c"}',
    '{"signature_name": "]", "instances": [1, 2]}',
    '{"instances": [1, 2], "instances": [3, 4]}',
    '{"instances": [1, 2], "inputs": [3, 4]}',
    '{"inputs": [[1, 2], [3, 4]]}',
    '{"inputs": {"images": [[1, 2], [3, 4]]}}',
    '{"inputs": {"other": [[1, 2]]}}',
    '{"inputs": {"images": [1], "extra": 2}}',
    '{"instances": [-0, -0.0, 0, 1e-400, 4.9e-324, 3.4028235e38, 3.5e38, 1.7976931348623157e308]}',
    '{"instances": [9007199254740993, 18446744073709551615, -9223372036854775808]}',
    '{"instances": [1.0E+2, 2e-3, 1E5]}',
    '{"instances": [01]}',
    '{"instances": [1.]}',
    '{"instances": [.5]}',
    '{"instances": [+1]}',
    '{"instances": [1 2]}',
    '{"instances": [[1,,2]]}',
    '{"instances": [[1, 2],]}',
    '{"instances": ' + "[" * 40 + "1" + "]" * 40 + "}",
    '{"instances": [\t1,\n2\r]}',
    "[[1, 2]]",
    '{"instances": 5}',
    '{"instances": "[1, 2]"}',
    '{"instances": ["[1, 2]"]}',
    '{"instances": [1, 2]',
]

# Numbers rapidjson refuses (a whole part past DBL_MAX / 10 as it reads the digits) that
# simdjson reads, some only because an exponent brings them back into range.
LONG_NUMBER_BODIES = [
    '{"instances": [1' + "0" * 400 + "e-300]}",
    '{"instances": [1' + "0" * 305 + ".5e-300]}",
    '{"instances": [1' + "0" * 400 + "." + "1" * 2000 + "e-300]}",  # 'e-' far from the run
    '{"instances": [' + "1e-5, " * 100 + "1" + "0" * 400 + "e-300]}",  # many 'e-'
    '{"instances": [1' + "0" * 308 + ".5]}",
    '{"instances": [-1' + "0" * 308 + ".5E+0]}",
    '{"instances": [1' + "0" * 305 + ".5]}",  # 306 digits: both read it
    '{"instances": [0.' + "0" * 400 + "1e-5]}",  # a long fraction is no problem for either
]


def _same_outcome(body: str, dtype) -> None:
    specs = {"images": (dtype, None)}
    fast = _outcome(body.encode("utf-8", "surrogatepass"), specs)
    exact = _outcome(body, specs)
    assert str(fast) == str(exact)  # str: NaN compares unequal to itself


@pytest.mark.parametrize("body", STRUCTURE_BODIES + TRICKY_BODIES + LONG_NUMBER_BODIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_large_bodies_parse_as_the_exact_path_does(body, dtype):
    _same_outcome(body + PADDING, dtype)


def test_the_exponent_screen_looks_at_a_bounded_number_of_exponents(monkeypatch):
    """Windows before at most _EXPONENTS_SCREENED exponents; past that, one scan of the body."""
    windows = []
    screen = rest_json._long_run_before
    monkeypatch.setattr(
        rest_json, "_long_run_before", lambda raw, at: windows.append(at) or screen(raw, at)
    )
    many = ('{"instances": [' + "1e-5, " * 10_000 + "1" + "0" * 400 + "e-300]}").encode()
    assert rest_json._long_run_before_negative_exponent(many)
    assert 0 < len(windows) <= rest_json._EXPONENTS_SCREENED
    _same_outcome(many.decode(), np.float32)


def test_batches_of_images_take_simdjson_not_orjson(monkeypatch):
    images = np.random.default_rng(0).uniform(0, 1, (32, 28, 28, 1)).astype(np.float32)
    body = json.dumps({"instances": images.tolist()}).encode()

    def refuse(_):
        raise AssertionError("orjson was used")

    monkeypatch.setattr(rest_json.orjson, "loads", refuse)
    signature, inputs, form = parse_predict_body(body, {"images": (np.float32, None)})
    assert (signature, form) == ("", rest_json.ROW)
    assert inputs["images"].dtype == np.float32
    np.testing.assert_array_equal(inputs["images"], images)
    ragged = b'{"instances": [[1, 2], [3], [4, 5, 6]]}' + PADDING.encode()
    with pytest.raises(AssertionError, match="orjson was used"):
        parse_predict_body(ragged, {"images": (np.float32, None)})


def test_columnar_and_named_bodies_keep_their_format_and_signature():
    values = np.arange(600, dtype=np.float32).reshape(2, 300) / 7
    specs = {"x": (np.float32, None)}
    for document, form in [
        ({"inputs": values.tolist(), "signature_name": "s"}, rest_json.COLUMNAR),
        ({"inputs": {"x": values.tolist()}, "signature_name": "s"}, rest_json.COLUMNAR),
        ({"signature_name": "s", "instances": values.tolist()}, rest_json.ROW),
    ]:
        signature, inputs, parsed_form = parse_predict_body(json.dumps(document).encode(), specs)
        assert (signature, parsed_form) == ("s", form)
        np.testing.assert_array_equal(inputs["x"], values)


def test_the_signature_lookup_errors_still_propagate():
    body = json.dumps({"instances": [[0.5] * 600], "signature_name": "missing"}).encode()

    def lookup(name):
        raise rest_json.RestFormatError(f"no signature {name}")

    with pytest.raises(rest_json.RestFormatError, match="no signature missing"):
        parse_predict_body(body, lookup)


@pytest.mark.parametrize(
    "shape", [(1,), (5,), (3, 1), (2, 3, 4), (1, 1, 1, 1), (4, 28, 28, 1)], ids=str
)
def test_regular_structure_is_what_json_dumps_writes(shape):
    written = json.dumps(np.zeros(shape).tolist()).encode()
    structure = rest_json_arrays.array_structure(b'{"a": ' + written + b"}")
    assert structure == rest_json_arrays.regular_structure(shape)
    assert len(structure) == rest_json_arrays.regular_structure_length(shape)


@pytest.mark.parametrize(
    "body",
    [b'{"a": 1}', b'{"a": [1], "b": [2]}', b'{"a": [1], "b": "]"}', b'{"a": [{"b": 1}]}', b"]["],
)
def test_bodies_without_one_plain_array_have_no_structure(body):
    assert rest_json_arrays.array_structure(body) is None


def test_long_first_elements_do_not_make_the_check_allocate_their_product(monkeypatch):
    # The first element of every level is 3000 long, so the lengths along them multiply to
    # 2.7e10, while the body holds a few thousand numbers.
    row = "[" + ",".join(["0"] * 3000) + "]"
    level2 = "[" + ",".join([row] + ["[0]"] * 2999) + "]"
    body = ('{"instances": [' + ",".join([level2] + ["[[0]]"] * 2999) + "]}").encode()

    def refuse(shape):
        raise AssertionError(f"wrote the structure of a {shape} array")

    monkeypatch.setattr(rest_json_arrays, "regular_structure", refuse)
    assert rest_json_arrays.numeric_body(body) is None
