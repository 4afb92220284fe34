"""Load SavedModel versions the way TensorFlow Serving does, and report what it sees, as JSON.

Run by tests/compat with two interpreters, TensorFlow Serving's TensorFlow (2.20, in a venv of
its own) and ours (2.21), and the two reports are compared. Standalone on purpose: it imports
only TensorFlow, numpy and tensorflow-serving-api, never convstack, which that venv lacks.

    python load_like_tf_serving.py BATCH.npy VERSION_DIR... > report.json

Each version is loaded as TF Serving's SavedModelBundle loads it: its "serve" MetaGraphDef
imported into a session of its own, variables restored and the init op run (the C++ loader's
steps, in tf.compat.v1's saved_model loader); the signatures listed from the MetaGraphDef; each
warmup record in assets.extra/tf_serving_warmup_requests parsed as a PredictionLog and replayed
through its signature, as TF Serving replays them before it calls a version AVAILABLE; and the
float image batch run through every signature whose only input is a float tensor.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

WARMUP = os.path.join("assets.extra", "tf_serving_warmup_requests")


def tensor_info(info) -> dict:
    """A TensorInfo as TF Serving's metadata shows it. The `__saved_model_init_op` entry's
    output is an op, not a tensor: its dtype is DT_INVALID (0)."""
    shape = None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]
    dtype = tf.dtypes.as_dtype(info.dtype).name if info.dtype else "DT_INVALID"
    return {"encoding": info.WhichOneof("encoding"), "dtype": dtype, "shape": shape}


def signatures(meta_graph) -> dict:
    return {
        key: {
            "method_name": signature.method_name,
            "inputs": {name: tensor_info(i) for name, i in sorted(signature.inputs.items())},
            "outputs": {name: tensor_info(o) for name, o in sorted(signature.outputs.items())},
        }
        for key, signature in sorted(meta_graph.signature_def.items())
    }


def run(session, signature, feeds: dict) -> dict:
    """The signature's outputs for `feeds` (input alias -> array), by tensor name."""
    names = sorted(signature.outputs)
    fetched = session.run(
        [signature.outputs[name].name for name in names],
        {signature.inputs[alias].name: value for alias, value in feeds.items()},
    )
    return {name: np.asarray(value).tolist() for name, value in zip(names, fetched, strict=True)}


def warmup_records(path: str) -> list:
    records = []
    for raw in tf.compat.v1.io.tf_record_iterator(os.path.join(path, WARMUP)):
        log = prediction_log_pb2.PredictionLog.FromString(raw)
        assert log.WhichOneof("log_type") == "predict_log", log.WhichOneof("log_type")
        records.append(log.predict_log.request)
    return records


def report(path: str, batch: np.ndarray) -> dict:
    graph = tf.Graph()
    with tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
        listed = signatures(meta_graph)
        warmup = []
        for request in warmup_records(path):
            key = request.model_spec.signature_name or "serving_default"
            feeds = {alias: tf.make_ndarray(proto) for alias, proto in request.inputs.items()}
            outputs = run(session, meta_graph.signature_def[key], feeds)
            warmup.append({"signature": key, "outputs": outputs})
        batch_outputs = {}
        for key, signature in sorted(meta_graph.signature_def.items()):
            inputs = list(signature.inputs.values())
            if len(inputs) == 1 and tf.dtypes.as_dtype(inputs[0].dtype) == tf.float32:
                alias = next(iter(signature.inputs))
                batch_outputs[key] = run(session, signature, {alias: batch})
    return {"signatures": listed, "warmup": warmup, "batch": batch_outputs}


def main(argv: list[str]) -> int:
    batch = np.load(argv[0])
    versions = {path: report(path, batch) for path in argv[1:]}
    json.dump({"tensorflow": tf.__version__, "versions": versions}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
