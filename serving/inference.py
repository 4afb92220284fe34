"""Transport-independent request handling: resolve the model version, validate, run (batched
or not) within the request's deadline, and record metrics. The gRPC and REST layers only
translate their formats to and from these calls."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from convstack.serving.batching import BatchingParameters, BatchScheduler, BatchStats
from convstack.serving.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    ServingError,
)
from convstack.serving.manager import ModelManager, VersionStatus
from convstack.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictResult:
    outputs: dict[str, np.ndarray]
    model_name: str
    version: int
    signature_name: str


@dataclass(frozen=True)
class ModelRef:
    """What a request names: a model and optionally a version or a label."""

    name: str
    version: int | None = None
    label: str | None = None


class InferenceService:
    """The request-facing side of the server, shared by gRPC and REST."""

    def __init__(
        self,
        manager: ModelManager,
        metrics: ServingMetrics,
        *,
        batching: BatchingParameters | None = None,
        request_threads: int = 4,
        max_concurrent_requests: int = 1024,
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=request_threads, thread_name_prefix="predict"
        )
        self._scheduler = (
            BatchScheduler(batching, on_batch=self._record_batch) if batching else None
        )
        self._max_concurrent = max_concurrent_requests
        self._in_flight = 0

    # --- Predict ----------------------------------------------------------------------------

    async def predict(
        self,
        ref: ModelRef,
        signature_name: str,
        inputs: dict[str, np.ndarray],
        output_filter: Sequence[str] = (),
        *,
        deadline: float | None = None,
        entrypoint: str = "GRPC",
    ) -> PredictResult:
        """Run one Predict; raises ServingError with TF Serving's codes and messages."""
        started = time.perf_counter()
        status = "OK"
        try:
            self._enter()
            try:
                return await self._predict(ref, signature_name, inputs, output_filter, deadline)
            finally:
                self._in_flight -= 1
        except ServingError as error:
            status = error.code
            raise
        except Exception as exc:  # a bug must not take the server down; report it as INTERNAL
            log.exception("Predict on %s failed", ref.name)
            status = "INTERNAL"
            raise Internal(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.metrics.record_request(
                ref.name, "predict", entrypoint, status, time.perf_counter() - started
            )

    def _enter(self) -> None:
        if self._in_flight >= self._max_concurrent:
            raise ResourceExhausted(
                f"Too many concurrent requests: the limit is {self._max_concurrent}"
            )
        self._in_flight += 1

    async def _predict(self, ref, signature_name, inputs, output_filter, deadline):
        with self.manager.acquire(ref.name, ref.version, ref.label) as servable:
            signature = servable.validate(signature_name, inputs, output_filter)
            _check_deadline(deadline)
            run_started = time.perf_counter()
            if self._scheduler is not None:
                key = _batch_key(ref.name, servable.version, signature.key, inputs, output_filter)
                outputs = await self._scheduler.submit(
                    key,
                    inputs,
                    lambda batch: servable.run(signature.key, batch, output_filter),
                    deadline=deadline,
                )
            else:
                outputs = await asyncio.get_running_loop().run_in_executor(
                    self._executor,
                    _run_before_deadline,
                    servable.run,
                    signature.key,
                    inputs,
                    output_filter,
                    deadline,
                )
            self.metrics.record_runtime(ref.name, "predict", time.perf_counter() - run_started)
            return PredictResult(outputs, ref.name, servable.version, signature.key)

    def _record_batch(self, stats: BatchStats) -> None:
        self.metrics.record_batch(
            stats.key[0], stats.size, stats.padded_size, list(stats.queue_delay_seconds)
        )

    # --- metadata, status, config -------------------------------------------------------------

    def signature_inputs(self, ref: ModelRef, signature_name: str):
        """The inputs of a signature (for decoding REST bodies)."""
        with self.manager.acquire(ref.name, ref.version, ref.label) as servable:
            return servable.signature(signature_name).inputs

    def metadata(self, ref: ModelRef):
        """(version, SignatureDefMap) of the resolved version."""
        with self.manager.acquire(ref.name, ref.version, ref.label) as servable:
            return servable.version, servable.signature_def_map()

    def signature_method(self, ref: ModelRef, signature_name: str) -> tuple[str, str] | None:
        """(resolved key, method_name) of a signature, or None when it does not exist."""
        with self.manager.acquire(ref.name, ref.version, ref.label) as servable:
            key = signature_name or "serving_default"
            info = servable.signatures.get(key)
            return (key, info.method_name) if info else None

    def status(self, ref: ModelRef) -> list[VersionStatus]:
        version = ref.version
        if ref.label is not None:
            # A label names a version even when it is not loaded: report that version's state.
            labels = self.manager.labels(ref.name)
            if ref.label not in labels:
                raise InvalidArgument(f"Unrecognized servable version label: {ref.label}")
            version = labels[ref.label]
        return self.manager.model_status(ref.name, version)

    async def reload_config(self, config) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.manager.reload_config, config)

    async def close(self) -> None:
        if self._scheduler is not None:
            await self._scheduler.close()
        self._executor.shutdown(wait=True)


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("Deadline Exceeded")


def _run_before_deadline(run, signature_key, inputs, output_filter, deadline):
    # The request may have waited in the executor's queue past its deadline: then it is not run.
    _check_deadline(deadline)
    return run(signature_key, inputs, output_filter)


def _batch_key(model_name, version, signature_key, inputs, output_filter) -> tuple:
    """Requests merge only when everything but the batch dimension agrees."""
    shapes = tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items()))
    return (model_name, version, signature_key, tuple(output_filter), shapes)
