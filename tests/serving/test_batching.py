"""Batching parameters parsing and the asyncio batch scheduler, with real threads and a
pure-numpy model that records the batches it sees."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time

import numpy as np
import pytest

from convstack.serving.batching import (
    BatchingConfigError,
    BatchingParameters,
    BatchScheduler,
    BatchStats,
    load_batching_parameters,
    parse_batching_parameters,
)
from convstack.serving.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ServingError,
    Unavailable,
)

QUEUE_FULL = "The batch scheduling queue to which this task was submitted is full"
LONG_TIMEOUT_MICROS = 10_000_000  # never reached by a passing test: batches close otherwise


# --- parsing ---------------------------------------------------------------------------------

TF_SERVING_EXAMPLE = """\
max_batch_size { value: 32 }
batch_timeout_micros { value: 1000 }
max_enqueued_batches { value: 100 }
num_batch_threads { value: 4 }
allowed_batch_sizes: 8
allowed_batch_sizes: 16
allowed_batch_sizes: 32
pad_variable_length_inputs: false
"""


def test_parses_tf_serving_example():
    params = parse_batching_parameters(TF_SERVING_EXAMPLE)
    assert params.max_batch_size == 32
    assert params.batch_timeout_micros == 1000
    assert params.max_enqueued_batches == 100
    assert params.num_batch_threads == 4
    assert params.allowed_batch_sizes == (8, 16, 32)
    assert params.pad_variable_length_inputs is False


def test_empty_file_gives_tf_serving_defaults():
    params = parse_batching_parameters("# nothing set\n")
    assert params == BatchingParameters()
    assert params.max_batch_size == 1000
    assert params.batch_timeout_micros == 0
    assert params.max_enqueued_batches == 10
    # TF's port::MaxParallelism(): the CPUs this process may run on.
    assert params.num_batch_threads == len(os.sched_getaffinity(0))
    assert params.allowed_batch_sizes == ()
    assert params.pad_variable_length_inputs is False
    assert params.enable_large_batch_splitting is False
    assert params.execution_batch_size == 1000


def test_accepts_text_format_variants():
    text = """
    # colon before a brace, hex, angle brackets, separators, list syntax, adjacent strings
    max_batch_size: { value: 0x10 }  # 16
    batch_timeout_micros < value: 5 >,
    allowed_batch_sizes: [4, 8]
    allowed_batch_sizes: 16;
    pad_variable_length_inputs: true
    thread_pool_name { value: "model" "_batch" }
    enable_large_batch_splitting { value: true }
    max_execution_batch_size { value: 8 }
    """
    params = parse_batching_parameters(text)
    assert params.max_batch_size == 16
    assert params.batch_timeout_micros == 5
    assert params.allowed_batch_sizes == (4, 8, 16)
    assert params.pad_variable_length_inputs is True
    assert params.thread_pool_name == "model_batch"
    assert params.execution_batch_size == 8


# Malformed text: protobuf's text format parser's own messages (TF Serving reads the file with
# it), with the line; no field is blamed.
MALFORMED_FILES = [
    (
        "max_batch_size { value: 8 }\nmax_batch_sise { value: 8 }",
        2,
        'has no field named "max_batch_sise"',
    ),
    ("max_batch_size: 8", 1, 'Expected "{"'),
    ("max_batch_size { vaule: 8 }", 1, 'no field named "vaule"'),
    ("max_batch_size { value: eight }", 1, "Couldn't parse integer: eight"),
    ("max_batch_size { value: 2.5 }", 1, "Couldn't parse integer: 2.5"),
    ("\nmax_batch_size { value: 8 ", 2, 'Expected "}"'),
    (
        "max_batch_size { value: 8 }\nmax_batch_size { value: 9 }",
        2,
        'should not have multiple "max_batch_size" fields',
    ),
    ("max_batch_size 8", 1, 'Expected "{"'),
    ("\n\nmax_batch_size = 8", 3, 'Expected "{"'),
    ("pad_variable_length_inputs: maybe", 1, 'Expected "true" or "false"'),
    ("thread_pool_name { value: 7 }", 1, "Expected string but found: '7'"),
    ("max_batch_size { value: 9223372036854775808 }", 1, "Value out of range"),
    # Not fields of TF Serving's BatchingParameters (they are BatchFunction op attributes or
    # TFRT options): TF Serving refuses them as unknown, and so do we.
    ("low_priority_max_batch_size { value: 4 }", 1, "has no field named"),
    ("mixed_priority_batching_policy: PRIORITY_MERGE", 1, "has no field named"),
]

# Values TF Serving rejects: its messages, the line and field that hold the value.
BAD_VALUES = [
    (
        "max_batch_size { value: 16 }\nallowed_batch_sizes: 8\n"
        "allowed_batch_sizes: 4\nallowed_batch_sizes: 16",
        2,
        "allowed_batch_sizes",
        "allowed_batch_sizes entries must be monotonically increasing",
    ),
    (
        "max_batch_size { value: 32 }\nallowed_batch_sizes: 8\nallowed_batch_sizes: 16",
        2,
        "allowed_batch_sizes",
        "Last entry in allowed_batch_sizes must match max_batch_size; last entry was 16; "
        "expected 32",
    ),
    (
        "allowed_batch_sizes: 8",
        1,
        "allowed_batch_sizes",
        "last entry was 8; expected 1000",
    ),
    (
        "num_batch_threads { value: 2 }\nbatch_timeout_micros { value: -1 }",
        2,
        "batch_timeout_micros",
        "batch_timeout_micros must be non-negative; was -1",
    ),
    ("num_batch_threads { value: 0 }", 1, "num_batch_threads", "must be positive; was 0"),
    ("max_batch_size {}", 1, "max_batch_size", "max_batch_size must be positive; was 0"),
    (
        "enable_large_batch_splitting { value: true }\nmax_batch_size { value: 8 }\n"
        "max_execution_batch_size { value: 16 }",
        3,
        "max_execution_batch_size",
        "greater than or equal to max_execution_batch_size",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "field", "fragment"),
    [(text, line, None, fragment) for text, line, fragment in MALFORMED_FILES] + BAD_VALUES,
)
def test_rejects_bad_files_naming_source_line_and_field(text, line, field, fragment):
    with pytest.raises(BatchingConfigError) as caught:
        parse_batching_parameters(text, source="batching.cfg")
    message = str(caught.value)
    assert message.startswith(f"batching.cfg:{line}: "), message
    assert fragment in message
    assert "\n" not in message
    assert caught.value.field == field
    if field is not None:
        assert field in message


def test_max_enqueued_batches_zero_becomes_one_as_in_tf_serving():
    params = parse_batching_parameters("max_enqueued_batches { value: 0 }")
    assert params.max_enqueued_batches == 1


def test_load_reads_the_file_and_names_a_missing_one(tmp_path):
    path = tmp_path / "batching.txt"
    path.write_text(TF_SERVING_EXAMPLE)
    assert load_batching_parameters(path).max_batch_size == 32
    missing = tmp_path / "absent.txt"
    with pytest.raises(BatchingConfigError, match=r"absent\.txt"):
        load_batching_parameters(missing)


def test_invalid_parameters_cannot_be_constructed():
    with pytest.raises(BatchingConfigError) as caught:
        BatchingParameters(max_batch_size=8, allowed_batch_sizes=(4,))
    assert caught.value.field == "allowed_batch_sizes"


# --- scheduler helpers -----------------------------------------------------------------------


class Model:
    """A pure-numpy `run`: y = 2x. Records the merged `x` of every call and how many calls
    overlap; with a gate, each call blocks until the gate opens."""

    def __init__(self, gate: threading.Event | None = None, fail_first: Exception | None = None):
        self.gate = gate
        self.fail_first = fail_first
        self.batches: list[np.ndarray] = []
        self.started = threading.Event()
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self.batches.append(inputs["x"].copy())
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            failure, self.fail_first = self.fail_first, None
        self.started.set()
        try:
            if self.gate is not None:
                assert self.gate.wait(10), "the test never opened the gate"
            if failure is not None:
                raise failure
            return {"y": inputs["x"] * 2}
        finally:
            with self._lock:
                self.active -= 1

    @property
    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]

    def saw(self, value: float) -> bool:
        return any(value in batch for batch in self.batches)


def rows(*values: float) -> dict[str, np.ndarray]:
    return {"x": np.array(values, dtype=np.float32).reshape(-1, 1)}


def params(**overrides) -> BatchingParameters:
    settings = {"num_batch_threads": 1, "batch_timeout_micros": LONG_TIMEOUT_MICROS}
    settings.update(overrides)
    return BatchingParameters(**settings)


def run_async(coroutine, timeout: float = 30.0):
    """Run a test coroutine on a fresh loop; a hang fails instead of blocking the suite."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def wait_started(model: Model) -> None:
    assert await asyncio.to_thread(model.started.wait, 10), "the model was never called"


