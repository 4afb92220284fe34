"""Training under faults on two workers (issue #19): real `convstack train` processes under
MultiWorkerMirroredStrategy on loopback (TF_CONFIG). An absent peer ends a worker with one line
and exit 1 after --cluster-wait-seconds, a SIGTERM while it waits is still exit 75, a lost peer
is one line naming it, and a run SIGTERMed in every phase ends, after its reruns, exactly as an
uninterrupted one. Apart from tests/trainer/test_faults.py so that pytest-xdist's two workers
(--dist loadscope) share the trainer's fault tests."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from convstack.trainer import crash_points
from tests.loopback import free_ports
from tests.trainer.fault_helpers import (
    STEPS_PER_EPOCH,
    STOP_LINE,
    WEIGHT_ATOL,
    error_lines,
    final_weights,
    history_epochs,
    max_weight_difference,
    model_dir_entries,
    start_worker,
)

pytestmark = pytest.mark.slow


def loopback_cluster() -> list[str]:
    return [f"127.0.0.1:{port}" for port in free_ports(2)]


class Watched:
    """A started worker whose stderr lines are read as they come, each with its arrival time."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append((time.monotonic(), line))

    def first(self, text: str, bound: float = 300) -> float:
        """When a line holding `text` arrived (waits for it; `bound` is a no-hang guard)."""
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            found = [at for at, line in self.lines if text in line]
            if found:
                return found[0]
            assert self.process.poll() is None or self._reader.is_alive(), self.stderr
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r}:\n{self.stderr[-3000:]}")

    def finish(self, bound: float = 300) -> tuple[int, float]:
        """The exit status and when it came."""
        self.process.wait(timeout=bound)
        ended = time.monotonic()
        self._reader.join(timeout=bound)
        return self.process.returncode, ended

    @property
    def stderr(self) -> str:
        return "".join(line for _, line in self.lines)


# --- (4) an absent peer: one line, exit 1, bounded; a SIGTERM meanwhile is still 75 -----------

WAIT = 5  # --cluster-wait-seconds
JOINING = "joining the cluster: waiting for"


def test_an_absent_peer_ends_a_worker_with_one_line_and_a_sigterm_while_waiting_with_75(
    tmp_path,
):
    args = ("--epochs", "1", "--cluster-wait-seconds", str(WAIT))
    no_chief, no_worker, signalled = loopback_cluster(), loopback_cluster(), loopback_cluster()
    runs = {
        "chief absent": (Watched(start_worker(tmp_path / "a", no_chief, 1, *args)), no_chief[0]),
        "worker absent": (Watched(start_worker(tmp_path / "b", no_worker, 0, *args)), no_worker[1]),
        "SIGTERM while waiting": (
            Watched(start_worker(tmp_path / "c", signalled, 1, *args)), signalled[0]
        ),
    }  # fmt: skip
    watched = runs["SIGTERM while waiting"][0]
    sent = watched.first(JOINING) + 1.0
    time.sleep(max(0.0, sent - time.monotonic()))
    watched.process.send_signal(signal.SIGTERM)

    for name, (run, absent) in runs.items():
        status, ended = run.finish()
        joining = run.first(JOINING)
        stderr = run.stderr
        (line,) = error_lines(stderr)
        # TensorFlow's own report of the failed join is neither a traceback nor a stack dump.
        assert "Traceback" not in stderr and "most recent call first" not in stderr, stderr
        if name == "SIGTERM while waiting":
            assert status == 75, stderr[-3000:]
            assert "preempted during start-up" in line and STOP_LINE.search(line), line
            print(f"{name}: exit 75 {ended - sent:.1f}s after the SIGTERM")
        else:
            assert status == 1, stderr[-3000:]
            task = f"worker:{0 if name == 'chief absent' else 1}"
            assert f"{JOINING} {task} at {absent}" in stderr
            assert (
                f"the cluster did not form within --cluster-wait-seconds {WAIT}: no answer "
                f"from {task} at {absent}"
            ) in line, line
            said = run.first("the cluster did not form")
            print(f"{name}: one line {said - joining:.1f}s and exit 1 {ended - joining:.1f}s "
                  f"after it began to wait ({WAIT}s)")  # fmt: skip


