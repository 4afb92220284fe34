"""The status codes TF Serving gives a request, from the request alone, for the tiny model the
adversarial server serves (version 1, no labels). Each function follows TF Serving's order of
checks (TFSERVING_CONTRACT.md): model spec, servable, signature, input aliases; past those the
request is the tensors' and the kernels' business, which answer OK or INVALID_ARGUMENT."""

from __future__ import annotations

from tests.serving.conformance.conftest import MODEL

OK = "OK"
INVALID_ARGUMENT = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
FAILED_PRECONDITION = "FAILED_PRECONDITION"
INTERNAL = "INTERNAL"
VERSION = 1
# The tiny model's signatures and their input aliases.
SIGNATURE_INPUTS = {"serving_default": {"images"}, "predict_image_bytes": {"image_bytes"}}
# TF2's initializer is in the SignatureDef map TF Serving looks keys up in, so TF Serving goes
# on to the inputs and fails running it (a NoOp fetch); ours treats it as metadata, not an
# endpoint (servable.py INIT_OP_SIGNATURE), and answers that the key is not found.
INIT_OP_SIGNATURE = "__saved_model_init_op"
# Anything wrong past the input aliases: a tensor that does not parse or is over the size
# limit (predict_util.cc "tensor parsing error"), a dtype, an output_filter alias, or a shape
# the kernels refuse.
PAST_ALIASES = frozenset({OK, INVALID_ARGUMENT})


def servable_code(request) -> str | None:
    """The code of resolving request.model_spec to a servable, None when it resolves (TF
    Serving's predict_impl.cc / get_model_metadata_impl.cc / ServerCore)."""
    if not request.HasField("model_spec"):
        return INVALID_ARGUMENT  # "Missing ModelSpec"
    spec = request.model_spec
    if not spec.name:
        return INVALID_ARGUMENT  # "ModelSpec has no name specified." (ServerCore)
    choice = spec.WhichOneof("version_choice")
    if choice == "version_label":
        # No labels here, so whatever the name: "Unrecognized servable version label" (ServerCore
        # GetModelVersionForLabel looks the label up before any servable).
        return INVALID_ARGUMENT
    if spec.name != MODEL or (choice == "version" and spec.version.value != VERSION):
        return NOT_FOUND
    return None


def predict_codes(request) -> frozenset[str]:
    """What a PredictRequest may answer."""
    code = servable_code(request)
    if code is not None:
        return frozenset({code})
    signature = request.model_spec.signature_name or "serving_default"
    if signature == INIT_OP_SIGNATURE:
        return frozenset({FAILED_PRECONDITION, INVALID_ARGUMENT})
    if signature not in SIGNATURE_INPUTS:
        return frozenset({FAILED_PRECONDITION})  # 'Serving signature key "..." not found.'
    if set(request.inputs) != SIGNATURE_INPUTS[signature]:
        return frozenset({INVALID_ARGUMENT})  # "input size does not match signature" etc.
    return PAST_ALIASES


def status_codes(request) -> frozenset[str]:
    """What a GetModelStatusRequest may answer (get_model_status_impl.cc: it looks names up in
    the state monitor, so an empty name is NOT_FOUND, not ServerCore's INVALID_ARGUMENT)."""
    if not request.HasField("model_spec"):
        return frozenset({INVALID_ARGUMENT})
    spec = request.model_spec
    choice = spec.WhichOneof("version_choice")
    if spec.name != MODEL:
        tf_serving = NOT_FOUND
    elif choice == "version":
        tf_serving = OK if spec.version.value == VERSION else NOT_FOUND
    else:
        tf_serving = OK
    if choice == "version_label":
        # TF Serving's gRPC GetModelStatus ignores the label (every version of the name); ours
        # resolves it as its REST API does, so an unknown label is INVALID_ARGUMENT. Both pass.
        return frozenset({tf_serving, INVALID_ARGUMENT})
    return frozenset({tf_serving})


def metadata_codes(request) -> frozenset[str]:
    """What a GetModelMetadataRequest may answer: the spec, then the fields, then the servable
    (get_model_metadata_impl.cc)."""
    if not request.HasField("model_spec"):
        return frozenset({INVALID_ARGUMENT})
    fields = list(request.metadata_field)
    if not fields or any(field != "signature_def" for field in fields):
        return frozenset({INVALID_ARGUMENT})
    return frozenset({servable_code(request) or OK})


# Classify, Regress and MultiInference on a model with predict signatures only: refused by the
# spec, the servable, the signature or its method, or by the examples (classifier.cc,
# regressor.cc, multi_inference.cc); never UNKNOWN or INTERNAL.
TASK_CODES = frozenset({OK, INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION})
