"""The serving signatures of an exported image classifier, and their SavedModel.

`serving_default` takes `images` (float32 [batch, H, W, C] in [0, 1]); `predict_image_bytes`
takes `image_bytes` (PNG or JPEG strings [batch]) and decodes and resizes them in the graph.
Both return `probabilities` (softmax of the logits) and `classes` (argmax, int64), and call the
model with training=False so that no dropout or batch-statistics update ends up in the graph.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from convstack.trainer.errors import ExportError

SERVING_DEFAULT = "serving_default"
PREDICT_IMAGE_BYTES = "predict_image_bytes"
IMAGES = "images"
IMAGE_BYTES = "image_bytes"
PROBABILITIES = "probabilities"
CLASSES = "classes"
SIGNATURE_INPUTS = {SERVING_DEFAULT: IMAGES, PREDICT_IMAGE_BYTES: IMAGE_BYTES}


def model_image_shape(model: keras.Model) -> tuple[int, int, int]:
    """(H, W, C) of the model's single image input; ExportError if not fully known."""
    shape = tuple(model.input_shape)
    if len(shape) != 4 or any(dim is None for dim in shape[1:]):
        raise ExportError(
            f"model {model.name!r} must take one [batch, H, W, C] input with known H, W, C; "
            f"its input shape is {shape}"
        )
    return int(shape[1]), int(shape[2]), int(shape[3])


def computes_in_float32(model: keras.Model) -> bool:
    """True when the model and all its layers compute in float32 (no mixed precision)."""
    return {model.compute_dtype} | {layer.compute_dtype for layer in model.layers} == {"float32"}


def _outputs(logits: tf.Tensor) -> dict[str, tf.Tensor]:
    # Mixed-precision models already emit float32 logits; the cast makes that a guarantee.
    probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
    classes = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
    return {PROBABILITIES: probabilities, CLASSES: classes}


# What one predict_image_bytes request may decode, in pixels over all its images. A PNG or JPEG
# header can declare far more pixels than its bytes hold (389 KB of PNG decode to a 20000 x 20000
# image, 400 MB as uint8 and 1.6 GB as floats), so the graph reads the sizes from the headers and
# refuses the request before decoding anything. 4096 x 4096 keeps one request's decoded floats
# near 256 MB for colour images, the server's default --max_request_tensor_bytes.
MAX_DECODED_PIXELS = 4096 * 4096
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_START = b"\xff\xd8\xff"
# A PNG's IHDR chunk holds its width and height as big-endian uint32 at bytes 16..24.
_PNG_SIZE_OFFSET = 16
_BIG_ENDIAN_UINT32 = (1 << 24, 1 << 16, 1 << 8, 1)


def _png_pixels(data: tf.Tensor) -> tf.Tensor:
    header = tf.io.decode_raw(tf.strings.substr(data, _PNG_SIZE_OFFSET, 8), tf.uint8)
    width_height = tf.reshape(tf.cast(header, tf.int64), (2, 4))
    width, height = tf.unstack(tf.reduce_sum(width_height * _BIG_ENDIAN_UINT32, axis=1))
    return width * height


def _jpeg_pixels(data: tf.Tensor) -> tf.Tensor:
    shape = tf.io.extract_jpeg_shape(data, output_type=tf.int64)
    return shape[0] * shape[1]


def declared_pixels(data: tf.Tensor) -> tf.Tensor:
    """The pixel count a PNG's or JPEG's header declares (int64), read without decoding; -1 when
    `data` is neither."""
    is_png = tf.logical_and(
        tf.strings.length(data) >= _PNG_SIZE_OFFSET + 8,
        tf.equal(tf.strings.substr(data, 0, len(_PNG_SIGNATURE)), _PNG_SIGNATURE),
    )
    is_jpeg = tf.equal(tf.strings.substr(data, 0, len(_JPEG_START)), _JPEG_START)
    return tf.case(
        [(is_png, lambda: _png_pixels(data)), (is_jpeg, lambda: _jpeg_pixels(data))],
        default=lambda: tf.constant(-1, tf.int64),
    )


