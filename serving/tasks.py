"""Classify, Regress and MultiInference over tf.Example inputs, as TF Serving runs them.

Pure: protos and numpy, no TensorFlow runtime. A task is planned from the version's
SignatureDefs (which tensor takes the serialized Examples, which tensors to fetch), the
Examples become one DT_STRING tensor, and the fetched tensors become a ClassificationResult or
RegressionResult. Checks, order and messages follow TF Serving's classifier.cc, regressor.cc,
multi_inference.cc and util.cc. The signature method-name check is off unless asked for
(TF Serving's --enable_signature_method_name_check, default false): then any signature with
the right inputs and outputs serves, whatever method_name it carries (TF2 exports write
`tensorflow/serving/predict` on their classify and regress signatures).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import classification_pb2, input_pb2, regression_pb2

from convstack.client.tensors import DTYPE_TO_ENUM, dtype_name
from convstack.serving.errors import FailedPrecondition, Internal, InvalidArgument, Unimplemented

DEFAULT_SIGNATURE = "serving_default"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY = "classify"
REGRESS = "regress"
# SignatureDef keys of the classify and regress APIs (signature_constants).
EXAMPLES_INPUT = "inputs"
CLASSES_OUTPUT = "classes"
SCORES_OUTPUT = "scores"
REGRESS_OUTPUT = "outputs"

_METHODS = {CLASSIFY: CLASSIFY_METHOD, REGRESS: REGRESS_METHOD}
_NOUNS = {CLASSIFY: "classification", REGRESS: "regression"}

SignatureDefs = Mapping[str, meta_graph_pb2.SignatureDef]


@dataclass(frozen=True)
class TaskPlan:
    """One classify or regress task: the signature and the graph tensors it feeds and fetches."""

    kind: str  # CLASSIFY or REGRESS
    signature_key: str
    signature: meta_graph_pb2.SignatureDef
    input_tensor: str
    output_tensors: tuple[str, ...]


def signature_key(name: str) -> str:
    return name or DEFAULT_SIGNATURE


def _debug_string(signature: meta_graph_pb2.SignatureDef) -> str:
    return " ".join(str(signature).split())


def check_structure(kind: str, signature: meta_graph_pb2.SignatureDef, method_check: bool):
    """(input tensor, output tensors) of a classify/regress signature, or InvalidArgument
    (PreProcessClassification / PreProcessRegression)."""
    if method_check and signature.method_name != _METHODS[kind]:
        raise InvalidArgument(
            f"Expected {_NOUNS[kind]} signature method_name to be {_METHODS[kind]}. "
            f"Was: {signature.method_name}"
        )
    if len(signature.inputs) != 1:
        raise InvalidArgument("Expected one input Tensor.")
    if kind == CLASSIFY and len(signature.outputs) not in (1, 2):
        raise InvalidArgument(f"Expected one or two output Tensors, found {len(signature.outputs)}")
    if kind == REGRESS and len(signature.outputs) != 1:
        raise InvalidArgument("Expected one output Tensor.")
    if EXAMPLES_INPUT not in signature.inputs:
        raise InvalidArgument(
            f"No {_NOUNS[kind]} inputs found in SignatureDef: {_debug_string(signature)}"
        )
    return signature.inputs[EXAMPLES_INPUT].name, _output_tensors(kind, signature)


def _output_tensors(kind: str, signature: meta_graph_pb2.SignatureDef) -> tuple[str, ...]:
    outputs = signature.outputs
    if kind == REGRESS:
        if REGRESS_OUTPUT not in outputs:
            raise InvalidArgument(
                f"No regression outputs found in SignatureDef: {_debug_string(signature)}"
            )
        return (outputs[REGRESS_OUTPUT].name,)
    names = tuple(outputs[key].name for key in (CLASSES_OUTPUT, SCORES_OUTPUT) if key in outputs)
    if not names:
        raise InvalidArgument(
            'Expected classification signature outputs to contain at least one of "classes" '
            f'or "scores". Signature was: {_debug_string(signature)}'
        )
    return names


def check_predict_method(signature: meta_graph_pb2.SignatureDef, method_check: bool) -> None:
    """Predict serves predict, classify and regress signatures when the check is on
    (predict_util.cc VerifySignature, which reports it as INTERNAL)."""
    if method_check and signature.method_name not in (
        PREDICT_METHOD,
        CLASSIFY_METHOD,
        REGRESS_METHOD,
    ):
        raise Internal(
            "Expected prediction signature method_name to be one of {"
            f"{PREDICT_METHOD}, {CLASSIFY_METHOD}, {REGRESS_METHOD}}}. "
            f"Was: {signature.method_name}"
        )


def plan(
    kind: str, signature_defs: SignatureDefs, signature_name: str, *, method_check: bool
) -> TaskPlan:
    """Plan a Classify or Regress request (GetClassificationSignatureDef and friends)."""
    key = signature_key(signature_name)
    signature = signature_defs.get(key)
    if signature is None:
        raise InvalidArgument(f"No signature was found with the name: {key}")
    input_tensor, output_tensors = check_structure(kind, signature, method_check)
    return TaskPlan(kind, key, signature, input_tensor, output_tensors)


def plan_multi_inference(
    tasks: Sequence[tuple[str, str, str]], signature_defs: SignatureDefs, *, method_check: bool
) -> list[TaskPlan]:
    """Plan MultiInference tasks given as (model name, signature name, method name).

    As TF Serving: every task names the same model, no signature twice, and only the classify
    and regress methods (UNIMPLEMENTED otherwise)."""
    plans: list[TaskPlan] = []
    model_name = ""
    for name, signature_name, method_name in tasks:
        if not name:
            raise InvalidArgument("Found ModelSpec with an empty model name.")
        if model_name and name != model_name:
            raise InvalidArgument(
                "All ModelSpecs in a MultiInferenceRequest must access the same model name."
            )
        model_name = name
        key = signature_key(signature_name)
        if any(existing.signature_key == key for existing in plans):
            raise InvalidArgument(f"Duplicate evaluation of signature: {key}")
        signature = signature_defs.get(key)
        if signature is None:
            raise InvalidArgument(f"Requested signature not found in model graph: {key}")
        kind = {CLASSIFY_METHOD: CLASSIFY, REGRESS_METHOD: REGRESS}.get(method_name)
        if kind is None:
            raise Unimplemented(f"Unsupported signature method_name: {method_name}")
        input_tensor, output_tensors = check_structure(kind, signature, method_check)
        plans.append(TaskPlan(kind, key, signature, input_tensor, output_tensors))
    return plans


def serialized_examples(request_input: input_pb2.Input) -> np.ndarray:
    """The request's Examples as a DT_STRING vector (InputToSerializedExampleTensor).

    With a context, each entry is the context's bytes followed by the example's: protobuf
    merges concatenated messages, so the example's features override the context's."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        examples = request_input.example_list.examples
        serialized = [example.SerializeToString() for example in examples]
    elif kind == "example_list_with_context":
        with_context = request_input.example_list_with_context
        context = with_context.context.SerializeToString()
        serialized = [context + example.SerializeToString() for example in with_context.examples]
    else:
        serialized = []
    if not serialized:
        raise InvalidArgument("Input is empty.")
    array = np.empty(len(serialized), dtype=object)
    array[:] = serialized
    return array


