"""``Tracker.complete_many``: a batch of results recorded in one database transaction with a
handful of statements, to the same end as one ``complete_stage`` each."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.conftest import cancellation_process
from tests.integration.test_queries import count_statements
from tracking import ExecutionResult, LeaseLost, StageState, Tracker, TxState
from tracking.errors import TransactionNotFound
from tracking.store import Completion, RecordedAttempt

P = "CANCELLATION"
CODES = [0, 0, 7, -1, 0, -3, 0, 5]  # success, business and system errors


PATH = [("A", "validate"), ("B", "process"), ("B", "confirm"), ("C", "main")]


def _claimed(tracker: Tracker, n: int, owner: str = "run-1", at: tuple[str, str] = PATH[0]):
    """``n`` transactions whose stage ``at`` is claimed by ``owner``, its attempt started
    (the stages before it completed)."""
    tracker.start_many(P, [{"request_id": f"M{i}"} for i in range(n)])
    for platform, stage in PATH[: PATH.index(at)]:
        for s in tracker.claim(P, platform, stage, owner="setup", limit=n):
            tracker.complete_stage(s.uuid, platform, 0, stage=stage, owner="setup")
    stages = tracker.claim(P, *at, owner=owner, limit=n)
    for s in stages:
        tracker.start_attempt(s.uuid, *at, owner=owner)
    return stages


def _snapshot(tracker: Tracker) -> list[tuple]:
    with tracker.engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT p.business_key, p.state, p.updated_at, p.finished_at, s.seq, s.state, "
            "s.attempt, s.error_code, s.next_attempt_at IS NOT NULL, s.updated_at, "
            "s.finished_at FROM tx_process p JOIN tx_stage s ON s.uuid = p.uuid "
            "ORDER BY p.business_key, s.seq")).all()
        events = conn.execute(sa.text(
            "SELECT p.business_key, e.kind, e.attempt, e.outcome, e.to_state, e.tx_state "
            "FROM tx_event e JOIN tx_process p ON p.uuid = e.uuid ORDER BY p.business_key, e.id"
        )).all()
    return [tuple(r) for r in rows] + [tuple(e) for e in events]


@pytest.mark.parametrize("at", PATH, ids=[f"{p}.{s}" for p, s in PATH])
def test_complete_many_ends_as_one_complete_stage_each(engine, clock, at):
    """On each stage: the first (one attempt allowed), one that unlocks the next stage of
    its platform and whose rejection cancels two stages, the last (unlimited attempts)."""
    one = Tracker(engine, processes=[cancellation_process()], clock=clock)
    start = clock.now
    stages = _claimed(one, len(CODES), at=at)
    clock.advance(60)  # the results come later than the intake: updated_at must follow
    for s, code in zip(stages, CODES, strict=True):
        one.complete_stage(s.uuid, at[0], code, stage=at[1], owner="run-1")
    singly = _snapshot(one)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM tx_stage")
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("TRUNCATE tx_event, tx_process CASCADE")
        else:
            conn.exec_driver_sql("DROP TRIGGER tx_event_no_delete")
            conn.exec_driver_sql("DELETE FROM tx_event")
            conn.exec_driver_sql("DELETE FROM tx_process")
    clock.now = start
    stages = _claimed(one, len(CODES), at=at)
    clock.advance(60)
    done = one.complete_many(
        [Completion(s.uuid, *at, ExecutionResult(c)) for s, c in zip(
            stages, CODES, strict=True)],
        owner="run-1",
    )
    retried = {"A": StageState.EXHAUSTED, "B": StageState.TERMINATED,
               "C": StageState.TERMINATED}[at[0]]
    assert [d.state for d in done] == [
        StageState.COMPLETED, StageState.COMPLETED, StageState.REJECTED, retried,
        StageState.COMPLETED, retried, StageState.COMPLETED, StageState.REJECTED]
    assert _snapshot(one) == singly


@pytest.mark.parametrize("n", [5, 200])
def test_complete_many_costs_a_handful_of_statements_whatever_the_batch(tracker, n):
    stages = _claimed(tracker, n)
    with count_statements(tracker.engine) as seen:
        tracker.complete_many([Completion(s.uuid, "A", "validate", ExecutionResult(0))
                               for s in stages], owner="run-1")
    # lock stages, lock transactions, read the recorded; write stages, next stages,
    # transactions (their state stays here), events
    assert len(seen) <= 7, seen
    tx = tracker.get_transaction(stages[-1].uuid)
    assert tx.state == TxState.IN_PROGRESS
    assert tx.stages[1].next_attempt_at is not None  # B.process is runnable now


def test_a_transaction_platform_or_stage_that_does_not_exist_is_named(tracker):
    (s,) = _claimed(tracker, 1)
    for wrong, error, match in [
        (Completion("no-such-uuid", "A", "validate", 0), TransactionNotFound, "no-such-uuid"),
        (Completion(s.uuid, "Z", "validate", 0), ValueError, "unknown platform 'Z'"),
        (Completion(s.uuid, "A", "nope", 0), ValueError, "unknown stage 'nope'"),
    ]:
        with pytest.raises(error, match=match):
            tracker.complete_many([wrong], owner="run-1")
    # Nothing was written by the refused batches; a one-stage platform needs no stage name.
    (done,) = tracker.complete_many([Completion(s.uuid, "A", None, 0)], owner="run-1")
    assert done.state == StageState.COMPLETED and done.attempt == 1


def test_a_stage_claimed_by_another_run_is_not_written(tracker, clock):
    stages = _claimed(tracker, 3)
    for s in (stages[0], stages[2]):
        tracker.extend_lease(s.uuid, "A", owner="run-1", seconds=7200)
    clock.advance(1801)  # the middle one's lease expired: another run records it as lost
    assert tracker.recover_expired_leases(P) == 1
    done = tracker.complete_many(
        [Completion(s.uuid, "A", "validate", ExecutionResult(0)) for s in stages],
        owner="run-1",
    )
    assert isinstance(done[1], LeaseLost)
    assert [done[0].state, done[2].state] == [StageState.COMPLETED, StageState.COMPLETED]
    lost = tracker.get_transaction(stages[1].uuid)
    assert lost.state == TxState.EXHAUSTED and lost.events[-1].kind == "LEASE_EXPIRED"
    with pytest.raises(ValueError, match="one result per transaction"):
        tracker.complete_many([Completion(stages[0].uuid, "A", "validate", 0)] * 2,
                              owner="run-1")


@pytest.mark.parametrize("entries", [
    [("uuid", "A", "validate", 0)],  # a tuple, not a Completion
    [{"uuid": "u", "platform": "A", "stage": "validate", "result": 0}],
    "not a list",
])
@pytest.mark.parametrize("method", ["complete_many", "complete_batch"])
def test_entries_that_are_not_completions_are_refused_with_a_clear_error(
        tracker, entries, method):
    """Before: an AttributeError (``'tuple' object has no attribute 'result'``). The error
    names the method called."""
    with pytest.raises(TypeError, match=f"{method} takes .*Completion entries"):
        getattr(tracker, method)(entries, owner="run-1")
    with pytest.raises(ValueError, match="owner"):
        getattr(tracker, method)([], owner="")


def test_complete_batch_records_the_same_and_answers_each_attempt_briefly(engine, clock):
    """A resume run's batch (``complete_batch``) writes what ``complete_many`` writes; its
    answer is each attempt's outcome as a ``RecordedAttempt`` (or a ``LeaseLost``)."""
    one = Tracker(engine, processes=[cancellation_process()], clock=clock)
    stages = _claimed(one, len(CODES))
    clock.advance(60)
    lost = stages[1]
    for s in stages:
        if s is not lost:
            one.extend_lease(s.uuid, "A", owner="run-1", seconds=7200)
    clock.advance(1801)
    assert one.recover_expired_leases(P) == 1  # another run records lost's attempt as lost
    done = one.complete_batch(
        [Completion(s.uuid, "A", "validate", ExecutionResult(c, f"code {c}" if c else None))
         for s, c in zip(stages, CODES, strict=True)],
        owner="run-1",
    )
    assert isinstance(done[1], LeaseLost)
    assert all(isinstance(d, RecordedAttempt) for i, d in enumerate(done) if i != 1)
    assert [(d.uuid, d.platform, d.stage) for d in done if not isinstance(d, LeaseLost)] == [
        (s.uuid, "A", "validate") for s in stages if s is not lost]
    recorded = one.get_stages([s.uuid for s in stages], "A", "validate")
    assert [(d.state, d.attempt, d.error_code, d.error_description)
            for d in done if not isinstance(d, LeaseLost)] == [
        (r.state, r.attempt, r.error_code, r.error_description)
        for r in recorded if r.uuid != lost.uuid]
    assert [d.state for d in done if not isinstance(d, LeaseLost)] == [
        StageState.COMPLETED, StageState.REJECTED, StageState.EXHAUSTED, StageState.COMPLETED,
        StageState.EXHAUSTED, StageState.COMPLETED, StageState.REJECTED]
    assert one.complete_batch([], owner="run-1") == []
