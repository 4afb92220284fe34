"""`AsyncPredictionClient`: the asyncio twin of PredictionClient on grpc.aio (same arguments,
same methods as coroutines, `async with`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np

from convstack.client import _protos as protos
from convstack.client.connection import call_async, deadline_error, open_aio_channel
from convstack.client.errors import PredictionError
from convstack.client.signature import SignatureSpec
from convstack.client.sync_client import (
    ClientBase,
    Prediction,
    Route,
    available_version,
    closed_error,
    concatenate,
    keep_waiting,
    version_statuses,
)

__all__ = ["AsyncPredictionClient"]


class AsyncPredictionClient(ClientBase):
    """PredictionClient for asyncio: `async with AsyncPredictionClient(target, model) as c:
    prediction = await c.predict(images)`. Arguments and behaviour as PredictionClient's.

    The channel opens on first use (or `async with`), inside the event loop that uses it:
    grpc.aio channels belong to one loop.
    """

    async def __aenter__(self) -> AsyncPredictionClient:
        self._open()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def _open(self) -> None:
        if self._channel is None:
            self._channel = open_aio_channel(self._settings)
            self._predictions = protos.prediction_service_pb2_grpc.PredictionServiceStub(
                self._channel
            )
            self._models = protos.model_service_pb2_grpc.ModelServiceStub(self._channel)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._closed = True
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _rpc(self, method: str):
        """The stub method of an RPC, opening the channel first if needed."""
        if self._closed:
            raise closed_error(self)
        self._open()
        stub = self._models if method in _MODEL_METHODS else self._predictions
        return getattr(stub, method)

    async def _call(self, method: str, request, timeout=None, metadata=()):
        return await call_async(
            self._settings,
            method,
            self._rpc(method),
            request,
            timeout=timeout,
            metadata=metadata,
            rng=self._core.rng,
        )

    async def _signature(self, route: Route, timeout=None) -> SignatureSpec:
        if route not in self._core.signatures:
            await self._fetch_metadata(route, timeout)
        return self._core.signature_spec(route)

    async def _fetch_metadata(self, route: Route, timeout=None):
        request = self._core.metadata_request(route)
        response = await self._call("GetModelMetadata", request, timeout)
        return response.model_spec.version.value, self._core.read_metadata(route, response)

    async def predict(
        self,
        inputs,
        *,
        output_filter: Sequence[str] = (),
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Prediction:
        """See PredictionClient.predict."""
        route = self._core.pick_route()
        needs = self._core.needs_signature(inputs)
        spec = await self._signature(route, timeout) if needs else None
        request = self._core.predict_request(route, spec, inputs, output_filter)
        try:
            response = await self._call("Predict", request, timeout, metadata)
        except PredictionError as error:
            self._core.forget(route, error)
            raise
        return self._core.prediction(route, response)

    async def predict_many(
        self,
        inputs,
        *,
        batch_size: int | None = None,
        concurrency: int = 4,
        output_filter: Sequence[str] = (),
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """See PredictionClient.predict_many."""
        route = self._core.default_route
        needs = self._core.needs_signature(inputs)
        spec = await self._signature(route, timeout) if needs else None
        pieces = self._core.split(inputs, spec, batch_size, self._settings.max_message_bytes)
        slots = asyncio.Semaphore(max(1, concurrency))

        async def run(piece):
            async with slots:
                return await self.predict(piece, output_filter=output_filter, timeout=timeout)

        tasks = [asyncio.ensure_future(run(piece)) for piece in pieces]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return concatenate(results)

    async def metadata(self, *, timeout: float | None = None) -> dict:
        """See PredictionClient.metadata."""
        _, specs = await self._fetch_metadata(self._core.default_route, timeout)
        return {name: spec.as_dict() for name, spec in specs.items()}

    async def served_version(self, *, timeout: float | None = None) -> int:
        """See PredictionClient.served_version."""
        version, _ = await self._fetch_metadata(self._core.default_route, timeout)
        return version

    async def status(
        self, version: int | None = None, *, timeout: float | None = None
    ) -> list[dict]:
        """See PredictionClient.status."""
        request = self._core.status_request(version)
        response = await self._call("GetModelStatus", request, timeout)
        return version_statuses(response)

    async def wait_until_available(
        self, version: int | None = None, *, timeout: float = 60.0, poll_seconds: float = 0.2
    ) -> int:
        """See PredictionClient.wait_until_available."""
        version = self._core.default_route.version if version is None else version
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            remaining = deadline - time.monotonic()
            try:
                statuses = await self.status(version, timeout=max(0.01, min(remaining, 10.0)))
                found = available_version(statuses, version, self.model_name)
                if found is not None:
                    return found
                last = ", ".join(f"{s['version']}: {s['state']}" for s in statuses)
            except PredictionError as error:
                if not keep_waiting(error):
                    raise
                last = str(error)
            if time.monotonic() + poll_seconds >= deadline:
                what = f"version {version}" if version is not None else "a version"
                raise deadline_error(
                    f"{what} of model {self.model_name!r} not AVAILABLE ({last})",
                    timeout,
                    model=self.model_name,
                )
            await asyncio.sleep(poll_seconds)

    async def reload_config(self, config, *, timeout: float | None = None) -> None:
        """See PredictionClient.reload_config."""
        request = self._core.reload_request(config)
        response = await self._call("HandleReloadConfigRequest", request, timeout)
        self._core.read_reload(response)

    def __repr__(self) -> str:
        return f"AsyncPredictionClient({self.target!r}, {self.model_name!r})"


_MODEL_METHODS = frozenset({"GetModelStatus", "HandleReloadConfigRequest"})
