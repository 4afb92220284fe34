"""serving.rest_examples: TF Serving's REST :classify / :regress bodies and results.

Mirrors json_tensor_test.cc's ClassifyRegressRequestTest (RequestNoContext,
RequestWithContextAndSignature, JsonErrors) and ClassifyRegressnResultTest, and the
AddValueToFeature / MakeExampleFromJsonObject rules of json_tensor.cc."""

from __future__ import annotations

import json
import math

import pytest
from google.protobuf import text_format
from tensorflow_serving.apis import classification_pb2, input_pb2, regression_pb2

from convstack.serving.rest_examples import (
    format_classification_result,
    format_regression_result,
    parse_examples_body,
)
from convstack.serving.rest_json import RestFormatError


def parse(body):
    return parse_examples_body(body if isinstance(body, (str, bytes)) else json.dumps(body))


def error_message(body) -> str:
    with pytest.raises(RestFormatError) as info:
        parse(body)
    assert info.value.code == "INVALID_ARGUMENT" and info.value.http_status == 400
    return info.value.message


def features(example) -> dict:
    """feature name -> (kind, values) of a tf.Example."""
    out = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        out[name] = (kind, list(getattr(feature, kind).value) if kind else [])
    return out


def test_examples_without_context_are_an_example_list():
    """RequestNoContext: strings -> bytes, decimals -> float, integers -> int64."""
    signature_name, model_input = parse(
        {
            "examples": [
                {"names": ["foo", "bar"], "ratings": [8.0, 9.0], "age": 20},
                {"names": ["baz"], "ratings": 6.0},
            ]
        }
    )
    assert signature_name == ""
    assert model_input.WhichOneof("kind") == "example_list"
    first, second = model_input.example_list.examples
    assert features(first) == {
        "names": ("bytes_list", [b"foo", b"bar"]),
        "ratings": ("float_list", [8.0, 9.0]),
        "age": ("int64_list", [20]),
    }
    assert features(second) == {
        "names": ("bytes_list", [b"baz"]),
        "ratings": ("float_list", [6.0]),
    }


def test_context_signature_b64_bools_and_non_finite_numbers():
    """RequestWithContextAndSignature: a context makes example_list_with_context; b64 objects
    are bytes, true/false mix with integers as 1/0, NaN and +-Infinity are floats."""
    body = """{
      "signature_name": "custom_signture",
      "context": {"query": "pizza", "location": ["sfo"]},
      "examples": [
        {"names": ["foo", "bar"], "ratings": [8.0, 9.0, NaN, Infinity], "age": 20},
        {"names": ["baz", {"b64": "aGVsbG8="}], "ratings": 6.0, "intboolmix": [1, true, false]},
        {"names": "bar", "ratings": -Infinity}
      ]
    }"""
    signature_name, model_input = parse(body)
    assert signature_name == "custom_signture"
    assert model_input.WhichOneof("kind") == "example_list_with_context"
    with_context = model_input.example_list_with_context
    assert features(with_context.context) == {
        "query": ("bytes_list", [b"pizza"]),
        "location": ("bytes_list", [b"sfo"]),
    }
    first, second, third = with_context.examples
    kind, ratings = features(first)["ratings"]
    assert kind == "float_list" and ratings[:2] == [8.0, 9.0]
    assert math.isnan(ratings[2]) and ratings[3] == math.inf
    assert features(second) == {
        "names": ("bytes_list", [b"baz", b"hello"]),
        "ratings": ("float_list", [6.0]),
        "intboolmix": ("int64_list", [1, 1, 0]),
    }
    assert features(third) == {
        "names": ("bytes_list", [b"bar"]),
        "ratings": ("float_list", [-math.inf]),
    }


def test_the_input_is_the_proto_tf_serving_builds():
    """The whole Input, compared with the text proto TF Serving's test expects."""
    _, model_input = parse({"examples": [{"x": 2.0}], "context": {"c": [1]}})
    expected = text_format.Parse(
        """
        example_list_with_context {
          context { features { feature { key: "c" value { int64_list { value: 1 } } } } }
          examples { features { feature { key: "x" value { float_list { value: 2.0 } } } } }
        }""",
        input_pb2.Input(),
    )
    assert model_input == expected


def test_an_empty_list_is_a_feature_of_no_kind_and_floats_round_to_float32():
    _, model_input = parse('{"examples": [{"e": [], "f": [0.1, 1e39]}]}')
    example = model_input.example_list.examples[0]
    assert example.features.feature["e"].WhichOneof("kind") is None
    values = list(example.features.feature["f"].float_list.value)
    assert values[0] == pytest.approx(0.1) and values[1] == math.inf  # GetFloat() overflows


