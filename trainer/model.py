"""The Conv2D image classifier: the functional Keras stack of the TensorFlow CNN tutorial,
made configurable (depth, filters, dropout, batch normalisation, L2)."""

from __future__ import annotations

import keras

from convstack.trainer.config import ModelConfig


def _conv_block(x, filters: int, config: ModelConfig, index: int):
    regularizer = keras.regularizers.L2(config.weight_decay) if config.weight_decay else None
    x = keras.layers.Conv2D(
        filters,
        config.kernel_size,
        padding="same",
        use_bias=not config.batch_norm,  # BatchNormalization's beta makes the bias redundant
        kernel_regularizer=regularizer,
        name=f"conv{index}",
    )(x)
    if config.batch_norm:
        x = keras.layers.BatchNormalization(name=f"bn{index}")(x)
    x = keras.layers.ReLU(name=f"relu{index}")(x)
    return keras.layers.MaxPooling2D(2, padding="same", name=f"pool{index}")(x)


def build_model(
    config: ModelConfig, image_shape: tuple[int, int, int], num_classes: int
) -> keras.Model:
    """Build the classifier; it returns float32 logits of shape [batch, num_classes].

    Under a mixed-precision global policy the layers compute in float16/bfloat16, while the
    logits layer stays float32 so that softmax and the loss are numerically safe.
    """
    images = keras.Input(shape=image_shape, name="images")
    x = images
    if config.random_shift:  # active only in training calls: served models see the image as is
        x = keras.layers.RandomTranslation(
            config.random_shift, config.random_shift, fill_mode="constant", name="random_shift"
        )(x)
    for index in range(config.conv_blocks):
        x = _conv_block(x, config.filters * 2 ** min(index, 1), config, index)
    x = keras.layers.Flatten(name="flatten")(x)
    regularizer = keras.regularizers.L2(config.weight_decay) if config.weight_decay else None
    x = keras.layers.Dense(
        config.dense_units, activation="relu", kernel_regularizer=regularizer, name="hidden"
    )(x)
    if config.dropout:
        x = keras.layers.Dropout(config.dropout, name="dropout")(x)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(images, logits, name="convstack_classifier")


def rng_states(model: keras.Model) -> dict[str, keras.Variable]:
    """The random state of the model's layers, by layer name: the Keras SeedGenerator state
    each Dropout draws its masks from, and the random shift its offsets. It advances every
    training step, so a checkpoint must hold it for a resumed run to draw the masks (and
    shifts) the uninterrupted run would have drawn."""
    generators = {
        layer.name: getattr(layer, "seed_generator", None) or getattr(layer, "generator", None)
        for layer in model.layers
    }  # Dropout's is `seed_generator`, the random preprocessing layers' `generator`
    return {
        name: generator.state
        for name, generator in generators.items()
        if isinstance(generator, keras.random.SeedGenerator)
    }
