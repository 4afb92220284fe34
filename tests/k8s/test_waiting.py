"""How the k8s commands poll (convstack/k8s/waiting.py), on a simulated clock."""

from __future__ import annotations

import logging

from convstack.k8s.waiting import Follow, wait_until


class SimulatedClock:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_polls_until_a_result_logging_each_change_once(caplog):
    caplog.set_level(logging.INFO, logger="convstack.k8s.waiting")
    clock = SimulatedClock()
    answers = iter([(None, "pending"), (None, "pending"), (None, "running"), ("done", "finished")])
    result = wait_until(Follow(poll=2.0, clock=clock, sleep=clock.sleep), lambda: next(answers))
    assert result == ("done", "finished")
    assert clock.sleeps == [2.0, 2.0, 2.0]
    assert [r.getMessage() for r in caplog.records] == ["pending", "running"]


def test_gives_up_after_the_timeout_with_the_last_progress():
    clock = SimulatedClock()
    calls = []

    def check() -> tuple[None, str]:
        calls.append(clock.now)
        return None, f"still at {clock.now:g}"

    follow = Follow(timeout=5.0, poll=2.0, clock=clock, sleep=clock.sleep)
    assert wait_until(follow, check) == (None, "still at 6")
    assert calls == [0.0, 2.0, 4.0, 6.0]
