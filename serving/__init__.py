"""convstack serving: the model repository, models.config, the embedded TF-Serving-compatible
server, the launcher for real TensorFlow Serving, and rollouts."""