def test_losing_a_worker_ends_the_other_with_one_line_naming_it(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    args = ("--epochs", "30", "--checkpoint-every", "5", "--no-export")
    chief = start_worker(tmp_path, workers, 0, *args)
    other = start_worker(tmp_path, workers, 1, *args)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("ckpt-*.index")) and time.monotonic() < deadline:
        assert chief.poll() is None and other.poll() is None, chief.communicate()[1][-3000:]
        time.sleep(0.2)
    killed_at = time.monotonic()
    other.kill()
    other.wait()
    _, stderr = chief.communicate(timeout=300)  # a no-hang bound
    detected = time.monotonic() - killed_at

    assert chief.returncode == 1, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert "lost contact with worker:1" in line, line
    assert "Traceback" not in stderr
    print(f"lost worker: chief exit {chief.returncode} {detected:.1f}s after the kill")


# --- every phase on two workers: 75 each time, and the reruns end as an uninterrupted run ----

ARGS = ("--epochs", "2", "--checkpoint-every", "5")
# (crash point, the workers SIGTERMed there, what their stop line says). A start-up, data,
# evaluation or export point SIGTERMs both (a drained node, a deleted Job); in the loop one
# worker's SIGTERM stops both at the same step, mid-epoch and at the epoch end. (The single-
# worker tests of test_faults.py also stop at "trained", between the loop and the evaluation.)
PHASES = [
    ("started", (0, 1), "preempted during start-up"),
    ("strategy-created", (0, 1), "preempted during start-up"),
    ("data-loaded", (0, 1), "preempted during data loading"),
    ("restored", (0, 1), "preempted during start-up"),
    (crash_points.step_point(7), (0,), "preempted at step 7 "),
    (crash_points.step_point(STEPS_PER_EPOCH), (1,), f"preempted at step {STEPS_PER_EPOCH} "),
    ("evaluated", (0, 1), "preempted during evaluation"),
    ("staging-created", (0, 1), "preempted during export"),
]


def run_pair(root: Path, point: str | None = None, signalled=()) -> list[tuple[int, str]]:
    workers = loopback_cluster()
    started = [
        start_worker(
            root, workers, index, *ARGS,
            crash_at=f"{point}:SIGTERM" if index in signalled else None,
        )
        for index in (0, 1)
    ]  # fmt: skip
    finished = []
    for worker in started:
        _, stderr = worker.communicate(timeout=600)  # a no-hang bound
        finished.append((worker.returncode, stderr))
    return finished


def test_two_workers_sigtermed_in_every_phase_end_as_an_uninterrupted_run(tmp_path):
    for status, stderr in run_pair(tmp_path / "straight"):
        assert status == 0, stderr[-3000:]

    broken = tmp_path / "broken"
    stops = []
    for point, signalled, says in PHASES:
        for index, (status, stderr) in enumerate(run_pair(broken, point, signalled)):
            assert status == 75, (point, index, stderr[-3000:])
            (line,) = error_lines(stderr)
            assert says in line and STOP_LINE.search(line), (point, line)
            if index in signalled:
                stops.append(f"{point} {STOP_LINE.search(line).group(2)}s")
        # Nothing half-made: no staging directory and no version before the last run.
        assert model_dir_entries(broken) == [], point
    for status, stderr in run_pair(broken):
        assert status == 0, stderr[-3000:]

    print("SIGTERM to stop, by phase:", ", ".join(stops))
    assert history_epochs(broken) == [1, 2]
    assert model_dir_entries(broken) == ["1"]
    assert not list((broken / "run").glob(".scratch-*"))
    assert not list((broken / "run" / "checkpoints").glob("*_temp"))
    difference = max_weight_difference(final_weights(broken), final_weights(tmp_path / "straight"))
    print(f"two workers, {len(PHASES)} stops: max weight difference {difference:.3g}")
    assert difference <= WEIGHT_ATOL