def test_big_integers_beyond_int64_are_doubles_and_negative_int64_min_is_an_int():
    """rapidjson: -9223372036854775808 is an Int64, anything beyond (u)int64 a double."""
    body = '{"examples": [{"i": -9223372036854775808, "d": [-9223372036854775809]}]}'
    example = parse(body)[1].example_list.examples[0]
    assert features(example)["i"] == ("int64_list", [-(2**63)])
    assert features(example)["d"][0] == "float_list"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"signature_name": ["hello"], "examples": [{"names": ["foo", "bar"]}]},
            "'signature_name' key must be a string value.",
        ),
        ({"context": [{"names": ["foo"]}]}, "Example must be JSON object but got JSON Array"),
        ({"examples": {"names": ["foo", "bar"]}}, "Expecting 'examples' value to be an list/array"),
        ({"examples": [[{"names": ["foo"]}]]}, "Example must be JSON object but got JSON Array"),
        ({"examples": ["x"]}, "Example must be JSON object but got JSON String"),
        (
            {"examples": [{"names": [10, None]}]},
            "Feature: names has element with unexpected JSON type: Null",
        ),
        (
            {"examples": [{"names": [10, 10.0]}]},
            "Unexpected element type in feature: names expecting type: int64",
        ),
        (
            {"examples": [{"names": ["a", 1]}]},
            "Unexpected element type in feature: names expecting type: bytes",
        ),
        (
            {"examples": [{"names": [1.5, True]}]},
            "Unexpected element type in feature: names expecting type: float",
        ),
        (
            {"examples": [{"names": [1.5, {"b64": "aGk="}]}]},
            "Unexpected element type in feature: names expecting type: float",
        ),
        (
            {"examples": [{"names": [10, {"test": 10}]}]},
            "Feature: names has element with unexpected JSON type: Object",
        ),
        (
            {"examples": [{"names": [[10], 20]}]},
            "Feature: names has element with unexpected JSON type: Array",
        ),
        (
            {"examples": [{"names": [20, 18446744073709551603]}]},
            "Feature: names has uint64_t element. Only int64_t is supported.",
        ),
        ({"examples": [{"names": [{"b64": "!!"}]}]}, "Unable to base64 decode"),
    ],
    ids=lambda value: None,
)
def test_json_errors(body, expected):
    """JsonErrors, with TF Serving's full messages."""
    assert error_message(body).endswith(expected)


def test_missing_or_empty_examples_quote_the_document():
    """FormatError(doc, ...): the document as JsonValueToDebugString writes it."""
    assert error_message({"context": {}}) == (
        "JSON Value: {\n    \"context\": {}\n} When method is classify, key 'examples' is "
        "expected and was not found"
    )
    assert error_message({"examples": []}) == (
        "JSON Value: {\n    \"examples\": []\n} 'examples' value is an empty array"
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("", "JSON Parse error: The document is empty"),
        ("[1]", "JSON Value: [1] Is not object"),
        ('{"examples": [{"x": 1e999}]}', "Number too big to be stored in double. at offset: 20"),
        ('{"examples": [{"x": "\\ud800"}]}', "The surrogate pair in string is invalid."),
    ],
    ids=["empty", "not-object", "too-big", "surrogate"],
)
def test_bodies_are_parsed_as_for_predict(body, expected):
    """ParseJson is shared with predict: rapidjson's flags and error messages."""
    assert expected in error_message(body)


def test_a_lone_low_surrogate_is_kept_as_its_utf8_bytes():
    _, model_input = parse('{"examples": [{"x": "\\udc00"}]}')
    assert features(model_input.example_list.examples[0])["x"] == ("bytes_list", [b"\xed\xb0\x80"])


def test_classification_result_json():
    """JsonFromClassificationResult: one list of [label, score] per example; float32 scores
    as their shortest decimal (0.2, not 0.20000000298023224)."""
    result = text_format.Parse(
        """
        classifications {
          classes { label: "car" score: 0.2 }
          classes { label: "bike" score: 0.7 }
          classes { label: "bus" score: 0.1 }
        }
        classifications {
          classes { label: "car" score: 0.7 }
          classes { label: "bike" score: 0.1 }
          classes { label: "bus" score: 0.2 }
        }""",
        classification_pb2.ClassificationResult(),
    )
    body = format_classification_result(result)
    assert body == {
        "results": [
            [["car", 0.2], ["bike", 0.7], ["bus", 0.1]],
            [["car", 0.7], ["bike", 0.1], ["bus", 0.2]],
        ]
    }
    assert json.dumps(body) == (
        '{"results": [[["car", 0.2], ["bike", 0.7], ["bus", 0.1]], '
        '[["car", 0.7], ["bike", 0.1], ["bus", 0.2]]]}'
    )


def test_regression_result_json_with_non_finite_values():
    """JsonFromRegressionResult / JsonFromRegressionResultWithNonFinite: NaN and +-Infinity
    are written as the bare tokens TF Serving writes."""
    result = regression_pb2.RegressionResult()
    for value in (0.2, math.inf, 1.0, -math.inf, math.nan):
        result.regressions.add(value=value)
    body = format_regression_result(result)
    assert json.dumps(body) == '{"results": [0.2, Infinity, 1.0, -Infinity, NaN]}'


def test_empty_results_cannot_be_converted():
    """JsonFromResultErrors."""
    with pytest.raises(RestFormatError, match="Cannot convert empty ClassificationResults"):
        format_classification_result(classification_pb2.ClassificationResult())
    with pytest.raises(RestFormatError, match="Cannot convert empty RegressionResults"):
        format_regression_result(regression_pb2.RegressionResult())
