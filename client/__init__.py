"""convstack client: numpy <-> TensorProto conversion, the gRPC client, CLI commands and the
load generator."""
