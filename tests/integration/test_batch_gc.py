"""A tracker's batch calls (intake, claims, recording) collect young objects less often while
they work (``tracking.memory.rarer_young_collections``): a batch makes thousands of objects
that the default young collections would walk again and again."""

from __future__ import annotations

import gc
from typing import Any

from tests.conftest import cancellation_process
from tracking import ExecutionResult, Tracker
from tracking.memory import YOUNG_THRESHOLD
from tracking.store import Completion


def _thresholds_at_collections(call) -> list[int]:  # type: ignore[no-untyped-def]
    seen: list[int] = []

    def note(phase: str, info: dict) -> None:  # type: ignore[type-arg]
        if phase == "start" and info["generation"] == 0:
            seen.append(gc.get_threshold()[0])

    gc.callbacks.append(note)
    try:
        call()
    finally:
        gc.callbacks.remove(note)
    return seen


def test_batch_calls_collect_young_objects_less_often_and_put_the_thresholds_back(engine):
    tracker = Tracker(engine, processes=[cancellation_process()])
    original = gc.get_threshold()
    assert original[0] < YOUNG_THRESHOLD
    # What the test builds is built outside the measured calls.
    payloads = [{"request_id": f"G{i}"} for i in range(3000)]
    seen = {"start_many": _thresholds_at_collections(
        lambda: tracker.start_many("CANCELLATION", payloads))}
    reserved: list[Any] = []
    seen["reserve"] = _thresholds_at_collections(lambda: reserved.extend(
        tracker.reserve("CANCELLATION", "A", owner="run-1", limit=3000, start=True)))
    done = [Completion(r.uuid, "A", "validate", ExecutionResult(0)) for r in reserved]
    seen["complete_many"] = _thresholds_at_collections(
        lambda: tracker.complete_many(done, owner="run-1"))
    for call, thresholds in seen.items():
        # At most one young collection at Python's default: the one put off until the
        # block ends (at 700, a call of 3,000 stages made several).
        assert thresholds.count(original[0]) <= 1, (call, thresholds)
    assert gc.get_threshold() == original
    assert len(reserved) == 3000