async def let_tasks_enqueue() -> None:
    # Each sleep(0) lets every ready task take one step; two cover a task created just before.
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def assert_doubled(result: dict[str, np.ndarray], *values: float) -> None:
    np.testing.assert_array_equal(result["y"], rows(*values)["x"] * 2)


# --- scheduler -------------------------------------------------------------------------------


def test_concurrent_tasks_merge_into_one_batch():
    model = Model()

    async def main():
        scheduler = BatchScheduler(params(max_batch_size=8, num_batch_threads=2))
        results = await asyncio.gather(*(scheduler.submit("k", rows(i), model) for i in range(8)))
        await scheduler.close()
        return results

    results = run_async(main())
    assert model.sizes == [8]
    for i, result in enumerate(results):
        assert_doubled(result, i)


def test_timeout_closes_a_partial_batch():
    model = Model()

    async def main():
        scheduler = BatchScheduler(params(max_batch_size=100, batch_timeout_micros=20_000))
        results = await asyncio.gather(*(scheduler.submit("k", rows(i), model) for i in range(3)))
        await scheduler.close()
        return results

    results = run_async(main())
    assert model.sizes == [3]
    for i, result in enumerate(results):
        assert_doubled(result, i)


def test_zero_timeout_runs_at_once_and_merges_what_waited():
    gate = threading.Event()
    model = Model(gate)

    async def main():
        scheduler = BatchScheduler(params(max_batch_size=8, batch_timeout_micros=0))
        first = asyncio.create_task(scheduler.submit("k", rows(0), model))
        await wait_started(model)
        waiting = [asyncio.create_task(scheduler.submit("k", rows(i), model)) for i in (1, 2, 3)]
        await let_tasks_enqueue()
        gate.set()
        results = await asyncio.gather(first, *waiting)
        await scheduler.close()
        return results

    results = run_async(main())
    assert model.sizes == [1, 3]
    for i, result in enumerate(results):
        assert_doubled(result, i)


