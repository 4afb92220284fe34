"""convstack client: numpy <-> TensorProto conversion, the gRPC client, CLI commands and the
load generator.

```
from convstack.client import PredictionClient

with PredictionClient("localhost:8500", "digits") as client:
    print(client.predict(images)["classes"])
```

The names below load on first use: the message definitions the client speaks currently come
from TensorFlow's packages, whose import costs seconds and writes start-up lines to stderr, and
`import convstack.client.errors` (or the CLI before it quiets that output) should not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "AsyncPredictionClient",
    "Prediction",
    "PredictionClient",
    "PredictionError",
    "TlsConfig",
    "load_image",
    "load_images",
    "to_ndarray",
    "to_tensor_proto",
]

_HOMES = {
    "AsyncPredictionClient": "convstack.client.aio_client",
    "Prediction": "convstack.client.sync_client",
    "PredictionClient": "convstack.client.sync_client",
    "PredictionError": "convstack.client.errors",
    "TlsConfig": "convstack.client.connection",
    "load_image": "convstack.client.images",
    "load_images": "convstack.client.images",
    "to_ndarray": "convstack.client.tensors",
    "to_tensor_proto": "convstack.client.tensors",
}

if TYPE_CHECKING:
    from convstack.client.aio_client import AsyncPredictionClient
    from convstack.client.connection import TlsConfig
    from convstack.client.errors import PredictionError
    from convstack.client.images import load_image, load_images
    from convstack.client.sync_client import Prediction, PredictionClient
    from convstack.client.tensors import to_ndarray, to_tensor_proto


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'convstack.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
