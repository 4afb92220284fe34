"""Transport-independent request handling: resolve the model version, validate, run (batched
or not) within the request's deadline, and record metrics, for Predict, Classify, Regress and
MultiInference. The gRPC and REST layers only translate their formats to and from these calls."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from convstack.serving import tasks
from convstack.serving.batching import (
    BatchingParameters,
    BatchScheduler,
    BatchStats,
    small_enough_to_run_inline,
)
from convstack.serving.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    ServingError,
)
from convstack.serving.manager import ModelManager, VersionStatus
from convstack.serving.metrics import ServingMetrics
from convstack.serving.servable import check_input_keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictResult:
    outputs: dict[str, np.ndarray]
    model_name: str
    version: int
    signature_name: str


@dataclass(frozen=True)
class TaskResult:
    """A Classify or Regress answer: `result` is a ClassificationResult or RegressionResult."""

    result: object
    model_name: str
    version: int
    signature_name: str


@dataclass(frozen=True)
class ModelRef:
    """What a request names: a model and optionally a version or a label."""

    name: str
    version: int | None = None
    label: str | None = None


# The API label of the request metrics, spelled as TF Serving spells it (prediction_service_impl).
PREDICT_API, CLASSIFY_API, REGRESS_API = "Predict", "Classify", "Regress"
MULTI_INFERENCE_API = "MultiInference"

# Requests for models the server does not serve are counted under this one label, so that
# made-up names cannot grow the metric series without bound.
UNKNOWN_MODEL_LABEL = "<unknown>"

# Decodes a request's raw inputs once the signature is known (TF Serving parses the tensors
# only after it has resolved the model, the version and the signature).
InputDecoder = Callable[[Mapping[str, object]], dict[str, np.ndarray]]


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
        signature_method_name_check: bool = False,
        run_lone_batches_at_once: bool = False,
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=request_threads, thread_name_prefix="predict"
        )
        self._scheduler = (
            BatchScheduler(
                batching,
                on_batch=self._record_batch,
                outstanding=(lambda: self._in_flight) if run_lone_batches_at_once else None,
            )
            if batching
            else None
        )
        self._max_concurrent = max_concurrent_requests
        self._in_flight = 0
        self._method_check = signature_method_name_check

    # --- one request, whatever its API -------------------------------------------------------

    async def _request(self, ref: ModelRef, api: str, entrypoint: str, work: Awaitable):
        """Run `work` within the concurrency limit; count it with its status; never let an
        unexpected exception out as anything but INTERNAL."""
        started = time.perf_counter()
        status = "OK"
        try:
            self._enter()
            try:
                return await work
            finally:
                self._in_flight -= 1
        except ServingError as error:
            status = error.code
            raise
        except Exception as exc:  # a bug must not take the server down; report it as INTERNAL
            log.exception("%s on %s failed", api, ref.name)
            status = "INTERNAL"
            raise Internal(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if inspect.iscoroutine(work):
                work.close()  # never awaited when the limit refused it
            self.record_request(ref.name, api, entrypoint, status, time.perf_counter() - started)

    def record_request(
        self, name: str, api: str, entrypoint: str, status: str, seconds: float
    ) -> None:
        """Count a request; names of models the server does not know share one label."""
        known = name in self.manager.model_names()
        self.metrics.record_request(
            name if known else UNKNOWN_MODEL_LABEL, api, entrypoint, status, seconds
        )

    def _alone(self, inputs: Mapping[str, np.ndarray]) -> bool:
        """Whether a Predict may run on the event loop's thread: it is the only request in the
        server (nothing waits for the loop meanwhile) and small enough not to hold it long.
        Saves the two thread hand-offs that dominate a small request's cost at concurrency 1."""
        if self._in_flight != 1:
            return False
        return small_enough_to_run_inline(inputs)

    def _enter(self) -> None:
        if self._in_flight >= self._max_concurrent:
            raise ResourceExhausted(
                f"Too many concurrent requests: the limit is {self._max_concurrent}"
            )
        self._in_flight += 1

    async def _run(self, deadline: float | None, function, *args, inline: bool = False):
        """Run blocking TensorFlow work on the request threads, not past the deadline; with
        `inline`, on the event loop's thread instead (no hand-off to a thread and back)."""
        if inline:
            return _run_before_deadline(deadline, function, *args)
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, _run_before_deadline, deadline, function, *args
        )

    # --- Predict ----------------------------------------------------------------------------

    async def predict(
        self,
        ref: ModelRef,
        signature_name: str,
        inputs: Mapping[str, object],
        output_filter: Sequence[str] = (),
        *,
        deadline: float | None = None,
        entrypoint: str = "GRPC",
        decode: InputDecoder | None = None,
    ) -> PredictResult:
        """Run one Predict; raises ServingError with TF Serving's codes and messages.

        `inputs` are arrays, or raw values that `decode` turns into arrays once the model,
        version and signature are resolved."""
        work = self._predict(ref, signature_name, inputs, output_filter, deadline, decode)
        return await self._request(ref, PREDICT_API, entrypoint, work)

    async def _predict(self, ref, signature_name, inputs, output_filter, deadline, decode):
        with self.manager.acquire(ref.name, ref.version, ref.label) as servable:
            if decode is not None:
                check_input_keys(servable.signature(signature_name), inputs)
                inputs = decode(inputs)
            signature = servable.validate(
                signature_name, inputs, output_filter, batched=self._scheduler is not None
            )
            tasks.check_predict_method(servable.signature_defs[signature.key], self._method_check)
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
                outputs = await self._run(
                    deadline,
                    servable.run,
                    signature.key,
                    inputs,
                    output_filter,
                    inline=self._alone(inputs),
                )
            self.metrics.record_runtime(ref.name, PREDICT_API, time.perf_counter() - run_started)
            return PredictResult(outputs, ref.name, servable.version, signature.key)

    # --- Classify, Regress, MultiInference ----------------------------------------------------

    async def classify(self, ref, signature_name, request_input, *, deadline=None,
                       entrypoint="GRPC") -> TaskResult:  # fmt: skip
        """Classify tf.Examples (ClassificationRequest.input) with a classify signature."""
        work = self._task(tasks.CLASSIFY, ref, signature_name, request_input, deadline)
        return await self._request(ref, CLASSIFY_API, entrypoint, work)

    async def regress(self, ref, signature_name, request_input, *, deadline=None,
                      entrypoint="GRPC") -> TaskResult:  # fmt: skip
        """Regress tf.Examples (RegressionRequest.input) with a regress signature."""
        work = self._task(tasks.REGRESS, ref, signature_name, request_input, deadline)
        return await self._request(ref, REGRESS_API, entrypoint, work)

    async def _task(self, kind, ref, signature_name, request_input, deadline) -> TaskResult:
        with self.manager.acquire(ref.name, ref.version, ref.label) as servable:
            task = tasks.plan(
                kind, servable.signature_defs, signature_name, method_check=self._method_check
            )
            examples = tasks.serialized_examples(request_input)
            fetched = await self._run(
                deadline, _run_tasks, servable, [task], examples, task.output_tensors
            )
            result = tasks.task_result(task, len(examples), fetched)
            return TaskResult(result, ref.name, servable.version, task.signature_key)

    async def multi_inference(
        self, ref, task_specs, request_input, *, deadline=None, entrypoint="GRPC"
    ) -> list[TaskResult]:
        """Several classify/regress tasks of one model over the same Examples, in one run.

        `task_specs` are (model name, signature name, method name); `ref` is the first task's
        model, the version that serves them all."""
        work = self._multi_inference(ref, task_specs, request_input, deadline)
        return await self._request(ref, MULTI_INFERENCE_API, entrypoint, work)

    async def _multi_inference(self, ref, task_specs, request_input, deadline):
        with self.manager.acquire(ref.name, ref.version, ref.label) as servable:
            plans = tasks.plan_multi_inference(
                task_specs, servable.signature_defs, method_check=self._method_check
            )
            examples = tasks.serialized_examples(request_input)
            fetches = sorted({name for task in plans for name in task.output_tensors})
            fetched = await self._run(deadline, _run_tasks, servable, plans, examples, fetches)
            return [
                TaskResult(
                    tasks.task_result(task, len(examples), fetched),
                    ref.name,
                    servable.version,
                    task.signature_key,
                )
                for task in plans
            ]

    def _record_batch(self, stats: BatchStats) -> None:
        self.metrics.record_batch(
            stats.key[0], stats.size, stats.padded_size, stats.queue_delay_seconds
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


def _run_before_deadline(deadline, function, *args):
    # The request may have waited in the executor's queue past its deadline: then it is not run.
    _check_deadline(deadline)
    return function(*args)


def _run_tasks(servable, plans, examples, fetches) -> dict[str, np.ndarray]:
    """Feed the serialized Examples to every task's input tensor; fetched tensors by name."""
    feeds = {task.input_tensor: examples for task in plans}
    return dict(zip(fetches, servable.run_tensors(feeds, list(fetches)), strict=True))


def _batch_key(model_name, version, signature_key, inputs, output_filter) -> tuple:
    """Requests merge only when everything but the batch dimension agrees."""
    # dtype objects, not their `.str`, which builds a new string on every request.
    shapes = tuple(sorted((k, v.dtype, v.shape[1:]) for k, v in inputs.items()))
    return (model_name, version, signature_key, tuple(output_filter), shapes)