def test_zero_timeout_merges_tasks_submitted_together():
    model = Model()

    async def main():
        scheduler = BatchScheduler(params(max_batch_size=8, batch_timeout_micros=0))
        results = await asyncio.gather(*(scheduler.submit("k", rows(i), model) for i in range(4)))
        await scheduler.close()
        return results

    results = run_async(main())
    assert model.sizes == [4]
    for i, result in enumerate(results):
        assert_doubled(result, i)


def test_batches_never_exceed_max_batch_size():
    model = Model()

    async def main():
        scheduler = BatchScheduler(params(max_batch_size=4, batch_timeout_micros=20_000))
        singles = [scheduler.submit("ones", rows(i), model) for i in range(10)]
        triples = [scheduler.submit("threes", rows(i, i, i), model) for i in (100, 200)]
        results = await asyncio.gather(*singles, *triples)
        await scheduler.close()
        return results

    results = run_async(main())
    assert sorted(model.sizes) == [2, 3, 3, 4, 4]
    for i, result in enumerate(results[:10]):
        assert_doubled(result, i)
    assert_doubled(results[10], 100, 100, 100)


def test_different_keys_never_share_a_batch():
    model = Model()

    async def main():
        scheduler = BatchScheduler(params(max_batch_size=4, batch_timeout_micros=20_000))
        submits = [scheduler.submit(key, rows(v), model) for key, v in [("a", 1), ("b", 2)] * 2]
        await asyncio.gather(*submits)
        await scheduler.close()

    run_async(main())
    assert sorted(sorted(batch.ravel().tolist()) for batch in model.batches) == [[1, 1], [2, 2]]


