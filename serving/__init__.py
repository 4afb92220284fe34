"""convstack serving: the model repository, models.config, the embedded TF-Serving-compatible
server and the launcher for real TensorFlow Serving. Rollouts are the `rollout` package."""
