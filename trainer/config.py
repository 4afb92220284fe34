"""Typed configuration of a training run. Pure: no TensorFlow here.

The same keys work as flags (`--learning-rate 0.001`) and in `--config run.yaml`
(`learning_rate: 0.001`); see `convstack.configs`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    """The Conv2D stack: [random shift] -> `conv_blocks` x (Conv2D -> [BatchNorm] -> ReLU ->
    MaxPool) -> Dense."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    conv_blocks: int = Field(3, ge=1, le=6, description="number of Conv2D blocks")
    filters: int = Field(32, ge=1, description="filters of the first block; later blocks use 2x")
    kernel_size: int = Field(3, ge=1, description="Conv2D kernel size")
    dense_units: int = Field(64, ge=1, description="units of the hidden Dense layer")
    dropout: float = Field(0.25, ge=0.0, lt=1.0, description="dropout before the logits")
    batch_norm: bool = Field(False, description="batch normalisation after each convolution")
    weight_decay: float = Field(
        0.0, ge=0.0, description="L2 regularisation on kernels (regularisation losses)"
    )
    random_shift: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="augmentation in training: shift each image by up to this fraction of its "
        "height and width (0.125: up to 3.5 of 28 pixels); inactive at inference",
    )


class TrainConfig(ModelConfig):
    """Everything `convstack train` takes. Model fields are inherited from ModelConfig."""

    data: str = Field(
        "digits", description="dataset URI: digits | npz:PATH | images:DIR | tfrecord:GLOB"
    )
    model_base: str = Field("models", description="model repository root")
    model_name: str = Field("digits", description="model name: versions go to MODEL_BASE/NAME/N")
    run_dir: str = Field("runs/digits", description="checkpoints, TensorBoard logs and curves")
    version: int | None = Field(
        None, ge=1, description="version to export (default: next after the highest)"
    )
    epochs: int = Field(25, ge=1, description="training epochs")
    batch_size: int = Field(64, ge=1, description="global batch size, split across replicas")
    optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="adam, or sgd with Nesterov momentum 0.9"
    )
    learning_rate: float = Field(
        1e-3,
        gt=0.0,
        description="optimizer learning rate (fixed for a run: a resume with another is refused)",
    )
    seed: int = Field(42, description="seed for splits, shuffling and initial weights")
    validation_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="share held out for validation (digits, npz, images)"
    )
    test_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="share held out for test (digits, images)"
    )
    replicas: int | None = Field(
        None,
        ge=1,
        description="replicas: with GPUs, how many to use (default all); on CPU, split the CPU "
        "into this many logical devices (default 1)",
    )
    mixed_precision: bool = Field(
        False, description="mixed_float16 on GPU (with loss scaling), mixed_bfloat16 on CPU"
    )
    steps_per_execution: int = Field(
        1, ge=1, description="training steps run per tf.function call (fewer Python round trips)"
    )
    checkpoint_every: int = Field(
        100, ge=1, description="write a checkpoint every N steps (and at each epoch end)"
    )
    keep_checkpoints: int = Field(3, ge=1, description="checkpoints kept in the run directory")
    progress: Literal["auto", "bar", "log"] = Field(
        "auto", description="progress bar on a terminal (auto), always (bar) or log lines (log)"
    )
    tflite: Literal["float32", "float16", "int8"] | None = Field(
        None,
        description="also write VERSION/model.tflite (TF Serving's --prefer_tflite_model "
        "file): float32, float16 weights or int8 post-training quantisation; "
        "--tflite alone means float32",
        json_schema_extra={"flag_const": "float32"},
    )
    export: bool = Field(True, description="export a SavedModel version after training")
    cluster_wait_seconds: float = Field(
        180.0,
        gt=0.0,
        description="with several workers: bound on the start-up (joining the cluster, loading "
        "the data, creating and restoring the variables); past it the worker exits 1 so the "
        "Job controller can act",
    )

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> TrainConfig:
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError("validation_fraction + test_fraction must be below 1")
        return self

    def model_part(self) -> ModelConfig:
        """The model-architecture subset of this config."""
        return ModelConfig(**{k: getattr(self, k) for k in ModelConfig.model_fields})