def test_pads_to_the_next_allowed_size_and_slices_the_padding_off():
    model = Model()
    stats: list[BatchStats] = []

    async def main():
        scheduler = BatchScheduler(
            params(max_batch_size=8, allowed_batch_sizes=(2, 4, 8), batch_timeout_micros=20_000),
            on_batch=stats.append,
        )
        results = await asyncio.gather(*(scheduler.submit("k", rows(v), model) for v in (1, 2, 3)))
        await scheduler.close()
        return results

    results = run_async(main())
    # TF Serving pads with copies of the first row of the last task.
    assert model.batches[0].ravel().tolist() == [1, 2, 3, 3]
    for value, result in zip((1, 2, 3), results, strict=True):
        assert_doubled(result, value)
    [batch] = stats
    assert (batch.key, batch.size, batch.padded_size, batch.num_tasks) == ("k", 3, 4, 3)
    assert len(batch.queue_delay_seconds) == 3
    assert all(delay >= 0 for delay in batch.queue_delay_seconds)


def test_full_queue_rejects_with_tf_serving_message_while_earlier_tasks_complete():
    gate = threading.Event()
    model = Model(gate)

    async def main():
        scheduler = BatchScheduler(params(max_batch_size=2, max_enqueued_batches=1))
        running = asyncio.create_task(scheduler.submit("k", rows(1, 2), model))
        await wait_started(model)
        queued = asyncio.create_task(scheduler.submit("k", rows(3, 4), model))
        await let_tasks_enqueue()
        with pytest.raises(Unavailable) as caught:
            await asyncio.wait_for(scheduler.submit("k", rows(5), model), 5)
        gate.set()
        results = await asyncio.gather(running, queued)
        await scheduler.close()
        return caught.value, results

    error, (first, second) = run_async(main())
    assert error.message.startswith(QUEUE_FULL)
    assert error.code == "UNAVAILABLE"
    assert_doubled(first, 1, 2)
    assert_doubled(second, 3, 4)
    assert model.sizes == [2, 2]
    assert not model.saw(5)


def test_task_larger_than_max_batch_size_is_invalid():
    model = Model()

    async def main():
        scheduler = BatchScheduler(params(max_batch_size=8))
        with pytest.raises(InvalidArgument) as caught:
            await scheduler.submit("k", rows(*range(9)), model)
        await scheduler.close()
        return caught.value

    error = run_async(main())
    assert error.message == "Task size 9 is larger than maximum input batch size 8"
    assert model.batches == []


def test_large_batch_splitting_splits_and_reassembles_in_order():
    model = Model()

    async def main():
        scheduler = BatchScheduler(
            params(
                max_batch_size=10,
                enable_large_batch_splitting=True,
                max_execution_batch_size=4,
                batch_timeout_micros=20_000,
            )
        )
        small, large = await asyncio.gather(
            scheduler.submit("k", rows(0, 1, 2), model),
            scheduler.submit("k", rows(*range(3, 9)), model),
        )
        with pytest.raises(InvalidArgument, match="Task size 11 is larger"):
            await scheduler.submit("k", rows(*range(11)), model)
        await scheduler.close()
        return small, large

    small, large = run_async(main())
    # The 6-row task fills the open batch's last slot, then a batch of 4, then 1.
    assert model.sizes == [4, 4, 1]
    assert_doubled(small, 0, 1, 2)
    assert_doubled(large, *range(3, 9))


def test_task_past_its_deadline_while_queued_is_not_run():
    gate = threading.Event()
    model = Model(gate)

    async def main():
        scheduler = BatchScheduler(params(max_batch_size=8, batch_timeout_micros=0))
        running = asyncio.create_task(scheduler.submit("k", rows(1), model))
        await wait_started(model)
        late = asyncio.create_task(
            scheduler.submit("k", rows(99), model, deadline=time.monotonic() + 0.05)
        )
        on_time = asyncio.create_task(scheduler.submit("k", rows(7), model))
        with pytest.raises(DeadlineExceeded) as caught:
            await late  # fails while the only batch thread is still busy
        gate.set()
        results = await asyncio.gather(running, on_time)
        expired = scheduler.submit("k", rows(98), model, deadline=time.monotonic() - 1)
        with pytest.raises(DeadlineExceeded):
            await asyncio.gather(expired, scheduler.submit("k", rows(8), model))
        await scheduler.close()
        return caught.value, results

    error, (first, later) = run_async(main())
    assert "waiting in batching queue" in error.message
    assert_doubled(first, 1)
    assert_doubled(later, 7)
    assert not model.saw(99)
    assert not model.saw(98)


