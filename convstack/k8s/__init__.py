"""The Kubernetes launcher: render the `k8s/` overlays, run training Jobs, deploy the serving
stack and run rollouts as in-cluster Jobs (`convstack k8s ...`)."""
