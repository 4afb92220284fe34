"""The peer of `convstack bench serve --peer kserve`: a SavedModel behind KServe's Python
`ModelServer`, written the way KServe's docs write a custom model (a `kserve.Model` subclass with
`load` and `predict`, `ModelServer().start([model])`, every server setting at its default).

Runs in the peer's own venv (convstack/bench/peer.py makes it), not in convstack's: it imports
only kserve, TensorFlow and numpy. v1 REST is TF Serving's row format (`{"instances": [...]}` in,
`{"predictions": [...]}` out, one {output: value} object per row); v2 gRPC answers with raw
output contents. `--gc_freeze` adds the one line convstack's server has: `gc.freeze()` after
loading, so the collector stops walking TensorFlow's large heap.

Usage: python kserve_model.py --model_name digits --model_dir DIR/1 --http_port P --grpc_port Q
       [--gc_freeze] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc

import numpy as np
import tensorflow as tf
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve.utils.utils import from_np_dtype


class SavedModelPredictor(Model):
    """One SavedModel signature; inputs by name, outputs every tensor the signature returns."""

    def __init__(self, name: str, model_dir: str, signature: str = "serving_default"):
        super().__init__(name)
        self.model_dir = model_dir
        self.signature_name = signature
        self.signature = None
        self.input_name = None

    def load(self) -> bool:
        loaded = tf.saved_model.load(self.model_dir)
        self.signature = loaded.signatures[self.signature_name]
        self._loaded = loaded  # keeps the variables alive
        (self.input_name,) = self.signature.structured_input_signature[1]
        self.ready = True
        return self.ready

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.signature(**{self.input_name: tf.constant(images, tf.float32)})
        return {name: tensor.numpy() for name, tensor in outputs.items()}

    def predict(self, payload, headers=None, response_headers=None):
        if isinstance(payload, InferRequest):
            outputs = self._run(payload.inputs[0].as_numpy())
            infer_outputs = []
            for name, array in sorted(outputs.items()):
                output = InferOutput(name, list(array.shape), from_np_dtype(array.dtype))
                output.set_data_from_numpy(array, binary_data=True)
                infer_outputs.append(output)
            return InferResponse(payload.id, self.name, infer_outputs)
        outputs = self._run(np.asarray(payload["instances"], dtype=np.float32))
        columns = {name: array.tolist() for name, array in outputs.items()}
        rows = zip(*columns.values(), strict=True)
        return {"predictions": [dict(zip(columns, row, strict=True)) for row in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_dir", required=True, help="the version directory")
    parser.add_argument("--gc_freeze", action="store_true", help="gc.freeze() after loading")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow intra/inter-op pools")
    args, _ = parser.parse_known_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    model = SavedModelPredictor(args.model_name, args.model_dir)
    model.load()
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    ModelServer().start([model])


if __name__ == "__main__":
    main()