def test_run_error_reaches_every_task_of_the_batch_and_the_next_batch_works():
    model = Model(fail_first=ValueError("boom"))

    async def main():
        scheduler = BatchScheduler(params(max_batch_size=2))
        failed = await asyncio.gather(
            scheduler.submit("k", rows(1), model),
            scheduler.submit("k", rows(2), model),
            return_exceptions=True,
        )
        model.fail_first = InvalidArgument("bad input")
        rejected = await asyncio.gather(
            scheduler.submit("k", rows(3), model),
            scheduler.submit("k", rows(4), model),
            return_exceptions=True,
        )
        recovered = await asyncio.gather(
            scheduler.submit("k", rows(5), model), scheduler.submit("k", rows(6), model)
        )
        await scheduler.close()
        return failed, rejected, recovered

    failed, rejected, recovered = run_async(main())
    assert all(isinstance(e, Internal) and "boom" in e.message for e in failed)
    assert all(isinstance(e, InvalidArgument) and e.message == "bad input" for e in rejected)
    assert rejected[0] is not rejected[1]  # each caller gets its own exception object
    assert_doubled(recovered[0], 5)
    assert_doubled(recovered[1], 6)
    assert model.sizes == [2, 2, 2]


def test_a_batch_the_executor_refuses_fails_its_tasks_and_the_scheduler_still_closes():
    model = Model()
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    executor.shutdown()  # submit() now raises RuntimeError

    async def main():
        scheduler = BatchScheduler(params(max_batch_size=2), executor=executor)
        outcome = await asyncio.gather(
            scheduler.submit("k", rows(1), model),
            scheduler.submit("k", rows(2), model),
            return_exceptions=True,
        )
        await asyncio.wait_for(scheduler.close(), 5)
        return outcome

    outcome = run_async(main())
    assert all(isinstance(e, Internal) and "shutdown" in e.message for e in outcome)
    assert model.sizes == []


def test_outputs_without_the_batch_rows_are_internal():
    async def main():
        scheduler = BatchScheduler(params(max_batch_size=2))
        outcome = await asyncio.gather(
            scheduler.submit("k", rows(1), lambda inputs: {"y": np.zeros((1, 1))}),
            scheduler.submit("k", rows(2), lambda inputs: {"y": np.zeros((1, 1))}),
            return_exceptions=True,
        )
        await scheduler.close()
        return outcome

    outcome = run_async(main())
    assert all(isinstance(e, Internal) and "0th dimension" in e.message for e in outcome)


def test_close_runs_queued_tasks_without_waiting_for_the_timeout():
    model = Model()

    async def main():
        scheduler = BatchScheduler(params(max_batch_size=100))
        tasks = [asyncio.create_task(scheduler.submit("k", rows(i), model)) for i in range(5)]
        await let_tasks_enqueue()
        # The 10 s batch timeout would outlast this wait if close() did not flush the queue.
        await asyncio.wait_for(scheduler.close(), 5)
        assert all(task.done() for task in tasks)
        with pytest.raises(Unavailable):
            await scheduler.submit("k", rows(9), model)
        return [task.result() for task in tasks]

    results = run_async(main())
    assert model.sizes == [5]
    for i, result in enumerate(results):
        assert_doubled(result, i)


def test_num_batch_threads_bounds_concurrent_runs_across_queues():
    gate = threading.Event()
    model = Model(gate)
    # A larger pool than allowed: the scheduler, not the pool, must hold the bound.
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=8)

    async def main():
        scheduler = BatchScheduler(params(max_batch_size=1, num_batch_threads=2), executor=executor)
        tasks = [
            asyncio.create_task(scheduler.submit(f"key{i % 3}", rows(i), model)) for i in range(6)
        ]
        for _ in range(500):
            if model.active == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # room for a third run to start if the bound were broken
        active_while_blocked = model.active
        gate.set()
        results = await asyncio.gather(*tasks)
        await scheduler.close()
        return active_while_blocked, results

    try:
        active_while_blocked, results = run_async(main())
    finally:
        executor.shutdown(wait=True)
    assert active_while_blocked == 2
    assert model.max_active == 2
    assert model.sizes == [1] * 6
    for i, result in enumerate(results):
        assert_doubled(result, i)


