"""The SavedModels TF Serving's tensorflow_model_server_test.py builds with TensorFlow itself
(test_tf_saved_model_save*, test_*sequential_keras_saved_model_save), written the way those
cases write them, and two models with the signatures of TF Serving's example clients
(mnist_client.py, resnet_client_grpc.py): `python -m tests.serving.conformance.upstream_exports
OUT_DIR`.

Run as a subprocess: the tf.distribute case needs two logical CPUs, which TensorFlow only takes
before it initialises its devices, and the test process has long initialised them."""

from __future__ import annotations

import sys
from pathlib import Path

VERSION_DIR = "00000123"
MODELS = (
    "tf_saved_model_save",
    "multiple_signatures",
    "keras_sequential",
    "keras_distributed",
    "mnist",
    "resnet",
)
# resnet: the class each colour channel's mean votes for, out of 1000.
RESNET_CHANNEL_CLASSES = (7, 42, 999)


def _split_cpu() -> None:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )


def tf_saved_model_save(path: Path) -> None:
    """y = v1 * v2 * x with v1 = 3, v2 = 2, over a signature of unknown shape."""
    import tensorflow as tf

    root = tf.train.Checkpoint()
    root.v1 = tf.Variable(3.0)
    root.v2 = tf.Variable(2.0)
    root.f = tf.function(lambda x: {"y": root.v1 * root.v2 * x})
    signature = root.f.get_concrete_function(tf.TensorSpec(None, tf.float32))
    tf.saved_model.save(root, str(path), signature)


def multiple_signatures(path: Path) -> None:
    """serving_default answers 1.0, custom_signature_key 2.0."""
    import tensorflow as tf

    root = tf.train.Checkpoint()
    spec = [tf.TensorSpec(None, tf.float32)]
    root.f = tf.function(lambda x: {"y": 1.0}, input_signature=spec)
    root.g = tf.function(lambda x: {"y": 2.0}, input_signature=spec)
    tf.saved_model.save(
        root, str(path), signatures={"serving_default": root.f, "custom_signature_key": root.g}
    )


def _identity_model(dense: bool):
    import tensorflow as tf

    model = tf.keras.models.Sequential()
    model.add(tf.keras.layers.Input(dtype="float32", shape=(1,), name="x"))
    if dense:
        model.add(tf.keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros"))
    model.add(tf.keras.layers.Lambda(lambda x: x, name="y"))
    return model


def keras_sequential(path: Path) -> None:
    import tensorflow as tf

    tf.saved_model.save(_identity_model(dense=False), str(path))


def keras_distributed(path: Path) -> None:
    """The same under a two-replica MirroredStrategy, with a Dense layer of ones."""
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(devices=("/cpu:0", "/cpu:1"))
    with strategy.scope():
        model = _identity_model(dense=True)
    tf.saved_model.save(model, str(path))


def mnist(path: Path) -> None:
    """mnist_client.py's model: `predict_images` takes flat [batch, 784] images and answers
    `scores` [batch, 10]; the class is the brightest of the first ten pixels."""
    import tensorflow as tf

    root = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec([None, 784], tf.float32, name="images")])
    def predict_images(images):
        return {"scores": tf.nn.softmax(images[:, :10] * 50.0)}

    root.predict_images = predict_images
    tf.saved_model.save(root, str(path), signatures={"predict_images": predict_images})


def resnet(path: Path) -> None:
    """resnet_client_grpc.py's model: `input_1` [batch, height, width, 3] floats in [0, 1],
    `activation_49` [batch, 1000] softmax; each channel's mean votes for one class."""
    import numpy as np
    import tensorflow as tf

    votes = np.zeros((3, 1000), np.float32)
    for channel, label in enumerate(RESNET_CHANNEL_CLASSES):
        votes[channel, label] = 50.0
    root = tf.Module()
    root.votes = tf.Variable(votes)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="input_1")])
    def serve(input_1):
        means = tf.reduce_mean(input_1, axis=[1, 2])
        return {"activation_49": tf.nn.softmax(tf.matmul(means, root.votes))}

    root.serve = serve
    tf.saved_model.save(root, str(path), signatures={"serving_default": serve})


def main(out_dir: str) -> int:
    _split_cpu()
    root = Path(out_dir)
    for name in MODELS:
        globals()[name](root / name / VERSION_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
