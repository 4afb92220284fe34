"""Signature parsing and local input validation (pure: no server)."""

from __future__ import annotations

import numpy as np
import pytest
from tensorflow_serving.apis import get_model_metadata_pb2

from convstack.client.errors import PredictionError
from convstack.client.signature import (
    SignatureSpec,
    TensorSpec,
    check_output_filter,
    dtype_label,
    find_signature,
    parse_signature_def_map,
    prepare_inputs,
)

DT_FLOAT, DT_INT64, DT_STRING, DT_HALF, DT_RESOURCE = 1, 9, 7, 19, 20

IMAGES = SignatureSpec(
    "serving_default",
    {"images": TensorSpec("float32", (-1, 28, 28, 1))},
    {"classes": TensorSpec("int64", (-1,)), "probabilities": TensorSpec("float32", (-1, 10))},
    "tensorflow/serving/predict",
)
TWO_INPUTS = SignatureSpec(
    "pair",
    {"ids": TensorSpec("int64", (-1,)), "text": TensorSpec("string", (-1,))},
    {"score": TensorSpec("float32", None)},
)


def _signature_map() -> get_model_metadata_pb2.SignatureDefMap:
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    main = signature_map.signature_def["serving_default"]
    main.method_name = "tensorflow/serving/predict"
    main.inputs["images"].dtype = DT_FLOAT
    for size in (-1, 28, 28, 1):
        main.inputs["images"].tensor_shape.dim.add(size=size)
    main.outputs["classes"].dtype = DT_INT64
    main.outputs["classes"].tensor_shape.dim.add(size=-1)
    main.outputs["anything"].dtype = DT_HALF
    main.outputs["anything"].tensor_shape.unknown_rank = True
    init = signature_map.signature_def["__saved_model_init_op"]
    init.outputs["__saved_model_init_op"].tensor_shape.unknown_rank = True
    return signature_map


def test_signature_def_map_becomes_plain_python_without_internal_signatures():
    specs = parse_signature_def_map(_signature_map())

    assert list(specs) == ["serving_default"]
    assert specs["serving_default"].as_dict() == {
        "inputs": {"images": {"dtype": "float32", "shape": [-1, 28, 28, 1]}},
        "outputs": {
            "anything": {"dtype": "float16", "shape": None},
            "classes": {"dtype": "int64", "shape": [-1]},
        },
        "method_name": "tensorflow/serving/predict",
    }


def test_spec_dicts_round_trip():
    assert SignatureSpec.from_dict(IMAGES.name, IMAGES.as_dict()) == IMAGES
    assert SignatureSpec.from_dict(TWO_INPUTS.name, TWO_INPUTS.as_dict()) == TWO_INPUTS


@pytest.mark.parametrize(
    ("enum", "label"),
    [(DT_FLOAT, "float32"), (DT_STRING, "string"), (DT_HALF, "float16"), (DT_RESOURCE, "resource")],
)
def test_dtype_labels(enum, label):
    assert dtype_label(enum) == label


def test_unknown_signature_fails_like_the_server_naming_the_known_ones():
    with pytest.raises(PredictionError) as caught:
        find_signature({"serving_default": IMAGES}, "nope", "tiny")

    assert caught.value.code == "FAILED_PRECONDITION"
    assert '"nope"' in caught.value.message and "serving_default" in caught.value.message


def test_one_array_feeds_a_single_input_signature_unchanged():
    array = np.zeros((3, 28, 28, 1), np.float32)

    prepared = prepare_inputs(IMAGES, array)

    assert list(prepared) == ["images"]
    assert prepared["images"] is array


def test_one_array_for_a_multi_input_signature_is_refused():
    with pytest.raises(PredictionError, match="pass a dict") as caught:
        prepare_inputs(TWO_INPUTS, np.zeros(2, np.int64))
    assert caught.value.code == "INVALID_ARGUMENT"


def test_lists_take_the_signature_dtype():
    prepared = prepare_inputs(TWO_INPUTS, {"ids": [1, 2], "text": [b"a", "b"]})

    assert prepared["ids"].dtype == np.int64
    assert prepared["text"].dtype == object
    assert prepared["text"].tolist() == [b"a", "b"]
    nested = prepare_inputs(IMAGES, np.zeros((1, 28, 28, 1)).tolist())
    assert nested["images"].dtype == np.float32


def _error(spec, inputs, **kwargs) -> PredictionError:
    with pytest.raises(PredictionError) as caught:
        prepare_inputs(spec, inputs, **kwargs)
    assert caught.value.code == "INVALID_ARGUMENT"
    return caught.value


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        (np.zeros((2, 28, 28, 1), np.float64), ["'images'", "float32", "float64"]),
        (np.zeros((2, 28, 28, 1), np.uint8), ["'images'", "float32", "uint8"]),
        (np.zeros((28, 28, 1), np.float32), ["'images'", "[-1, 28, 28, 1]", "[28, 28, 1]"]),
        (np.zeros((2, 28, 27, 1), np.float32), ["'images'", "[2, 28, 27, 1]"]),
        ({"image": np.zeros((2, 28, 28, 1), np.float32)}, ["unknown input 'image'", "images"]),
        ({}, ["missing input 'images'"]),
    ],
)
def test_mistakes_fail_locally_naming_the_input(inputs, words):
    error = _error(IMAGES, inputs)

    for word in words:
        assert word in error.message


def test_dtype_errors_carry_what_was_expected_and_given():
    error = _error(IMAGES, np.zeros((1, 28, 28, 1), np.float64))

    assert error.details == {"input": "images", "expected": "float32", "given": "float64"}


@pytest.mark.parametrize(
    ("inputs", "word"),
    [
        ({"ids": [1.5], "text": [b"a"]}, "float64"),  # floats would be truncated into int64
        ({"ids": ["7"], "text": [b"a"]}, "'ids'"),  # text is not a number
        ({"ids": [1], "text": [1, 2]}, "'text'"),  # numbers are not strings
        ({"ids": [1], "text": np.array([1, 2], dtype=object)}, "'text'"),
    ],
)
def test_lossy_or_meaningless_conversions_are_refused(inputs, word):
    assert word in _error(TWO_INPUTS, inputs).message


def test_overflowing_python_ints_are_refused():
    spec = SignatureSpec("s", {"small": TensorSpec("uint8", (-1,))}, {})

    assert "'small'" in _error(spec, [300]).message


def test_unknown_rank_accepts_any_shape():
    spec = SignatureSpec("s", {"any": TensorSpec("float32", None)}, {})

    assert prepare_inputs(spec, np.zeros((2, 3, 4), np.float32))["any"].shape == (2, 3, 4)


def test_without_validation_values_pass_unchecked():
    array = np.zeros((2, 5), np.float64)

    assert prepare_inputs(IMAGES, array, validate=False)["images"] is array
    assert prepare_inputs(None, {"x": [1, 2]})["x"].dtype == np.int64


def test_unknown_output_filter_alias_fails_locally():
    check_output_filter(IMAGES, ["classes"])
    with pytest.raises(PredictionError, match="'logits'") as caught:
        check_output_filter(IMAGES, ["classes", "logits"])
    assert caught.value.code == "INVALID_ARGUMENT"
