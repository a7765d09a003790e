"""``tracking.recorder.Recorder``: a run's task runs start and record their attempts in shared
database transactions, each request keeping its own answer (attempt, stage, ``LeaseLost`` or
the database error of its own transaction)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import cancellation_process
from tracking import StageState, Tracker, TxState
from tracking.errors import LeaseLost
from tracking.outcomes import ExecutionResult
from tracking.recorder import Recorder

P = "CANCELLATION"


def _claimed(tracker: Tracker, n: int, owner: str = "run-1") -> list[str]:
    tracker.start_many(P, [{"request_id": f"R{i}"} for i in range(n)])
    return [s.uuid for s in tracker.claim(P, "A", owner=owner, limit=n)]


def _in_threads(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run each call in a thread of its own, all at once; each one's answer or exception."""
    answers: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            answers[i] = calls[i]()
        except Exception as exc:
            answers[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return answers


def _counting(tracker: Tracker, name: str, delay: float = 0.0) -> list[int]:
    """Wrap ``tracker.<name>`` to count its calls (and the requests in each) and slow it
    down, so that concurrent requests queue behind a write in progress."""
    sizes: list[int] = []
    method = getattr(tracker, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        batch = args[2] if name == "start_attempts" else args[0]
        sizes.append(len(batch))
        time.sleep(delay)
        return method(*args, **kwargs)

    setattr(tracker, name, wrapped)
    return sizes


def test_concurrent_starts_and_results_share_transactions_and_are_all_committed(engine):
    tracker = Tracker(engine, processes=[cancellation_process()])
    uuids = _claimed(tracker, 12)
    recorder = Recorder(tracker, owner="run-1", lease_seconds=600)
    start_sizes = _counting(tracker, "start_attempts", delay=0.05)
    result_sizes = _counting(tracker, "complete_many", delay=0.05)

    attempts = _in_threads([lambda u=u: recorder.start(u, "A", "validate") for u in uuids])
    assert attempts == [1] * 12
    assert sum(start_sizes) == 12 and len(start_sizes) < 12  # grouped, none left out

    stages = _in_threads([
        lambda u=u: recorder.complete(u, "A", "validate", ExecutionResult(0), task_run_id=u)
        for u in uuids
    ])
    assert [(s.uuid, s.state) for s in stages] == [(u, StageState.COMPLETED) for u in uuids]
    assert sum(result_sizes) == 12 and len(result_sizes) < 12
    for uuid in uuids:  # committed: the next platform's stage is runnable
        assert tracker.get_transaction(uuid).state == TxState.IN_PROGRESS
        assert tracker.get_stages([uuid], "B", "process")[0].state == StageState.PENDING


def test_a_stage_the_run_lost_raises_lease_lost_for_its_request_alone(engine):
    tracker = Tracker(engine, processes=[cancellation_process()])
    uuids = _claimed(tracker, 4)
    tracker.cancel(uuids[1], reason="operator")  # the reservation is gone
    recorder = Recorder(tracker, owner="run-1", lease_seconds=600)
    _counting(tracker, "start_attempts", delay=0.05)

    answers = _in_threads([lambda u=u: recorder.start(u, "A", "validate") for u in uuids])
    assert answers[0] == answers[2] == answers[3] == 1
    assert isinstance(answers[1], LeaseLost) and "CANCELLED" in str(answers[1])

    # A result for a stage another run now holds is not recorded; the others are.
    other = Recorder(tracker, owner="run-2", lease_seconds=600)
    answers = _in_threads([
        lambda: other.complete(uuids[0], "A", "validate", ExecutionResult(0)),
        lambda: recorder.complete(uuids[2], "A", "validate", ExecutionResult(0)),
    ])
    assert isinstance(answers[0], LeaseLost)
    assert answers[1].state == StageState.COMPLETED
    assert tracker.get_stages([uuids[0]], "A", "validate")[0].state == StageState.IN_PROGRESS


def test_a_failed_transaction_answers_its_own_requests_and_the_recorder_goes_on(engine):
    tracker = Tracker(engine, processes=[cancellation_process()])
    uuids = _claimed(tracker, 3)
    tracker.start_attempts("A", "validate", [uuids[2]], owner="run-1")
    recorder = Recorder(tracker, owner="run-1", lease_seconds=600)
    gate, calls = threading.Event(), []
    start_attempts = tracker.start_attempts

    def failing_second(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[2])
        if len(calls) == 1:
            gate.wait(10)  # hold the first group until two more requests queue
        elif len(calls) == 2:
            raise ConnectionError("database went away")
        return start_attempts(*args, **kwargs)

    tracker.start_attempts = failing_second  # type: ignore[method-assign]
    first = threading.Thread(target=lambda: recorder.start(uuids[0], "A", "validate"))
    first.start()
    while not calls:
        time.sleep(0.01)
    answers: list[Any] = []
    queued = threading.Thread(target=lambda: answers.extend(_in_threads([
        lambda: recorder.start(uuids[1], "A", "validate"),
        lambda: recorder.complete(uuids[2], "A", "validate", ExecutionResult(0)),
    ])))
    queued.start()
    while len(recorder._queued) < 2:  # both wait behind the held write
        time.sleep(0.01)
    gate.set()
    first.join(10), queued.join(10)

    # One group held a start and a result: the start's transaction failed, the result's
    # committed, and each request was told its own outcome.
    assert isinstance(answers[0], ConnectionError)
    assert answers[1].state == StageState.COMPLETED
    assert [s.attempt for s in tracker.get_stages(uuids, "A", "validate")] == [1, 0, 1]
    assert recorder.start(uuids[1], "A", "validate") == 1  # later groups are written


@pytest.mark.parametrize("requests", [1, 5])
def test_a_lone_request_is_written_at_once_by_its_own_thread(engine, requests):
    tracker = Tracker(engine, processes=[cancellation_process()])
    uuids = _claimed(tracker, requests)
    recorder = Recorder(tracker, owner="run-1", lease_seconds=600)
    sizes = _counting(tracker, "start_attempts")
    assert [recorder.start(u, "A", "validate") for u in uuids] == [1] * requests
    assert sizes == [1] * requests  # one after the other: nothing waits for company
