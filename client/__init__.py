"""convstack client: numpy <-> TensorProto conversion, the gRPC client, CLI commands and the
load generator.

```
from client import PredictionClient

with PredictionClient("localhost:8500", "digits") as client:
    print(client.predict(images)["classes"])
```

The names below load on first use: the message definitions the client speaks currently come
from TensorFlow's packages, whose import costs seconds and writes start-up lines to stderr, and
`import client.errors` (or the CLI before it quiets that output) should not pay for it.
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
    "AsyncPredictionClient": "client.aio_client",
    "Prediction": "client.sync_client",
    "PredictionClient": "client.sync_client",
    "PredictionError": "client.errors",
    "TlsConfig": "client.connection",
    "load_image": "client.images",
    "load_images": "client.images",
    "to_ndarray": "client.tensors",
    "to_tensor_proto": "client.tensors",
}

if TYPE_CHECKING:
    from client.aio_client import AsyncPredictionClient
    from client.connection import TlsConfig
    from client.errors import PredictionError
    from client.images import load_image, load_images
    from client.sync_client import Prediction, PredictionClient
    from client.tensors import to_ndarray, to_tensor_proto


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
