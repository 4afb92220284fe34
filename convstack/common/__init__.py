"""Helpers every part of convstack may use: logging set-up, typed configs, atomic file writes,
command-line validators, free loopback ports and the Kubernetes API. They import no part."""