def test_cancelled_task_is_dropped_from_the_queue():
    gate = threading.Event()
    model = Model(gate)

    async def main():
        # One waiting batch of 2 rows at most: the cancelled row's slot must become free.
        scheduler = BatchScheduler(params(max_batch_size=2, max_enqueued_batches=1))
        running = asyncio.create_task(scheduler.submit("k", rows(1, 2), model))
        await wait_started(model)
        abandoned = asyncio.create_task(scheduler.submit("k", rows(99), model))
        kept = asyncio.create_task(scheduler.submit("k", rows(7), model))
        await let_tasks_enqueue()
        abandoned.cancel()
        await let_tasks_enqueue()
        newcomer = asyncio.create_task(scheduler.submit("k", rows(8), model))
        await let_tasks_enqueue()
        gate.set()
        results = await asyncio.gather(running, kept, newcomer)
        await scheduler.close()
        return abandoned, results

    abandoned, (first, later, newcomer) = run_async(main())
    assert abandoned.cancelled()
    assert not model.saw(99)
    assert [batch.ravel().tolist() for batch in model.batches] == [[1, 2], [7, 8]]
    assert_doubled(first, 1, 2)
    assert_doubled(later, 7)
    assert_doubled(newcomer, 8)


def test_variable_length_inputs_are_padded_only_when_enabled():
    seen: list[np.ndarray] = []

    def echo(inputs):
        seen.append(inputs["x"])
        return {"y": inputs["x"]}

    async def submit_both(pad: bool):
        scheduler = BatchScheduler(params(max_batch_size=2, pad_variable_length_inputs=pad))
        outcome = await asyncio.gather(
            scheduler.submit("k", {"x": np.array([[1, 2]])}, echo),
            scheduler.submit("k", {"x": np.array([[3, 4, 5]])}, echo),
            return_exceptions=True,
        )
        await scheduler.close()
        return outcome

    short, long = run_async(submit_both(True))
    # Like TF Serving: grown with the tensor's own first element; outputs stay padded.
    np.testing.assert_array_equal(short["y"], [[1, 2, 1]])
    np.testing.assert_array_equal(long["y"], [[3, 4, 5]])
    refused = run_async(submit_both(False))
    assert all(isinstance(e, FailedPrecondition) for e in refused)
    assert len(seen) == 1


def test_inputs_with_different_row_counts_are_invalid():
    async def main():
        scheduler = BatchScheduler(params())
        with pytest.raises(InvalidArgument, match="equal 0th-dimension size"):
            await scheduler.submit(
                "k", {"a": np.zeros((2, 1)), "b": np.zeros((3, 1))}, lambda inputs: inputs
            )
        await scheduler.close()

    run_async(main())


# --- nobody else can join: the open batch runs at once --------------------------------------


class ThreadRecorder(Model):
    def __init__(self):
        super().__init__()
        self.threads: list[threading.Thread] = []

    def __call__(self, inputs):
        self.threads.append(threading.current_thread())
        return super().__call__(inputs)


def test_a_lone_request_runs_at_once_on_the_loops_thread_instead_of_waiting_the_timeout():
    """With `outstanding` telling that the server holds only this request, no other task can
    join before the (here 10 s) timeout: the batch runs at once, without a thread hand-off."""
    model = ThreadRecorder()

    async def main():
        scheduler = BatchScheduler(params(max_batch_size=8), outstanding=lambda: 1)
        result = await asyncio.wait_for(scheduler.submit("k", rows(3), model), 5)
        await scheduler.close()
        return result

    assert_doubled(run_async(main()), 3)
    assert model.sizes == [1]
    assert model.threads == [threading.main_thread()]


def test_a_lone_request_with_nothing_else_ready_completes_without_yielding_to_the_loop():
    """The yield that lets requests read in the same pass reach the queue first is skipped when
    no other callback is ready: the loop would resume this task before anything else, so the
    pass would change nothing and only cost the lone request its time (the burst test in
    test_inference_threads.py covers the yield that is kept)."""
    model = Model()

    async def main():
        scheduler = BatchScheduler(params(max_batch_size=8), outstanding=lambda: 1)
        step = scheduler.submit("k", rows(3), model)
        with pytest.raises(StopIteration) as finished:
            step.send(None)  # one step: it must finish, not suspend
        await scheduler.close()
        return finished.value.value

    assert_doubled(run_async(main()), 3)
    assert model.sizes == [1]


