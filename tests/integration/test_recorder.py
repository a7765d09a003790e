"""``tracking.recorder.Recorder``: a run's task runs start and record their attempts in shared
database transactions, each request keeping its own answer (attempt, stage, ``LeaseLost`` or
the database error of the transaction it was in)."""

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


def _counting(tracker: Tracker, delay: float = 0.0) -> tuple[list[int], list[int]]:
    """Wrap ``tracker.record_attempts`` (one database transaction) to count its calls and
    the starts and results in each, and slow it down, so that concurrent requests queue
    behind a write in progress."""
    starts: list[int] = []
    results: list[int] = []
    method = tracker.record_attempts

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if args[0]:
            starts.append(len(args[0]))
        if args[1]:
            results.append(len(args[1]))
        time.sleep(delay)
        return method(*args, **kwargs)

    tracker.record_attempts = wrapped  # type: ignore[method-assign]
    return starts, results


def test_concurrent_starts_and_results_share_transactions_and_are_all_committed(engine):
    tracker = Tracker(engine, processes=[cancellation_process()])
    uuids = _claimed(tracker, 12)
    recorder = Recorder(tracker, owner="run-1", lease_seconds=600)
    start_sizes, result_sizes = _counting(tracker, delay=0.05)

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
    _counting(tracker, delay=0.05)

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


def test_a_groups_starts_and_results_share_one_transaction_and_fail_together(engine):
    tracker = Tracker(engine, processes=[cancellation_process()])
    uuids = _claimed(tracker, 3)
    tracker.start_attempts("A", "validate", [uuids[2]], owner="run-1")
    recorder = Recorder(tracker, owner="run-1", lease_seconds=600)
    gate, calls = threading.Event(), []
    record_attempts = tracker.record_attempts

    def failing_second(*args: Any, **kwargs: Any) -> Any:
        calls.append(([s.uuid for s in args[0]], [c.uuid for c in args[1]]))
        if len(calls) == 1:
            gate.wait(10)  # hold the first group until two more requests queue
        elif len(calls) == 2:
            raise ConnectionError("database went away")
        return record_attempts(*args, **kwargs)

    tracker.record_attempts = failing_second  # type: ignore[method-assign]
    first: list[Any] = []
    held = threading.Thread(target=lambda: first.append(
        recorder.start(uuids[0], "A", "validate")))
    held.start()
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
    held.join(10), queued.join(10)

    # The first group committed and keeps its answer; the second held a start and a result
    # in one transaction, which failed: both requests are told so, and nothing of it stays.
    assert first == [1]
    assert calls[1] == ([uuids[1]], [uuids[2]])
    assert all(isinstance(a, ConnectionError) for a in answers), answers
    stages = tracker.get_stages(uuids, "A", "validate")
    assert [s.attempt for s in stages] == [1, 0, 1]
    assert stages[2].state == StageState.IN_PROGRESS  # its result was not recorded
    # Later groups are written.
    assert recorder.start(uuids[1], "A", "validate") == 1
    assert recorder.complete(uuids[2], "A", "validate", ExecutionResult(0)).state == (
        StageState.COMPLETED)


@pytest.mark.parametrize("requests", [1, 5])
def test_a_lone_request_is_written_at_once_by_its_own_thread(engine, requests):
    tracker = Tracker(engine, processes=[cancellation_process()])
    uuids = _claimed(tracker, requests)
    recorder = Recorder(tracker, owner="run-1", lease_seconds=600)
    sizes, _ = _counting(tracker)
    assert [recorder.start(u, "A", "validate") for u in uuids] == [1] * requests
    assert sizes == [1] * requests  # one after the other: nothing waits for company


class _Sleeps:
    """Stands in for the ``time`` module of ``tracking.recorder``: records its sleeps."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.calls.append(seconds)
        time.sleep(seconds)


def test_a_writer_waits_for_company_only_while_task_runs_are_busy_side_by_side(
    engine, monkeypatch
):
    import tracking.recorder as recorder_module

    sleeps = _Sleeps()
    monkeypatch.setattr(recorder_module, "time", sleeps)
    tracker = Tracker(engine, processes=[cancellation_process()])
    uuids = _claimed(tracker, 10)
    recorder = Recorder(tracker, owner="run-1", lease_seconds=600)

    # One after the other (a sequential run): groups of one, nobody waits.
    assert [recorder.start(u, "A", "validate") for u in uuids[:2]] == [1, 1]
    assert sleeps.calls == []

    # Side by side: groups of several; the writer after such a group waits for company.
    starts, _ = _counting(tracker, delay=0.2)  # the others queue behind the first write
    assert _in_threads([lambda u=u: recorder.start(u, "A", "validate")
                        for u in uuids[2:8]]) == [1] * 6
    assert max(starts) > 1
    sleeps.calls.clear()
    assert recorder.start(uuids[8], "A", "validate") == 1  # alone, after a group of several
    assert sleeps.calls == [recorder_module.LINGER_SECONDS]
    assert recorder.start(uuids[9], "A", "validate") == 1  # alone after alone: no wait
    assert sleeps.calls == [recorder_module.LINGER_SECONDS]
