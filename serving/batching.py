"""Server-side batching with TensorFlow Serving's `BatchingParameters` semantics.

With `--enable_batching` the embedded server hands every Predict to `BatchScheduler.submit`.
Requests with the same key (model, version, signature, output filter, input names, dtypes and
non-batch shapes) are merged along axis 0, run once in a worker thread and split back. The rules
follow TF Serving's shared batch scheduler (`tensorflow/core/kernels/batching_util/
shared_batch_scheduler.h`) and its batching session (`tensorflow_serving/batching/
batching_session.cc`):

- one queue per key, holding closed batches and one open batch at its back;
- a batch closes when the next task would overflow it, or, once a thread is free, when it is
  full or `batch_timeout_micros` has passed since its first task arrived;
- at most `num_batch_threads` batches run at a time, across all queues (round-robin);
- a queue already holding `max_enqueued_batches` batches rejects a task that does not fit its
  open batch (UNAVAILABLE);
- merged inputs are padded up to the next `allowed_batch_sizes` entry with copies of the first
  row of the last task, and the padding is sliced off the outputs.

The `--batching_parameters_file` is a text-format `BatchingParameters` proto
(`tensorflow_serving/servables/tensorflow/session_bundle_config.proto`), parsed by protobuf's
text format parser (serving/text_protos.py declares the message, which the
tensorflow-serving-api wheel does not ship).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import itertools
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from convstack.serving import text_protos
from convstack.serving.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ServingError,
    Unavailable,
)

__all__ = [
    "BatchScheduler",
    "BatchStats",
    "BatchingConfigError",
    "BatchingParameters",
    "load_batching_parameters",
    "parse_batching_parameters",
]

log = logging.getLogger(__name__)

RunFn = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]

# TF Serving's message for a task that timed out while queued (batching_session.cc).
QUEUE_TIMEOUT_MESSAGE = "Run() timeout exceeded while waiting in batching queue"
QUEUE_FULL_MESSAGE = "The batch scheduling queue to which this task was submitted is full"


# --- parameters ------------------------------------------------------------------------------


def _max_parallelism() -> int:
    """TF's `port::MaxParallelism()`: the CPUs this process may be scheduled on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class BatchingConfigError(ValueError):
    """Malformed or invalid batching parameters; one line naming the source, line and field."""

    def __init__(
        self,
        detail: str,
        *,
        source: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.detail = detail
        self.source = source
        self.line = line
        self.field = field
        where = source if line is None or source is None else f"{source}:{line}"
        super().__init__(f"{where}: {detail}" if where else detail)


@dataclass(frozen=True)
class BatchingParameters:
    """TF Serving's `BatchingParameters`, with its defaults (SharedBatchScheduler's options).

    `max_execution_batch_size` only counts when `enable_large_batch_splitting` is on; then tasks
    up to `max_batch_size` rows are accepted and split into batches of at most
    `max_execution_batch_size` rows (None: `max_batch_size`).
    """

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = field(default_factory=_max_parallelism)
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    thread_pool_name: str = "batch_threads"
    enable_large_batch_splitting: bool = False
    max_execution_batch_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_batch_sizes", tuple(self.allowed_batch_sizes))
        problem = _first_problem(self)
        if problem is not None:
            name, detail = problem
            raise BatchingConfigError(detail, field=name)

    @property
    def execution_batch_size(self) -> int:
        """The most rows one batch may hold (TF's `max_execution_batch_size()` of a queue)."""
        if self.enable_large_batch_splitting and self.max_execution_batch_size is not None:
            return self.max_execution_batch_size
        return self.max_batch_size


_MINIMUMS = {
    "max_batch_size": 1,
    "batch_timeout_micros": 0,
    "max_enqueued_batches": 1,
    "num_batch_threads": 1,
}


def _first_problem(p: BatchingParameters) -> tuple[str, str] | None:
    """The first rule TF Serving would reject `p` for, as (field, message)."""
    # Messages follow SharedBatchScheduler::Create/AddQueue and WrapSessionForBatching.
    for name, minimum in _MINIMUMS.items():
        value = getattr(p, name)
        if value < minimum:
            rule = "non-negative" if minimum == 0 else "positive"
            return name, f"{name} must be {rule}; was {value}"
    execution = p.max_execution_batch_size
    if p.enable_large_batch_splitting and execution is not None:
        if execution < 1:
            return "max_execution_batch_size", (
                f"max_execution_batch_size must be positive; was {execution}"
            )
        if execution > p.max_batch_size:
            return "max_execution_batch_size", (
                "When enable_large_batch_splitting is true, max_batch_size must be greater "
                f"than or equal to max_execution_batch_size; was {p.max_batch_size} < {execution}"
            )
    return _allowed_sizes_problem(p.allowed_batch_sizes, p.max_batch_size)


def _allowed_sizes_problem(sizes: tuple[int, ...], max_batch_size: int) -> tuple[str, str] | None:
    name = "allowed_batch_sizes"
    if not sizes:
        return None
    if any(size < 1 for size in sizes):
        return name, f"allowed_batch_sizes entries must be positive; was {list(sizes)}"
    if any(b <= a for a, b in itertools.pairwise(sizes)):
        return name, (
            f"allowed_batch_sizes entries must be monotonically increasing; was {list(sizes)}"
        )
    if sizes[-1] != max_batch_size:
        return name, (
            "Last entry in allowed_batch_sizes must match max_batch_size; last entry was "
            f"{sizes[-1]}; expected {max_batch_size}"
        )
    return None


# --- the text-format file --------------------------------------------------------------------

# BatchingParameters fields held in google.protobuf wrappers: set only when written.
_WRAPPED_FIELDS = (
    "max_batch_size",
    "batch_timeout_micros",
    "max_enqueued_batches",
    "num_batch_threads",
    "thread_pool_name",
    "enable_large_batch_splitting",
    "max_execution_batch_size",
)


def _field_values(proto) -> dict[str, object]:
    """The dataclass arguments a parsed BatchingParameters sets (unset wrappers keep defaults)."""
    values: dict[str, object] = {
        name: getattr(proto, name).value for name in _WRAPPED_FIELDS if proto.HasField(name)
    }
    if proto.allowed_batch_sizes:
        values["allowed_batch_sizes"] = tuple(proto.allowed_batch_sizes)
    values["pad_variable_length_inputs"] = proto.pad_variable_length_inputs
    return values


def _field_line(text: str, name: str) -> int | None:
    """The first line (1-based) on which field `name` is written, comments aside."""
    pattern = re.compile(rf"(?<![\w.]){re.escape(name)}\s*[:{{<\[]")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.search(line.split("#", 1)[0]):
            return number
    return None


def _apply_tf_rewrites(values: dict[str, object], text: str, source: str) -> None:
    """What TF Serving does to a parsed file before using it."""
    splitting = bool(values.get("enable_large_batch_splitting", False))
    if values.get("max_enqueued_batches") == 0 and not splitting:
        # SharedBatchScheduler::AddQueue keeps old low-QPS configs working this way.
        log.warning(
            "%s:%s: max_enqueued_batches 0 is treated as 1, as TF Serving does",
            source,
            _field_line(text, "max_enqueued_batches"),
        )
        values["max_enqueued_batches"] = 1
    if "max_execution_batch_size" in values and not splitting:
        log.warning(
            "%s:%s: max_execution_batch_size is ignored unless enable_large_batch_splitting "
            "is true",
            source,
            _field_line(text, "max_execution_batch_size"),
        )
        del values["max_execution_batch_size"]


def parse_batching_parameters(
    text: str, source: str = "<batching_parameters>"
) -> BatchingParameters:
    """Parse a text-format `BatchingParameters` as TF Serving reads `--batching_parameters_file`:
    protobuf's text format parser on the same message (serving/text_protos.py).

    Malformed text, unknown fields and values TF Serving rejects raise BatchingConfigError
    naming `source`, the line and (for a rejected value) the field.
    """
    try:
        proto = text_protos.parse("BatchingParameters", text)
    except text_protos.TextProtoError as exc:
        raise BatchingConfigError(exc.detail, source=source, line=exc.line) from None
    values = _field_values(proto)
    _apply_tf_rewrites(values, text, source)
    try:
        return BatchingParameters(**values)
    except BatchingConfigError as exc:
        line = _field_line(text, exc.field or "") or 1
        raise BatchingConfigError(exc.detail, source=source, line=line, field=exc.field) from None


def load_batching_parameters(path: str | os.PathLike[str]) -> BatchingParameters:
    """Read and parse a `--batching_parameters_file`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        detail = getattr(exc, "strerror", None) or str(exc)
        raise BatchingConfigError(
            f"cannot read the batching parameters file: {detail}", source=str(path)
        ) from exc
    return parse_batching_parameters(text, source=str(path))


# --- merging and splitting tensors (run in the batch threads) --------------------------------


class BatchStats(NamedTuple):  # not a frozen dataclass: one is built for every batch, lone ones too
    """What one batch run looked like; handed to `on_batch` after the run."""

    key: Hashable
    size: int  # real rows
    padded_size: int  # rows `run` saw
    num_tasks: int
    queue_delay_seconds: Sequence[float]  # per task: from submit to the batch starting
    run_seconds: float


class _Outcome(NamedTuple):  # not a frozen dataclass: it is built on every request's path
    outputs: list[dict[str, np.ndarray]] | None = None
    error: BaseException | None = None
    padded_size: int | None = None  # None: `run` was never called
    run_seconds: float = 0.0


def _round_up(allowed: tuple[int, ...], size: int) -> int:
    """TF Serving's RoundToLowestAllowedBatchSize."""
    if not allowed:  # the usual case, on every request's path: no generator to build
        return size
    return next((a for a in allowed if a >= size), size)


def _pad_to(array: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
    """TF Serving's AddPadding: grow dims 1.. to `dims` with the tensor's first element."""
    if not 1 <= array.ndim <= 6:
        raise InvalidArgument("Only tensors with rank from 1 to 6 can be padded.")
    if array.shape[1:] == dims:
        return array
    if array.size == 0:
        raise InvalidArgument("Got empty tensor in batch of non-empty tensors.")
    widths = [(0, 0)] + [(0, d - s) for s, d in zip(array.shape[1:], dims, strict=True)]
    return np.pad(array, widths, mode="constant", constant_values=array.flat[0])


def _merge_one(name: str, arrays: list[np.ndarray], pad_variable: bool) -> list[np.ndarray]:
    if any(a.dtype != arrays[0].dtype or a.ndim != arrays[0].ndim for a in arrays):
        raise Internal("One or more tasks does not conform to batch signature")
    if pad_variable:
        dims = tuple(max(sizes) for sizes in zip(*(a.shape[1:] for a in arrays), strict=True))
        return [_pad_to(a, dims) for a in arrays]
    if any(a.shape[1:] != arrays[0].shape[1:] for a in arrays):
        raise FailedPrecondition(
            f"Tensors with name '{name}' from different tasks have different shapes and "
            "padding is turned off. Set pad_variable_length_inputs to true, or ensure that all "
            "tensors with the same name have equal dimensions starting with the first dim."
        )
    return arrays


def _merge_inputs(
    inputs: list[dict[str, np.ndarray]], sizes: list[int], params: BatchingParameters
) -> tuple[dict[str, np.ndarray], int]:
    """Concatenate the tasks' inputs along axis 0 and pad to an allowed batch size."""
    padded = _round_up(params.allowed_batch_sizes, sum(sizes))
    if len(inputs) == 1 and padded == sizes[0] and not params.pad_variable_length_inputs:
        return inputs[0], padded  # one task, no rows to add: nothing to check or join
    padding = padded - sum(sizes)
    names = list(inputs[0])
    if any(set(task) != set(names) for task in inputs):
        raise Internal("One or more tasks does not conform to batch signature")
    merged = {}
    for name in names:
        arrays = _merge_one(
            name, [task[name] for task in inputs], params.pad_variable_length_inputs
        )
        if padding:
            # Like TF Serving: repeat the first row of the last task (a known-valid row).
            donor = next((a for a in reversed(arrays) if len(a)), arrays[-1])
            arrays.append(np.repeat(donor[:1], padding, axis=0))
        merged[name] = np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]
    return merged, padded


def _split_outputs(
    outputs: Mapping[str, np.ndarray], sizes: list[int], padded: int
) -> list[dict[str, np.ndarray]]:
    """Slice each batched output back into the tasks' rows, dropping the padding."""
    if not isinstance(outputs, Mapping):
        raise Internal(f"The batched run returned {type(outputs).__name__}, not a dict of tensors")
    per_task: list[dict[str, np.ndarray]] = [{} for _ in sizes]
    whole = len(sizes) == 1 and sizes[0] == padded  # one task and no padding: nothing to cut
    for name, value in outputs.items():
        array = np.asarray(value)
        if array.ndim == 0:
            raise Internal(f"Batched output tensor '{name}' has 0 dimensions")
        if array.shape[0] != padded:
            raise Internal(
                f"Batched output tensor '{name}' 0th dimension {array.shape[0]} does not equal "
                f"the sum of the 0th dimension sizes of the input tensors ({padded})"
            )
        if whole:
            per_task[0][name] = array
            continue
        start = 0
        for task, size in zip(per_task, sizes, strict=True):
            task[name] = array[start : start + size]
            start += size
    return per_task


def _execute_batch(
    run: RunFn, inputs: list[dict[str, np.ndarray]], sizes: list[int], params: BatchingParameters
) -> _Outcome:
    """Merge, run, split: the work of one batch thread. Errors come back as values."""
    try:
        merged, padded = _merge_inputs(inputs, sizes, params)
    except Exception as exc:
        return _Outcome(error=exc)
    started = time.perf_counter()
    try:
        outputs = run(merged)
    except Exception as exc:
        return _Outcome(error=exc, padded_size=padded, run_seconds=time.perf_counter() - started)
    seconds = time.perf_counter() - started
    try:
        return _Outcome(_split_outputs(outputs, sizes, padded), None, padded, seconds)
    except Exception as exc:
        return _Outcome(error=exc, padded_size=padded, run_seconds=seconds)


_NOT_QUEUED = (0.0,)  # the queue delays of a task that ran as soon as it came


def _run_whole(run: RunFn, inputs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Run one task that is a whole batch (nothing to merge, pad or cut); errors come out as
    ServingErrors. Outputs that are not plain arrays of `rows` rows take `_split_outputs`, for
    its conversion and its errors. Kept short because a lone request pays for every line: after
    a TensorFlow run the interpreter's caches are cold, and the general merge and split measured
    about three times their warm-loop cost there (5 us a request)."""
    try:
        outputs = run(inputs)
    except Exception as exc:
        raise _as_serving_error(exc) from None
    try:
        for array in outputs.values():
            if not array.ndim or array.shape[0] != rows:
                break
        else:
            return outputs
    except AttributeError:  # not a mapping, or values that are not arrays
        pass
    try:
        return _split_outputs(outputs, [rows], rows)[0]
    except Exception as exc:
        raise _as_serving_error(exc) from None


def _as_serving_error(error: BaseException) -> ServingError:
    """A fresh error per task (tasks must not share one traceback): ServingErrors keep their
    class and message; anything else is INTERNAL with its message."""
    if isinstance(error, ServingError):
        try:
            clone = copy.copy(error)
        except Exception:
            clone = Internal(error.message)
    else:
        clone = Internal(str(error) or type(error).__name__)
    clone.__cause__ = error
    return clone


# --- the scheduler ---------------------------------------------------------------------------


class _Request:
    """One submit() call: one piece, or several when large-batch splitting applies."""

    __slots__ = ("deadline", "enqueued", "future", "pieces", "remaining", "results", "run")

    def __init__(self, future: asyncio.Future, deadline: float | None, enqueued: float, run: RunFn):
        self.future = future
        self.deadline = deadline
        self.enqueued = enqueued
        self.run = run
        self.pieces: list[_Piece] = []
        self.results: dict[int, dict[str, np.ndarray]] = {}
        self.remaining = 0


class _Piece:
    """A task in TF's sense: rows of one request that go into one batch."""

    __slots__ = ("batch", "index", "inputs", "request", "size")

    def __init__(self, request: _Request, index: int, inputs: dict[str, np.ndarray], size: int):
        self.request = request
        self.index = index
        self.inputs = inputs
        self.size = size
        self.batch: _Batch | None = None  # set while queued, None once running


class _Batch:
    __slots__ = ("pieces", "size", "started")

    def __init__(self) -> None:
        self.pieces: list[_Piece] = []
        self.size = 0
        self.started = 0.0  # when its first piece arrived

    def add(self, piece: _Piece, now: float) -> None:
        if not self.pieces:
            self.started = now
        self.pieces.append(piece)
        self.size += piece.size
        piece.batch = self

    def remove(self, piece: _Piece) -> None:
        self.pieces.remove(piece)
        self.size -= piece.size
        piece.batch = None


def _split_sizes(rows: int, room: int, limit: int) -> list[int]:
    """TF Serving's SplitInputTask: fill the open batch's room, then batches of `limit`."""
    if rows <= room:
        return [rows]
    sizes = [room] if room > 0 else []
    left = rows - max(room, 0)
    while left > 0:
        sizes.append(min(left, limit))
        left -= sizes[-1]
    return sizes


class _Queue:
    """TF's internal::Queue for one key: closed batches, then the open batch at the back."""

    def __init__(self, params: BatchingParameters) -> None:
        self.params = params
        self.limit = params.execution_batch_size
        self.timeout = params.batch_timeout_micros / 1e6
        self.batches: deque[_Batch] = deque([_Batch()])
        self.running = 0

    def enqueue(self, request: _Request, inputs: dict[str, np.ndarray], rows: int, now: float):
        """Add the request's rows, or raise as TF's Queue::Schedule would."""
        p = self.params
        if rows > p.max_batch_size:
            raise InvalidArgument(
                f"Task size {rows} is larger than maximum input batch size {p.max_batch_size}"
            )
        open_size = self.batches[-1].size
        if p.enable_large_batch_splitting:
            capacity = (p.max_enqueued_batches - len(self.batches)) * self.limit + (
                self.limit - open_size
            )
            if rows > capacity:
                raise Unavailable(
                    f"{QUEUE_FULL_MESSAGE}; task size is {rows} but scheduling capacity is only "
                    f"{capacity} (num_enqueued_batches={len(self.batches)}, max_enqueued_batches="
                    f"{p.max_enqueued_batches}, open_batch_size={open_size}, "
                    f"max_execution_batch_size={self.limit})"
                )
            sizes = _split_sizes(rows, self.limit - open_size, self.limit)
        else:
            if open_size + rows > p.max_batch_size and len(self.batches) >= p.max_enqueued_batches:
                raise Unavailable(
                    f"{QUEUE_FULL_MESSAGE}; currently {len(self.batches)} batches enqueued and "
                    f"max_enqueued_batches is {p.max_enqueued_batches}"
                )
            sizes = [rows]
        self._place(request, inputs, sizes, now)

    def _place(self, request: _Request, inputs, sizes: list[int], now: float) -> None:
        start = 0
        for index, size in enumerate(sizes):
            piece_inputs = (
                inputs
                if len(sizes) == 1
                else {k: v[start : start + size] for k, v in inputs.items()}
            )
            start += size
            piece = _Piece(request, index, piece_inputs, size)
            if self.batches[-1].size + size > self.limit:
                self.batches.append(_Batch())  # closes the previous open batch
            self.batches[-1].add(piece, now)
            request.pieces.append(piece)
        request.remaining = len(sizes)

    def take(self, now: float, flush: bool) -> _Batch | None:
        """The next batch to run, if any (TF's Queue::ScheduleBatch)."""
        if len(self.batches) < 2 and not self._open_ready(now, flush):
            return None
        batch = self.batches.popleft()
        if not self.batches:
            self.batches.append(_Batch())
        for piece in batch.pieces:
            piece.batch = None
        return batch

    def _open_ready(self, now: float, flush: bool) -> bool:
        batch = self.batches[-1]
        if not batch.pieces:
            return False
        return flush or batch.size >= self.limit or now >= batch.started + self.timeout

    def ready_at(self) -> float | None:
        """When the open batch times out, if it holds anything and nothing else waits."""
        batch = self.batches[-1]
        if len(self.batches) == 1 and batch.pieces:
            return batch.started + self.timeout
        return None

    def withdraw(self, piece: _Piece) -> None:
        batch = piece.batch
        if batch is None:
            return
        batch.remove(piece)
        if not batch.pieces and batch is not self.batches[-1]:
            self.batches.remove(batch)

    def idle(self) -> bool:
        return self.running == 0 and len(self.batches) == 1 and not self.batches[0].pieces


def _task_rows(inputs: Mapping[str, np.ndarray]) -> int:
    """The task's size: the common 0th dimension of its inputs (TF's ComputeTensorBatchSize)."""
    if not inputs:
        raise InvalidArgument("Batching Run() must have at least one input tensor")
    rows = None
    for name, array in inputs.items():
        if array.ndim == 0:
            raise InvalidArgument(
                f"Batching Run() input tensors must have at least one dimension; '{name}' is a "
                "scalar"
            )
        if rows is None:
            rows = array.shape[0]
        elif array.shape[0] != rows:
            raise InvalidArgument(
                "Batching Run() input tensors must have equal 0th-dimension size; "
                f"'{name}' has {array.shape[0]}, expected {rows}"
            )
    return rows


# A request run on the event loop's thread (a lone Predict, with or without batching) has at most
# this many input elements (five 28x28 images; a batch of 32 is 25,088): well under a millisecond
# of blocking for a small model. "Lone" is judged by the requests the loop has read, and while
# it runs a request it reads none: at 1 << 15 a batch of 32 digits images ran inline under 4
# concurrent clients, each run hiding the others, one TensorFlow call at a time (gRPC 32x4
# 111 req/s, REST 70; at 1 << 12, 151 and 151).
INLINE_MAX_ELEMENTS = 1 << 12


def small_enough_to_run_inline(inputs: Mapping[str, np.ndarray]) -> bool:
    """Whether a lone request's inputs are small enough to run on the event loop's thread."""
    elements = 0  # a loop, not sum() over a generator: this runs on every request
    for value in inputs.values():
        elements += value.size if isinstance(value, np.ndarray) else np.size(value)
    return elements <= INLINE_MAX_ELEMENTS


def _callbacks_waiting(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether other callbacks are ready to run on `loop` before anything it would read next.

    CPython's event loops keep them in the private `_ready` deque (asyncio has no public
    query); a loop without one (uvloop) is taken to have some, which costs a yield, never a
    missed merge."""
    ready = getattr(loop, "_ready", None)
    return ready is None or len(ready) > 0


class BatchScheduler:
    """TF Serving's shared batch scheduler on an asyncio loop: one queue per key, batches run
    with `run` in `executor` threads, at most `num_batch_threads` at a time across all keys.

    Tasks that share a key must share an equivalent `run` (the first task's runs the batch).
    A scheduler is bound to the event loop of its first `submit`; `on_batch` is called on that
    loop after every batch that reached `run` (failed runs included).
    """

    def __init__(
        self,
        params: BatchingParameters,
        *,
        executor: concurrent.futures.Executor | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        outstanding: Callable[[], int] | None = None,
    ) -> None:
        self._params = params
        self._most_rows = params.execution_batch_size
        # How many requests are inside the server (the caller's count). When every one of them
        # already waits in a queue, no other task can join the open batch before its timeout:
        # it runs at once, on the loop's thread when nothing else runs, instead of waiting.
        self._outstanding = outstanding
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=params.num_batch_threads, thread_name_prefix=params.thread_pool_name
        )
        self._on_batch = on_batch
        self._queues: dict[Hashable, _Queue] = {}
        self._next_queue = 0  # round-robin position among the queues
        self._running = 0
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatch_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due: float | None = None  # time.monotonic() of the armed timer
        self._drained = asyncio.Event()

    @property
    def params(self) -> BatchingParameters:
        return self._params

    async def submit(
        self,
        key: Hashable,
        inputs: Mapping[str, np.ndarray],
        run: RunFn,
        *,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Queue `inputs` (rows along axis 0) with others of the same `key`; return this task's
        rows of the batched outputs.

        `deadline` is a `time.monotonic()` timestamp: a task still queued past it fails with
        DeadlineExceeded and is not run. Raises InvalidArgument (bad or oversized task),
        Unavailable (queue full, scheduler closing) or the batch's error.
        """
        if self._closing:
            raise Unavailable("The batch scheduler is shutting down and accepts no new tasks")
        loop = self._bind_loop()
        arrays = {name: np.asarray(value) for name, value in inputs.items()}
        rows = _task_rows(arrays)
        if self._alone(arrays, rows) and (
            not _callbacks_waiting(loop) or await self._alone_after_a_loop_pass(arrays, rows)
        ):
            return self._run_alone(key, arrays, rows, run)
        now = time.monotonic()
        request = _Request(loop.create_future(), deadline, now, run)
        queue = self._queues.get(key) or _Queue(self._params)
        queue.enqueue(request, arrays, rows, now)
        self._queues.setdefault(key, queue)
        self._request_dispatch()
        timer = (
            None
            if deadline is None
            else loop.call_later(max(0.0, deadline - now), self._expire, key, request)
        )
        try:
            return await request.future
        except asyncio.CancelledError:
            self._withdraw(key, request)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def close(self) -> None:
        """Stop accepting tasks (Unavailable), run everything queued without waiting for
        timeouts, wait for running batches, then release the executor if it is ours."""
        self._closing = True
        if self._loop is not None:
            self._request_dispatch()
            self._check_drained()
            await self._drained.wait()
        if self._owns_executor:
            self._executor.shutdown(wait=False)

    # Everything below runs on the event loop thread.

    def _alone(self, arrays: Mapping[str, np.ndarray], rows: int) -> bool:
        """Whether a task is the only request in the server, with nothing queued or running
        (see `outstanding`): its batch would hold it alone, so it runs at once, inline."""
        outstanding = self._outstanding
        if outstanding is None or self._running or outstanding() != 1:
            return False
        if rows > self._most_rows:
            return False  # split (or refused) as usual
        return small_enough_to_run_inline(arrays)

    async def _alone_after_a_loop_pass(self, arrays: Mapping[str, np.ndarray], rows: int):
        """Whether a task judged alone still is once requests the loop read together with it
        have reached the server: their handlers are queued behind it (see _callbacks_waiting),
        and one pass through the loop lets them in, or under load every request would run
        alone. With nothing queued behind it the pass is skipped: it would resume this task
        before anything the loop reads or times out, and only cost a select()."""
        await asyncio.sleep(0)
        return self._alone(arrays, rows)

    def _run_alone(self, key, arrays, rows: int, run: RunFn) -> dict[str, np.ndarray]:
        """Run a lone task as a batch of its own on the loop's thread: padded as any batch,
        counted in the batch metrics, but without the queue, its future and the two loop
        iterations of a dispatch, which cost a lone small request more than its run.

        Nothing else runs on the loop meanwhile, so no other task can see it running. A task
        that fills its batch exactly (no allowed size above it, no padding of dimensions) has
        nothing to merge or cut and goes straight to `run`: at concurrency 1 every request
        takes this path, and each line on it is paid once per request (see _run_whole)."""
        if self._params.pad_variable_length_inputs or (
            _round_up(self._params.allowed_batch_sizes, rows) != rows
        ):
            outcome = _execute_batch(run, [arrays], [rows], self._params)
            self._report(key, [rows], outcome, _NOT_QUEUED)
            if outcome.error is not None:
                raise _as_serving_error(outcome.error)
            return outcome.outputs[0]
        started = time.perf_counter()
        try:
            return _run_whole(run, arrays, rows)
        finally:
            self._notify(BatchStats(key, rows, rows, 1, _NOT_QUEUED, time.perf_counter() - started))

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("This BatchScheduler is bound to another event loop")
        return loop

    def _request_dispatch(self) -> None:
        # Deferred to the next loop iteration, so tasks submitted together merge even with
        # batch_timeout_micros 0 (TF's batch threads likewise pick up what is already waiting).
        if self._dispatch_handle is None and self._loop is not None:
            self._dispatch_handle = self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_handle = None
        now = time.monotonic()
        while self._running < self._params.num_batch_threads:
            lonely = self._nobody_else_can_join()
            picked = self._pick_batch(now, lonely)
            if picked is None:
                break
            self._launch(*picked, now, inline=lonely and self._running == 0)
        self._arm_timer(now)
        self._check_drained()

    def _nobody_else_can_join(self) -> bool:
        """Whether every request in the server is already queued here (see `outstanding`)."""
        if self._outstanding is None:
            return False
        queued = {
            id(piece.request)
            for queue in self._queues.values()
            for batch in queue.batches
            for piece in batch.pieces
        }
        return bool(queued) and self._outstanding() <= len(queued)

    def _pick_batch(self, now: float, lonely: bool = False) -> tuple[Hashable, _Batch] | None:
        keys = list(self._queues)
        for offset in range(len(keys)):
            position = (self._next_queue + offset) % len(keys)
            batch = self._queues[keys[position]].take(now, flush=self._closing or lonely)
            if batch is not None:
                self._next_queue = position + 1
                return keys[position], batch
        return None

    def _launch(self, key: Hashable, batch: _Batch, now: float, inline: bool = False) -> None:
        pieces = [piece for piece in batch.pieces if self._admit(piece, now)]
        if not pieces:
            self._forget_if_idle(key)
            return
        queue = self._queues[key]
        queue.running += 1
        self._running += 1
        delays = [now - piece.request.enqueued for piece in pieces]
        # Only a lone request runs on the loop's thread, as without batching: a batch of several
        # means others are arriving, and blocking the loop for its run would hold them back.
        lone = len(pieces) == 1
        if inline and lone and small_enough_to_run_inline(pieces[0].inputs):
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(
                _execute_batch(
                    pieces[0].request.run,
                    [piece.inputs for piece in pieces],
                    [piece.size for piece in pieces],
                    self._params,
                )
            )
            self._batch_done(key, queue, pieces, delays, done)
            return
        # Straight to a batch thread (no Task, no wrapped asyncio future): the batch starts now,
        # not an event-loop iteration later, and comes back with one call_soon_threadsafe.
        try:
            future = self._executor.submit(
                _execute_batch,
                pieces[0].request.run,
                [piece.inputs for piece in pieces],
                [piece.size for piece in pieces],
                self._params,
            )
        except Exception as exc:  # e.g. the executor was shut down under us
            self._finish_batch(key, queue, pieces, delays, _Outcome(error=exc))
            return
        loop = self._loop
        future.add_done_callback(
            lambda done: loop.call_soon_threadsafe(
                self._batch_done, key, queue, pieces, delays, done
            )
        )

    @staticmethod
    def _admit(piece: _Piece, now: float) -> bool:
        """Whether a piece still runs: not cancelled, failed or past its deadline."""
        request = piece.request
        if request.future.done():
            return False
        if request.deadline is not None and now >= request.deadline:
            request.future.set_exception(DeadlineExceeded(QUEUE_TIMEOUT_MESSAGE))
            return False
        return True

    def _batch_done(self, key, queue: _Queue, pieces, delays, done: concurrent.futures.Future):
        if done.cancelled():
            outcome = _Outcome(error=Cancelled("The batch was cancelled before it finished"))
        elif done.exception() is not None:  # _execute_batch returns errors; this is a bug
            outcome = _Outcome(error=done.exception())
        else:
            outcome = done.result()
        self._finish_batch(key, queue, pieces, delays, outcome)

    def _finish_batch(self, key, queue: _Queue, pieces, delays, outcome: _Outcome) -> None:
        try:
            self._deliver(pieces, outcome)
        finally:
            queue.running -= 1
            self._running -= 1
            self._forget_if_idle(key)
            self._request_dispatch()
        self._report(key, [piece.size for piece in pieces], outcome, delays)

    def _deliver(self, pieces: list[_Piece], outcome: _Outcome) -> None:
        if outcome.error is not None:
            for piece in pieces:
                if not piece.request.future.done():
                    piece.request.future.set_exception(_as_serving_error(outcome.error))
            return
        for piece, outputs in zip(pieces, outcome.outputs, strict=True):
            self._complete(piece, outputs)

    @staticmethod
    def _complete(piece: _Piece, outputs: dict[str, np.ndarray]) -> None:
        request = piece.request
        if request.future.done():
            return
        request.results[piece.index] = outputs
        request.remaining -= 1
        if request.remaining > 0:
            return
        if len(request.pieces) == 1:
            request.future.set_result(outputs)
            return
        parts = [request.results[i] for i in range(len(request.pieces))]
        try:
            joined = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        except (ValueError, KeyError) as exc:
            request.future.set_exception(Internal(f"Reassembling a split task failed: {exc}"))
            return
        request.future.set_result(joined)

    def _report(self, key, sizes: list[int], outcome: _Outcome, delays: Sequence[float]):
        if outcome.padded_size is None:  # the batch never reached `run`
            return
        self._notify(
            BatchStats(
                key=key,
                size=sum(sizes),
                padded_size=outcome.padded_size,
                num_tasks=len(sizes),
                queue_delay_seconds=delays,
                run_seconds=outcome.run_seconds,
            )
        )

    def _notify(self, stats: BatchStats) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(stats)
        except Exception:  # a metrics hook must not break serving
            log.exception("on_batch callback failed")

    def _expire(self, key: Hashable, request: _Request) -> None:
        """The deadline passed: fail the request now and free its queued rows (pieces already
        running finish, their rows are dropped)."""
        if request.future.done():
            return
        queued = any(piece.batch is not None for piece in request.pieces)
        message = QUEUE_TIMEOUT_MESSAGE if queued else "Deadline Exceeded"
        request.future.set_exception(DeadlineExceeded(message))
        self._withdraw(key, request)

    def _withdraw(self, key: Hashable, request: _Request) -> None:
        """Drop a cancelled request's pieces that are still queued."""
        queue = self._queues.get(key)
        if queue is None:
            return
        for piece in request.pieces:
            queue.withdraw(piece)
        self._forget_if_idle(key)
        self._check_drained()

    def _forget_if_idle(self, key: Hashable) -> None:
        # Keys carry shapes, so idle queues are dropped to keep their number bounded.
        queue = self._queues.get(key)
        if queue is not None and queue.idle():
            del self._queues[key]

    def _arm_timer(self, now: float) -> None:
        due = None
        if self._running < self._params.num_batch_threads:  # else the next finished batch
            ready = (queue.ready_at() for queue in self._queues.values())
            due = min((t for t in ready if t is not None), default=None)
        if due == self._timer_due:
            return  # already armed for it: dispatches run every loop iteration under load
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_due = None, due
        if due is not None:
            self._timer = self._loop.call_later(max(0.0, due - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_due = None
        self._dispatch()

    def _check_drained(self) -> None:
        if self._closing and self._running == 0 and not self._queues:
            self._drained.set()
