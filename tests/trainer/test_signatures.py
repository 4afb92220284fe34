"""The serving signatures as TF Serving sees them: trainer/signatures.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from convstack.trainer import signatures
from tests.trainer import export_helpers as helpers


def _model_with_training_behaviour() -> keras.Model:
    """Dropout and BatchNorm behave differently in training; serving must not carry that."""
    keras.utils.set_random_seed(3)
    images = keras.Input(shape=helpers.IMAGE_SHAPE)
    x = keras.layers.Conv2D(4, 3, strides=2)(images)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.5)(x)
    return keras.Model(images, keras.layers.Dense(helpers.NUM_CLASSES)(x))


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return _model_with_training_behaviour()


@pytest.fixture(scope="module")
def saved_model_dir(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved_model")
    signatures.write_saved_model(model, path)
    return path


@pytest.fixture(scope="module")
def loaded(saved_model_dir):
    return tf.saved_model.load(str(saved_model_dir))


def test_signature_keys_dtypes_and_shapes(loaded):
    outputs = {
        "classes": {"dtype": "int64", "shape": [None]},
        "probabilities": {"dtype": "float32", "shape": [None, 10]},
    }

    assert signatures.describe_signatures(loaded) == {
        "serving_default": {
            "inputs": {"images": {"dtype": "float32", "shape": [None, 28, 28, 1]}},
            "outputs": outputs,
        },
        "predict_image_bytes": {
            "inputs": {"image_bytes": {"dtype": "string", "shape": [None]}},
            "outputs": outputs,
        },
    }


def test_signature_defs_use_the_tf_serving_predict_method(saved_model_dir):
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    (meta_graph,) = saved.meta_graphs

    assert list(meta_graph.meta_info_def.tags) == ["serve"]
    for name in ("serving_default", "predict_image_bytes"):
        assert meta_graph.signature_def[name].method_name == "tensorflow/serving/predict"


def _op_types(saved_model_dir: Path) -> set[str]:
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].graph_def
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops |= {node.op for node in function.node_def}
    return ops


def test_inference_graph_carries_no_training_ops(saved_model_dir):
    ops = _op_types(saved_model_dir)

    # Training mode would add dropout's random ops and BatchNorm's batch moments
    # (SquaredDifference); an optimizer would add Apply* ops.
    training_ops = {
        op
        for op in ops
        if "Random" in op
        or op.startswith(("ResourceApply", "Apply"))
        or op in {"SquaredDifference", "AssignSubVariableOp", "AssignAddVariableOp"}
    }
    assert {"Conv2D", "Softmax", "DecodeImage", "ResizeBilinear"} <= ops
    assert training_ops == set()


def test_serving_is_deterministic_in_inference_mode(loaded, model):
    images, _ = helpers.synthetic_data(8, seed=5)

    first = loaded.signatures["serving_default"](images=tf.constant(images))["probabilities"]
    second = loaded.signatures["serving_default"](images=tf.constant(images))["probabilities"]
    expected = tf.nn.softmax(model(images, training=False)).numpy()

    np.testing.assert_array_equal(first.numpy(), second.numpy())
    np.testing.assert_allclose(first.numpy(), expected, atol=1e-5)


def test_image_bytes_accepts_jpeg_of_another_size_and_colour(loaded):
    rgb = np.random.default_rng(0).integers(0, 256, size=(2, 40, 56, 3), dtype=np.uint8)
    jpegs = [tf.io.encode_jpeg(image).numpy() for image in rgb]
    # The graph's own preprocessing, done eagerly: grey, [0, 1] floats, bilinear resize.
    decoded = [tf.io.decode_jpeg(data, channels=1) for data in jpegs]
    resized = [
        tf.image.resize(tf.image.convert_image_dtype(image, tf.float32), (28, 28))
        for image in decoded
    ]

    outputs = loaded.signatures["predict_image_bytes"](image_bytes=tf.constant(jpegs))
    reference = loaded.signatures["serving_default"](images=tf.stack(resized))

    assert outputs["probabilities"].shape == (2, 10)
    np.testing.assert_allclose(
        outputs["probabilities"].numpy(), reference["probabilities"].numpy(), atol=1e-5
    )


def test_image_bytes_refuses_declared_sizes_beyond_the_limit_before_decoding(loaded):
    """389 KB of PNG declare 20000 x 20000 pixels (400 MB decoded, 1.6 GB as floats): refused
    from the header, as is a batch whose images together pass the limit."""
    bomb = helpers.png_declaring(20_000, 20_000)
    side = 2_048  # four of these are exactly the limit; a fifth passes it
    assert 4 * side * side == signatures.MAX_DECODED_PIXELS
    at_limit = [helpers.png_declaring(side, side)] * 4

    for batch, total in (([bomb], 20_000 * 20_000), ([*at_limit, at_limit[0]], 5 * side * side)):
        with pytest.raises(tf.errors.InvalidArgumentError) as caught:
            loaded.signatures["predict_image_bytes"](image_bytes=tf.constant(batch))
        assert (
            f"image_bytes: the images declare {total} pixels in all; one request may decode at "
            f"most {signatures.MAX_DECODED_PIXELS}"
        ) in caught.value.message

    outputs = loaded.signatures["predict_image_bytes"](image_bytes=tf.constant(at_limit))
    assert outputs["classes"].shape == (4,)


def test_image_bytes_names_the_element_that_is_neither_png_nor_jpeg(loaded):
    images, _ = helpers.synthetic_data(2, seed=8)
    pngs = signatures.encode_png(images)
    gif = b"GIF89a" + bytes(40)

    for batch, index in (([*pngs, gif], 2), ([b""], 0), ([pngs[0][:20]], 0)):
        with pytest.raises(tf.errors.InvalidArgumentError) as caught:
            loaded.signatures["predict_image_bytes"](image_bytes=tf.constant(batch))
        assert f"image_bytes[{index}] is neither a PNG nor a JPEG" in caught.value.message


def test_declared_pixels_reads_png_and_jpeg_headers():
    jpeg = tf.io.encode_jpeg(np.zeros((50, 60, 3), np.uint8))

    assert int(signatures.declared_pixels(helpers.png_declaring(300, 7))) == 2_100
    assert int(signatures.declared_pixels(jpeg)) == 3_000
    assert int(signatures.declared_pixels(tf.constant(b"BM" + bytes(60)))) == -1


def test_png_round_trip_quantises_to_8_bits():
    images, _ = helpers.synthetic_data(3, seed=6)

    decoded = signatures.decode_png(signatures.encode_png(images))

    assert decoded.shape == images.shape and decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, images, atol=0.5 / 255 + 1e-6)


_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    path, images_file, png_dir = sys.argv[1:]
    loaded = tf.saved_model.load(path)
    images = np.load(images_file)
    pngs = [open(f"{png_dir}/{i}.png", "rb").read() for i in range(len(images))]
    by_images = loaded.signatures["serving_default"](images=tf.constant(images))
    by_bytes = loaded.signatures["predict_image_bytes"](image_bytes=tf.constant(pngs))
    print(json.dumps({
        "images": {k: v.numpy().tolist() for k, v in by_images.items()},
        "bytes": {k: v.numpy().tolist() for k, v in by_bytes.items()},
        "project_modules": [m for m in sys.modules if m.split(".")[0] in ("trainer", "tests")],
    }))
    """
)


@pytest.mark.slow
def test_reloads_and_predicts_in_a_process_that_only_imports_tensorflow(
    saved_model_dir, model, tmp_path
):
    images, _ = helpers.synthetic_data(4, seed=7)
    np.save(tmp_path / "images.npy", images)
    for index, data in enumerate(signatures.encode_png(images)):
        (tmp_path / f"{index}.png").write_bytes(data)

    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            _FRESH_PROCESS,
            str(saved_model_dir),
            str(tmp_path / "images.npy"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=tmp_path,  # keeps the project off sys.path
    )
    result = json.loads(completed.stdout.strip().splitlines()[-1])

    expected = tf.nn.softmax(model(images, training=False)).numpy()
    png_pixels = signatures.decode_png(signatures.encode_png(images))
    expected_bytes = tf.nn.softmax(model(png_pixels, training=False)).numpy()
    assert result["project_modules"] == []
    np.testing.assert_allclose(result["images"]["probabilities"], expected, atol=1e-5)
    assert result["images"]["classes"] == expected.argmax(axis=-1).tolist()
    np.testing.assert_allclose(result["bytes"]["probabilities"], expected_bytes, atol=1e-5)
    assert result["bytes"]["classes"] == expected_bytes.argmax(axis=-1).tolist()
