"""Image files as model inputs: TensorFlow's preprocessing reproduced in numpy, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from convstack.client.errors import PredictionError
from convstack.client.images import image_shape, load_image, load_images, resize_bilinear
from convstack.trainer.signatures import decode_images

SHAPE = (-1, 28, 28, 1)


def _gray(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


@pytest.mark.parametrize(("source", "target"), [((8, 8), (28, 28)), ((50, 37), (7, 9))])
def test_resize_matches_tensorflow_bilinear(source, target):
    image = np.random.default_rng(1).random((*source, 3), dtype=np.float32)

    ours = resize_bilinear(image, *target)
    theirs = tf.image.resize(image, target, method="bilinear").numpy()

    assert ours.shape == (*target, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_png_preprocessing_matches_the_predict_image_bytes_graph(tmp_path):
    path = tmp_path / "digit.png"
    Image.fromarray(_gray(41, 33)).save(path)

    ours = load_image(path, (28, 28, 1))
    graph = decode_images(tf.constant([path.read_bytes()]), (28, 28, 1)).numpy()[0]

    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, graph, atol=1e-5)


def test_color_jpeg_becomes_one_grayscale_batch_in_unit_range(tmp_path):
    rgb = np.stack([_gray(120, 90, seed) for seed in range(3)], axis=-1)
    paths = [tmp_path / "a.jpg", tmp_path / "b.png"]
    Image.fromarray(rgb).save(paths[0], quality=95)
    Image.fromarray(_gray(28, 28)).save(paths[1])

    batch = load_images(paths, SHAPE)

    assert batch.shape == (2, 28, 28, 1)
    assert batch.dtype == np.float32
    assert batch.min() >= 0.0 and batch.max() <= 1.0
    np.testing.assert_allclose(batch[1, :, :, 0], _gray(28, 28) / 255.0, atol=1e-6)


def test_grayscale_file_fills_every_channel_of_an_rgb_input(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(_gray(10, 10)).save(path)

    image = load_image(path, (10, 10, 3))

    assert image.shape == (10, 10, 3)
    assert np.array_equal(image[..., 0], image[..., 2])


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    pixels = np.array([[0, 32768], [65535, 16384]], dtype=np.uint16)
    Image.fromarray(pixels).save(path)

    image = load_image(path, (2, 2, 1))

    np.testing.assert_allclose(image[..., 0], pixels / 65535.0, atol=1e-6)


def test_uint8_inputs_get_uint8_pixels(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(_gray(5, 5)).save(path)

    image = load_image(path, (5, 5, 1), dtype="uint8")

    assert image.dtype == np.uint8
    assert np.array_equal(image[..., 0], _gray(5, 5))


def _error(path) -> PredictionError:
    with pytest.raises(PredictionError) as caught:
        load_images([path], SHAPE)
    assert str(path) in caught.value.message
    return caught.value


def test_missing_file_is_not_found_naming_it(tmp_path):
    assert _error(tmp_path / "missing.png").code == "NOT_FOUND"


def test_non_image_is_refused_naming_it(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not pixels")

    assert _error(path).code == "INVALID_ARGUMENT"


def test_truncated_png_is_refused_naming_it(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(_gray(64, 64)).save(path)
    path.write_bytes(path.read_bytes()[:200])

    assert "unreadable" in _error(path).message


def test_other_formats_are_refused_naming_the_format(tmp_path):
    path = tmp_path / "old.gif"
    Image.fromarray(_gray(8, 8)).save(path)

    assert "GIF" in _error(path).message


@pytest.mark.parametrize("shape", [(-1, -1, -1, 1), (-1, 784), None, (-1, 28, 28, 2)])
def test_inputs_that_are_not_fixed_size_images_are_refused(shape):
    with pytest.raises(PredictionError, match="not an image input"):
        image_shape(shape)
