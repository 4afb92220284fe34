"""The client benchmark measures against the client tests' server (versions 1 and 2 of the
tiny model, labels, Prometheus metrics): the same fixture, started once for these tests."""

from tests.client.conftest import server  # noqa: F401  (a fixture, used by name)