def test_a_request_others_may_join_still_waits_for_them():
    """Two requests in the server, one queued: the batch waits (for the timeout or the other
    task); once the other is queued too, nobody else can join and both run in one batch."""
    model = ThreadRecorder()
    inside = {"count": 2}

    async def main():
        scheduler = BatchScheduler(params(max_batch_size=8), outstanding=lambda: inside["count"])
        first = asyncio.create_task(scheduler.submit("k", rows(1), model))
        await asyncio.sleep(0.2)
        assert not first.done() and model.sizes == []
        second = asyncio.create_task(scheduler.submit("k", rows(2), model))
        results = await asyncio.wait_for(asyncio.gather(first, second), 5)
        await scheduler.close()
        return results

    first, second = run_async(main())
    assert_doubled(first, 1)
    assert_doubled(second, 2)
    assert model.sizes == [2]
    # A batch of several tasks means others are arriving: it runs on a batch thread, not on
    # the loop's, which would hold back every request that arrives meanwhile.
    assert model.threads != [threading.main_thread()]


def test_a_lone_request_is_counted_as_a_batch_of_one_task():
    """The lone request skips the queue, but the batch metrics still see its batch."""
    model = ThreadRecorder()
    seen = []

    async def main():
        scheduler = BatchScheduler(
            params(max_batch_size=8, allowed_batch_sizes=(4, 8)),
            outstanding=lambda: 1,
            on_batch=seen.append,
        )
        result = await scheduler.submit("k", rows(3), model)
        await asyncio.sleep(0)  # the stats are reported once the answer is on its way
        await scheduler.close()
        return result

    assert_doubled(run_async(main()), 3)
    assert model.threads == [threading.main_thread()]
    (stats,) = seen
    assert (stats.key, stats.size, stats.padded_size, stats.num_tasks) == ("k", 1, 4, 1)
    assert list(stats.queue_delay_seconds) == [0.0]


def _lone(run, *, max_batch_size=8, seen=None, **options):
    """Submit one 2-row task to a scheduler that knows it is alone; its outcome or error."""

    async def main():
        scheduler = BatchScheduler(
            params(max_batch_size=max_batch_size, **options),
            outstanding=lambda: 1,
            on_batch=None if seen is None else seen.append,
        )
        try:
            return await scheduler.submit("k", rows(1, 2), run)
        except ServingError as error:
            return error
        finally:
            await scheduler.close()

    return run_async(main())


def test_a_lone_task_that_fills_its_batch_is_counted_with_its_rows_and_run_time():
    """No allowed size above it, nothing to pad: the task goes straight to `run` (nothing to
    merge or cut), and is still counted as a batch of one task that did not queue."""
    model, seen = Model(), []
    result = _lone(model, seen=seen)
    assert result["y"].tolist() == [[2.0], [4.0]]
    assert model.sizes == [2]
    (stats,) = seen
    assert (stats.key, stats.size, stats.padded_size, stats.num_tasks) == ("k", 2, 2, 1)
    assert list(stats.queue_delay_seconds) == [0.0]
    assert stats.run_seconds > 0


def test_a_lone_task_whose_run_fails_gets_the_error_and_is_still_counted():
    seen = []
    error = _lone(Model(fail_first=InvalidArgument("bad pixels")), seen=seen)
    assert isinstance(error, InvalidArgument) and error.message == "bad pixels"
    assert [(stats.size, stats.padded_size) for stats in seen] == [(2, 2)]


@pytest.mark.parametrize(
    "outputs",
    [{"y": np.zeros((1, 1))}, {"y": np.float32(3.0)}, [np.zeros((2, 1))]],
    ids=["too few rows", "a scalar", "not a mapping"],
)
def test_a_lone_tasks_outputs_get_the_batch_output_checks(outputs):
    """The shortcut past merge and split keeps split's checks: outputs must be a mapping of
    tensors with the task's rows along dimension 0, else INTERNAL (as for merged batches)."""
    error = _lone(lambda inputs: outputs)
    assert isinstance(error, Internal), error
    assert error.message.startswith(("Batched output tensor 'y'", "The batched run returned"))


def test_a_lone_tasks_outputs_that_are_not_arrays_come_back_as_arrays():
    result = _lone(lambda inputs: {"y": [[1.0], [2.0]]})
    assert isinstance(result["y"], np.ndarray) and result["y"].shape == (2, 1)