def _check_declared_sizes(image_bytes: tf.Tensor) -> list[tf.Operation]:
    """Assertions (InvalidArgument, one line) that every element is a PNG or JPEG and that all
    of them together declare at most MAX_DECODED_PIXELS."""
    pixels = tf.map_fn(declared_pixels, image_bytes, fn_output_signature=tf.int64)
    unknown = tf.where(pixels < 0)[:, 0]
    first_unknown = tf.concat([unknown, [-1]], axis=0)[0]  # -1 when every element is known
    formats = tf.debugging.Assert(
        tf.equal(tf.size(unknown), 0),
        [tf.strings.format("image_bytes[{}] is neither a PNG nor a JPEG", first_unknown)],
    )
    total = tf.reduce_sum(tf.maximum(pixels, 0))
    sizes = tf.debugging.Assert(
        total <= MAX_DECODED_PIXELS,
        [
            tf.strings.format(
                "image_bytes: the images declare {} pixels in all; one request may decode at "
                "most {}",
                (total, MAX_DECODED_PIXELS),
            )
        ],
    )
    return [formats, sizes]


def decode_images(image_bytes: tf.Tensor, shape: tuple[int, int, int]) -> tf.Tensor:
    """Decode PNG/JPEG strings [batch] into float32 [batch, H, W, C] in [0, 1].

    The same preprocessing clients apply to `images`: [0, 1] floats, bilinear resize. Other
    formats, and images declaring more than MAX_DECODED_PIXELS in all, are refused before
    anything is decoded.
    """
    height, width, channels = shape

    def decode_one(data: tf.Tensor) -> tf.Tensor:
        image = tf.io.decode_image(data, channels=channels, expand_animations=False)
        image = tf.image.convert_image_dtype(image, tf.float32)
        return tf.image.resize(image, (height, width), method="bilinear")

    with tf.control_dependencies(_check_declared_sizes(image_bytes)):
        checked = tf.identity(image_bytes)
    return tf.map_fn(
        decode_one,
        checked,
        fn_output_signature=tf.TensorSpec((height, width, channels), tf.float32),
    )


def build_export_archive(model: keras.Model) -> keras.export.ExportArchive:
    """An ExportArchive holding the model's variables and both inference signatures."""
    shape = model_image_shape(model)
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve_images(images):
        return _outputs(model(images, training=False))

    def serve_image_bytes(image_bytes):
        return _outputs(model(decode_images(image_bytes, shape), training=False))

    # The TensorSpec names become the signature input keys TF Serving clients send.
    archive.add_endpoint(
        SERVING_DEFAULT,
        serve_images,
        input_signature=[tf.TensorSpec((None, *shape), tf.float32, name=IMAGES)],
    )
    archive.add_endpoint(
        PREDICT_IMAGE_BYTES,
        serve_image_bytes,
        input_signature=[tf.TensorSpec((None,), tf.string, name=IMAGE_BYTES)],
    )
    return archive


def write_saved_model(model: keras.Model, path: Path) -> None:
    """Write the model with both signatures as a TF2 SavedModel (tag `serve`) at `path`."""
    build_export_archive(model).write_out(str(path), verbose=False)


def _spec_dict(spec: tf.TensorSpec) -> dict:
    return {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}


def describe_signatures(loaded) -> dict[str, dict]:
    """Signature name -> {"inputs": {key: {dtype, shape}}, "outputs": {...}} as TF Serving sees it.

    `loaded` is the result of tf.saved_model.load; the keys are those of `saved_model_cli show`.
    """
    described = {}
    for name, function in sorted(loaded.signatures.items()):
        _, input_specs = function.structured_input_signature
        described[name] = {
            "inputs": {key: _spec_dict(spec) for key, spec in sorted(input_specs.items())},
            "outputs": {
                key: _spec_dict(spec) for key, spec in sorted(function.structured_outputs.items())
            },
        }
    return described


def encode_png(images: np.ndarray) -> list[bytes]:
    """PNG bytes of float [batch, H, W, C] images in [0, 1] (rounded to 8 bits)."""
    pixels = np.clip(np.rint(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)
    return [tf.io.encode_png(image).numpy() for image in pixels]


def decode_png(encoded: list[bytes]) -> np.ndarray:
    """float32 [batch, H, W, C] in [0, 1] of PNG bytes, decoded exactly as the graph does."""
    return np.stack(
        [
            tf.image.convert_image_dtype(tf.io.decode_png(data), tf.float32).numpy()
            for data in encoded
        ]
    )
