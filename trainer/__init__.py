"""convstack trainer: datasets, the Conv2D model, distributed training, checkpoints and export.

Importing this package does not import TensorFlow; the modules that need it do.
"""