def _dims(array: np.ndarray) -> str:
    return "[" + ",".join(str(size) for size in array.shape) + "]"


def _check_matrix(what: str, array: np.ndarray | None, kind: str, num_examples: int) -> None:
    if array is None:
        return
    if array.ndim != 2:
        raise InvalidArgument(
            f"Expected Tensor shape: [batch_size num_classes] but got {_dims(array)}"
        )
    if kind == "string" and array.dtype.kind not in "OSU":
        raise InvalidArgument(f"Expected classes Tensor of DT_STRING. Got: {_dtype_name(array)}")
    if kind == "float" and array.dtype != np.float32:
        raise InvalidArgument(f"Expected scores Tensor of DT_FLOAT. Got: {_dtype_name(array)}")
    if array.shape[0] != num_examples:
        raise InvalidArgument(
            f"Expected {what} output batch size of {num_examples}. Got: {array.shape[0]}"
        )


def _dtype_name(array: np.ndarray) -> str:
    """The DataType name TF Serving's messages print (DataType_Name)."""
    if array.dtype.kind in "OSU":
        return "DT_STRING"
    enum = DTYPE_TO_ENUM.get(array.dtype)
    return dtype_name(enum) if enum is not None else f"<dtype {array.dtype}>"


def classification_result(
    task: TaskPlan, num_examples: int, fetched: Mapping[str, np.ndarray]
) -> classification_pb2.ClassificationResult:
    """Classes and scores as one Classifications per example (PostProcessClassificationResult)."""
    outputs = task.signature.outputs
    classes = _fetched(outputs, CLASSES_OUTPUT, fetched)
    scores = _fetched(outputs, SCORES_OUTPUT, fetched)
    _check_matrix("classes", classes, "string", num_examples)
    _check_matrix("scores", scores, "float", num_examples)
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise InvalidArgument(
            "Tensors class and score should match in dim_size(1). Got "
            f"{classes.shape[1]} vs. {scores.shape[1]}"
        )
    num_classes = (classes if classes is not None else scores).shape[1]
    result = classification_pb2.ClassificationResult()
    for row in range(num_examples):
        classifications = result.classifications.add()
        for column in range(num_classes):
            entry = classifications.classes.add()
            if classes is not None:
                entry.label = _label(classes[row, column])
            if scores is not None:
                entry.score = float(scores[row, column])
    return result


def _label(value) -> str:
    # Labels are bytes in TensorFlow; the proto field is a string.
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _fetched(outputs, key: str, fetched: Mapping[str, np.ndarray]) -> np.ndarray | None:
    if key not in outputs:
        return None
    return np.asarray(fetched[outputs[key].name])


def regression_result(
    task: TaskPlan, num_examples: int, fetched: Mapping[str, np.ndarray]
) -> regression_pb2.RegressionResult:
    """One Regression per example from `outputs` (PostProcessRegressionResult)."""
    output = task.signature.outputs.get(REGRESS_OUTPUT)
    if output is None:
        raise FailedPrecondition(
            f"No regression outputs found in SignatureDef: {_debug_string(task.signature)}"
        )
    values = np.asarray(fetched[output.name])
    if not (values.ndim == 1 or (values.ndim == 2 and values.shape[1] == 1)):
        raise InvalidArgument(
            "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got "
            f"{_dims(values)}"
        )
    if values.shape[0] != num_examples:
        raise InvalidArgument(
            "Input batch size did not match output batch size: "
            f"{num_examples} vs. {values.shape[0]}"
        )
    if values.dtype != np.float32:
        raise InvalidArgument(f"Expected output Tensor of DT_FLOAT.  Got: {_dtype_name(values)}")
    result = regression_pb2.RegressionResult()
    for value in values.ravel().tolist():
        result.regressions.add().value = value
    return result


def task_result(task: TaskPlan, num_examples: int, fetched: Mapping[str, np.ndarray]):
    """The ClassificationResult or RegressionResult of one planned task."""
    if task.kind == CLASSIFY:
        return classification_result(task, num_examples, fetched)
    return regression_result(task, num_examples, fetched)
