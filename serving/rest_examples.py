"""TF Serving's REST JSON for `:classify` and `:regress`: bodies -> tf.Example `Input`, results
-> JSON-ready dicts.

Pure and transport-free. Behaviour and error wording follow TF Serving's `util/json_tensor.cc`
(FillClassifyRegressRequestFromJson, MakeExampleFromJsonObject, AddValueToFeature,
MakeJsonFromClassificationResult, MakeJsonFromRegressionResult):

* `{"signature_name"?, "context"?: {...}, "examples": [{...}, ...]}`; with a context the input
  is `example_list_with_context`, otherwise `example_list`.
* Each example is an object of feature name -> value or list of values. JSON integers (and
  true/false, as 1/0) go to `int64_list`, other numbers (NaN and +-Infinity included) to
  `float_list`, strings and `{"b64": ...}` to `bytes_list`; all values of one feature must be
  of one kind. Integers above int64's range are refused; null, nested lists and other objects
  are errors.
* Results: `{"results": [[[label, score], ...], ...]}` (one list per example) and
  `{"results": [value, ...]}`; float32 scores and values are written with their shortest
  round-tripping decimal, as rest_json writes float32 outputs.

Errors raise rest_json.RestFormatError (INVALID_ARGUMENT, HTTP 400).
"""

from __future__ import annotations

from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow_serving.apis import classification_pb2, input_pb2, regression_pb2

from convstack.serving import rest_json
from convstack.serving.rest_json import RestFormatError

__all__ = ["format_classification_result", "format_regression_result", "parse_examples_body"]

_INT64_MAX = 2**63 - 1
_KIND_NAMES = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64"}


def _unexpected_type(name: str, value) -> RestFormatError:
    return RestFormatError(
        f"Feature: {name} has element with unexpected JSON type: {rest_json.json_type(value)}"
    )


def _values(feature: feature_pb2.Feature, kind: str, name: str):
    """The value list of `kind`, if the feature holds nothing or that kind already."""
    current = feature.WhichOneof("kind")
    if current is not None and current != kind:
        raise RestFormatError(
            f"Unexpected element type in feature: {name} expecting type: {_KIND_NAMES[current]}"
        )
    return getattr(feature, kind).value


def _add_value(value, name: str, feature: feature_pb2.Feature) -> None:
    """One JSON value into a Feature (AddValueToFeature)."""
    if value is None or isinstance(value, list):
        raise _unexpected_type(name, value)
    if isinstance(value, bool):
        _values(feature, "int64_list", name).append(1 if value else 0)
    elif isinstance(value, dict):
        if not rest_json.is_b64_object(value):
            raise _unexpected_type(name, value)
        values = _values(feature, "bytes_list", name)
        values.append(rest_json.decode_b64(value))
    elif isinstance(value, str):
        _values(feature, "bytes_list", name).append(rest_json.utf8_bytes(value))
    elif isinstance(value, float):  # rapidjson's IsDouble: any non-integer literal
        _values(feature, "float_list", name).append(value)
    else:
        values = _values(feature, "int64_list", name)
        if value > _INT64_MAX:
            raise RestFormatError(
                f"Feature: {name} has uint64_t element. Only int64_t is supported."
            )
        values.append(value)


def _example(value, example: example_pb2.Example) -> None:
    """One JSON object into a tf.Example (MakeExampleFromJsonObject)."""
    if not isinstance(value, dict):
        raise RestFormatError(
            f"Example must be JSON object but got JSON {rest_json.json_type(value)}"
        )
    for name, content in value.items():
        feature = feature_pb2.Feature()
        for item in content if isinstance(content, list) else [content]:
            _add_value(item, name, feature)
        try:
            example.features.feature[name].CopyFrom(feature)
        except (UnicodeError, ValueError):  # a name protobuf cannot hold (a lone surrogate)
            raise RestFormatError(
                f"Feature name {rest_json.debug_string(name)} is not valid UTF-8"
            ) from None


def parse_examples_body(body: bytes | str) -> tuple[str, input_pb2.Input]:
    """Parse a `:classify` or `:regress` body into (signature_name or "", Input).

    The JSON is read as rest_json reads predict bodies (TF Serving's rapidjson flags and parse
    errors). Raises RestFormatError with TF Serving's wording.
    """
    document = rest_json.parse_json_object(body)
    signature_name = rest_json.signature_name_of(document)
    model_input = input_pb2.Input()
    with_context = "context" in document
    if with_context:
        _example(document["context"], model_input.example_list_with_context.context)
    if "examples" not in document:
        # TF Serving says "classify" for both methods.
        raise RestFormatError(
            f"JSON Value: {rest_json.debug_string(document)} When method is classify, key "
            "'examples' is expected and was not found"
        )
    examples = document["examples"]
    if not isinstance(examples, list):
        raise RestFormatError(
            f"JSON Value: {rest_json.debug_string(document)} Expecting 'examples' value to be "
            "an list/array"
        )
    if not examples:
        raise RestFormatError(
            f"JSON Value: {rest_json.debug_string(document)} 'examples' value is an empty array"
        )
    target = (
        model_input.example_list_with_context.examples
        if with_context
        else model_input.example_list.examples
    )
    for value in examples:
        _example(value, target.add())
    return signature_name, model_input


def format_classification_result(result: classification_pb2.ClassificationResult) -> dict:
    """{"results": [[[label, score], ...] per example]}; serialize with json.dumps."""
    if not result.classifications:
        raise RestFormatError("Cannot convert empty ClassificationResults to JSON")
    return {
        "results": [
            [
                [cls.label, score]
                for cls, score in zip(
                    classes.classes,
                    rest_json.float32_json_values([c.score for c in classes.classes]),
                    strict=True,
                )
            ]
            for classes in result.classifications
        ]
    }


def format_regression_result(result: regression_pb2.RegressionResult) -> dict:
    """{"results": [value per example]}; serialize with json.dumps."""
    if not result.regressions:
        raise RestFormatError("Cannot convert empty RegressionResults to JSON")
    return {"results": rest_json.float32_json_values([r.value for r in result.regressions])}
