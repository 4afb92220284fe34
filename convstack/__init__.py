"""The `convstack` command: one entry point that dispatches to the trainer, serving and client."""
