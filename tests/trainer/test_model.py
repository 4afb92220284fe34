"""The model's optional random shift: it moves training images only, and its random state is
part of what a checkpoint keeps."""

from __future__ import annotations

import numpy as np
import pytest

from convstack.trainer.config import ModelConfig, TrainConfig


@pytest.fixture(scope="module")
def shifted():
    import keras

    from convstack.trainer.model import build_model

    keras.utils.set_random_seed(7)
    return build_model(ModelConfig(random_shift=0.125), (8, 8, 1), 10)


def test_the_shift_moves_training_images_and_leaves_served_ones_alone(shifted):
    layer = shifted.get_layer("random_shift")
    images = np.random.default_rng(0).random((16, 8, 8, 1), dtype=np.float32)
    assert np.array_equal(np.asarray(layer(images, training=False)), images)
    moved = np.asarray(layer(images, training=True))
    assert moved.shape == images.shape and not np.allclose(moved, images)


def test_its_random_state_is_checkpointed_with_dropouts(shifted):
    from convstack.trainer.model import rng_states

    assert set(rng_states(shifted)) == {"random_shift", "dropout"}


def test_no_shift_by_default_and_a_half_image_is_refused():
    from pydantic import ValidationError

    assert TrainConfig().random_shift == 0.0
    with pytest.raises(ValidationError, match="random_shift"):
        TrainConfig(random_shift=0.5)
