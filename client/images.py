"""PNG/JPEG files of any size as a model's image input, preprocessed as the model was trained.

The input's shape `[batch, H, W, C]` (from `metadata()`) fixes the result: C=1 grayscale, 3 RGB,
4 RGBA; values scaled to [0, 1] for float inputs (0..255 for uint8 ones); resized to H x W with
TensorFlow's bilinear resize (`tf.image.resize`'s default: half-pixel centres, no antialiasing),
computed here in numpy so that no TensorFlow runtime is needed. That is the same preprocessing
as the trainer's datasets and the `predict_image_bytes` signature (decode, convert to [0, 1],
resize), so a file gives the same prediction either way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from convstack.client.errors import PredictionError

__all__ = ["SUPPORTED_FORMATS", "image_shape", "load_image", "load_images", "resize_bilinear"]

SUPPORTED_FORMATS = ("PNG", "JPEG")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_FLOAT_DTYPES = ("float16", "float32", "float64")


def image_shape(shape: Sequence[int] | None, name: str = "images") -> tuple[int, int, int]:
    """(H, W, C) of an image input's shape [batch, H, W, C]; INVALID_ARGUMENT if it is not one
    with a fixed size."""
    if shape is None or len(shape) != 4 or min(shape[1:]) < 1 or shape[3] not in _MODES:
        raise PredictionError(
            "INVALID_ARGUMENT",
            f"input {name!r} with shape {None if shape is None else list(shape)} is not an image "
            "input of fixed size [batch, H, W, C] with C 1, 3 or 4",
        )
    return int(shape[1]), int(shape[2]), int(shape[3])


def _error(path, code: str, what: str) -> PredictionError:
    return PredictionError(code, f"{path}: {what}", {"file": str(path)})


def _open(path) -> Image.Image:
    try:
        image = Image.open(path)
        if image.format not in SUPPORTED_FORMATS:
            raise _error(path, "INVALID_ARGUMENT", f"{image.format} images are not supported "
                         "(PNG or JPEG)")  # fmt: skip
        image.load()  # decode now: a truncated file fails here, with its name
        return image
    except FileNotFoundError:
        raise _error(path, "NOT_FOUND", "no such file") from None
    except UnidentifiedImageError:
        raise _error(path, "INVALID_ARGUMENT", "not a PNG or JPEG image") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _error(path, "INVALID_ARGUMENT", f"unreadable image: {exc}") from None


def _pixels(image: Image.Image, channels: int) -> np.ndarray:
    """float32 [h, w, channels] in [0, 1]."""
    image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit grayscale: PIL's convert("L") would clip at 255 instead of scaling.
        gray = np.asarray(image, dtype=np.float32) / 65535.0
        pixels = np.repeat(gray[:, :, None], min(channels, 3), axis=2)
        return np.dstack([pixels, np.ones_like(gray)]) if channels == 4 else pixels
    pixels = np.asarray(image.convert(_MODES[channels]), dtype=np.float32) / 255.0
    return pixels.reshape(*pixels.shape[:2], channels)


def _axis_weights(in_size: int, out_size: int):
    """TensorFlow's half-pixel-centre sampling of one axis: lower/upper source indices and the
    weight of the upper one."""
    scale = in_size / out_size
    position = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    floor = np.floor(position)
    lower = np.maximum(floor, 0).astype(np.intp)
    upper = np.minimum(np.ceil(position), in_size - 1).astype(np.intp)
    return lower, upper, (position - floor).astype(np.float32)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 [height, width, C] from [h, w, C]: `tf.image.resize(..., "bilinear")` in numpy."""
    image = np.asarray(image, dtype=np.float32)
    if image.shape[:2] == (height, width):
        return image
    top, bottom, y_weight = _axis_weights(image.shape[0], height)
    left, right, x_weight = _axis_weights(image.shape[1], width)
    x_weight = x_weight[None, :, None]
    upper_rows, lower_rows = image[top], image[bottom]
    upper = upper_rows[:, left] + (upper_rows[:, right] - upper_rows[:, left]) * x_weight
    lower = lower_rows[:, left] + (lower_rows[:, right] - lower_rows[:, left]) * x_weight
    return upper + (lower - upper) * y_weight[:, None, None]


def _as_dtype(pixels: np.ndarray, dtype: str, path) -> np.ndarray:
    if dtype in _FLOAT_DTYPES:
        return pixels.astype(dtype)
    if dtype == "uint8":
        return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
    raise _error(path, "INVALID_ARGUMENT", f"the model's image input is {dtype}, not float/uint8")


def load_image(
    path: str | os.PathLike, shape: tuple[int, int, int], dtype: str = "float32"
) -> np.ndarray:
    """One PNG/JPEG file as [H, W, C] of `dtype` (see the module docstring); PredictionError
    naming the file if it is missing or not a readable PNG/JPEG."""
    height, width, channels = shape
    pixels = _pixels(_open(path), channels)
    return _as_dtype(resize_bilinear(pixels, height, width), dtype, path)


def load_images(
    paths: Sequence[str | os.PathLike], shape: Sequence[int] | None, dtype: str = "float32"
) -> np.ndarray:
    """Files as one batch [N, H, W, C] for an input of `shape` [batch, H, W, C] and `dtype`
    (both as `metadata()` reports them)."""
    size = image_shape(shape)
    if not paths:
        return np.zeros((0, *size), dtype=dtype)
    return np.stack([load_image(path, size, dtype) for path in paths])
