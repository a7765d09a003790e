"""How far ahead a stage-granularity run reserves: what its task runs will start within
about a second, between one round and ``MAX_ROUNDS_AHEAD``."""

from __future__ import annotations

from tracking.catalog import Platform
from tracking.pipeline import MAX_ROUNDS_AHEAD, _Step


def _step() -> _Step:
    return _Step(0, Platform("A", order=1), "main")


def test_a_step_reserves_one_round_ahead_until_it_knows_how_long_its_task_runs_take():
    assert _step().rounds_ahead() == 1


def test_a_slow_platform_gets_one_round_ahead_and_a_fast_one_many():
    slow, fast = _step(), _step()
    for _ in range(5):
        slow.finished(30.0)  # an RPA call of 30 s: no other run should wait for its items
        fast.finished(0.005)
    assert slow.rounds_ahead() == 1
    assert fast.rounds_ahead() == MAX_ROUNDS_AHEAD
    medium = _step()
    medium.finished(0.25)
    assert medium.rounds_ahead() == 4


def test_the_estimate_follows_a_platform_that_slows_down():
    step = _step()
    step.finished(0.01)
    for _ in range(20):
        step.finished(2.0)
    assert step.rounds_ahead() == 1
