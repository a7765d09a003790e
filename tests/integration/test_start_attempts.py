"""``Tracker.start_attempts`` (a batch of an idempotent platform starts together) and
``Tracker.unstart`` (what a stopping run did not call is taken back, attempts intact)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa

from tests.conftest import cancellation_process
from tracking import StageState, Tracker, TxState, connect
from tracking.decorator import Claim, TxContext, execute_batch
from tracking.store.sql import STAGE

P = "CANCELLATION"


def _rows(tracker: Tracker) -> list[tuple]:
    with tracker.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            "SELECT p.business_key, p.state, s.state, s.attempt, s.started_at IS NOT NULL "
            "FROM tx_process p JOIN tx_stage s ON s.uuid = p.uuid WHERE s.seq = 1 "
            "ORDER BY p.business_key"))]


def test_start_attempts_starts_what_the_owner_reserved_and_nothing_else(engine, clock):
    tracker = Tracker(engine, processes=[cancellation_process()], clock=clock)
    tracker.start_many(P, [{"request_id": f"S{i}"} for i in range(4)])
    mine = tracker.claim(P, "A", owner="run-1", limit=3)
    other = tracker.claim(P, "A", owner="run-2", limit=1)
    tracker.cancel(mine[2].uuid, reason="operator")
    started = tracker.start_attempts("A", "validate", [s.uuid for s in [*mine, *other]],
                                     owner="run-1")
    assert started == {mine[0].uuid: 1, mine[1].uuid: 1}
    assert _rows(tracker) == [
        ("S0", "IN_PROGRESS", "IN_PROGRESS", 1, True),
        ("S1", "IN_PROGRESS", "IN_PROGRESS", 1, True),
        ("S2", "CANCELLED", "CANCELLED", 0, False),
        ("S3", "PENDING", "IN_PROGRESS", 0, False),  # run-2's reservation, not started
    ]
    # Started once: a second start of the same stages starts nothing.
    assert tracker.start_attempts("A", "validate", [mine[0].uuid], owner="run-1") == {}


def test_unstart_takes_back_the_attempts_and_the_transaction_states(engine, clock):
    tracker = Tracker(engine, processes=[cancellation_process()], clock=clock)
    tracker.start_many(P, [{"request_id": f"U{i}"} for i in range(3)])
    claimed = tracker.claim(P, "A", owner="run-1", limit=3)
    since = tracker.clock()
    tracker.start_attempts("A", "validate", [s.uuid for s in claimed], owner="run-1")
    before = {s.uuid: TxState.PENDING for s in claimed[1:]}
    assert tracker.unstart("A", "validate", before, owner="run-1", since=since) == 2
    assert _rows(tracker) == [
        ("U0", "IN_PROGRESS", "IN_PROGRESS", 1, True),
        ("U1", "PENDING", "IN_PROGRESS", 0, False),
        ("U2", "PENDING", "IN_PROGRESS", 0, False),
    ]
    assert tracker.release(P, owner="run-1") == 2
    assert [r[2:] for r in _rows(tracker)[1:]] == [("PENDING", 0, False)] * 2


def test_a_stopping_batch_calls_nothing_more_and_keeps_the_attempts_of_what_it_did_not_call(
    engine, clock
):
    tracker = Tracker(engine, processes=[cancellation_process()], clock=clock)
    tracker.start_many(P, [{"request_id": f"B{i}"} for i in range(5)])
    claim = Claim(tracker, "run-1", 60)
    contexts = [TxContext.of(s, claim) for s in tracker.claim(P, "A", owner="run-1", limit=5)]
    called: list[str] = []

    def platform(tx: TxContext) -> int:
        called.append(tx.business_key)
        if len(called) == 2:
            claim.stopping.set()  # the run is told to stop during the second call
        return 0

    assert execute_batch(platform, contexts) == 2
    assert called == ["B0", "B1"]
    rows = _rows(tracker)
    assert [r[2:4] for r in rows[:2]] == [("COMPLETED", 1)] * 2
    # The other three are reserved again, attempt uncounted, transaction as claimed.
    assert rows[2:] == [(f"B{i}", "PENDING", "IN_PROGRESS", 0, False) for i in (2, 3, 4)]
    assert not claim.awaiting
    assert tracker.release(P, owner="run-1") == 3
    assert {tracker.get_transaction(c.uuid).stages[0].state for c in contexts[2:]} == {
        StageState.PENDING}


def test_reserve_with_start_starts_the_attempts_with_the_reservation(engine, clock):
    tracker = Tracker(engine, processes=[cancellation_process()], clock=clock)
    tracker.start_many(P, [{"request_id": f"R{i}"} for i in range(3)])
    now = tracker.clock()
    batch = tracker.reserve(P, "A", owner="run-1", limit=2, lease_seconds=90, start=True)
    assert [(r.business_key, r.attempt, r.tx_state, r.started_at) for r in batch] == [
        ("R0", 1, TxState.PENDING, now), ("R1", 1, TxState.PENDING, now)]
    assert _rows(tracker) == [
        ("R0", "IN_PROGRESS", "IN_PROGRESS", 1, True),
        ("R1", "IN_PROGRESS", "IN_PROGRESS", 1, True),
        ("R2", "PENDING", "PENDING", 0, False),
    ]
    # Leased as an attempt (not renewed as a reservation), and started once only.
    (stage, *_) = tracker.get_transaction(batch[0].uuid).stages
    assert stage.lease_expires_at == now + timedelta(seconds=90)
    assert tracker.start_attempts("A", "validate", [batch[0].uuid], owner="run-1") == {}
    # What is not called goes back as it was claimed.
    before = {r.uuid: r.tx_state for r in batch}
    assert tracker.unstart("A", "validate", before, owner="run-1", since=now) == 2
    assert tracker.release(P, owner="run-1") == 2
    assert _rows(tracker) == [(f"R{i}", "PENDING", "PENDING", 0, False) for i in range(3)]


def test_a_batch_started_with_its_claim_is_taken_back_whole_when_the_run_stops_first(
    engine, clock
):
    tracker = Tracker(engine, processes=[cancellation_process()], clock=clock)
    tracker.start_many(P, [{"request_id": f"T{i}"} for i in range(3)])
    claim = Claim(tracker, "run-1", 60)
    batch = tracker.reserve(P, "A", owner="run-1", limit=3, start=True)
    contexts = [TxContext.of_reservation(r, claim) for r in batch]
    called: list[str] = []
    claim.stopping.set()  # the run stops before the batch's task run begins
    assert execute_batch(lambda tx: called.append(tx.business_key) or 0, contexts) == 0
    assert called == [] and not any(tx.called for tx in contexts)
    assert _rows(tracker) == [(f"T{i}", "PENDING", "IN_PROGRESS", 0, False) for i in range(3)]
    assert tracker.release(P, owner="run-1") == 3


def test_a_batch_started_with_its_claim_calls_each_stage_once_with_its_attempt(engine, clock):
    tracker = Tracker(engine, processes=[cancellation_process()], clock=clock)
    tracker.start_many(P, [{"request_id": f"C{i}"} for i in range(3)])
    claim = Claim(tracker, "run-1", 60)
    contexts = [TxContext.of_reservation(r, claim)
                for r in tracker.reserve(P, "A", owner="run-1", limit=3, start=True)]
    seen: list[tuple[str, int]] = []
    assert execute_batch(lambda tx: seen.append((tx.business_key, tx.attempt)) or 0,
                         contexts) == 3
    assert seen == [("C0", 1), ("C1", 1), ("C2", 1)]
    assert [r[2:4] for r in _rows(tracker)] == [("COMPLETED", 1)] * 3


def test_the_heartbeat_renews_a_started_batch_until_it_is_recorded(engine, clock):
    tracker = Tracker(engine, processes=[cancellation_process()], clock=clock)
    tracker.start_many(P, [{"request_id": f"H{i}"} for i in range(2)])
    claim = Claim(tracker, "run-1", 60)
    contexts = [TxContext.of(s, claim) for s in tracker.claim(P, "A", owner="run-1", limit=2)]
    seen: list[set[str]] = []
    lock = threading.Lock()

    def platform(tx: TxContext) -> int:
        with lock:
            seen.append(set(claim.awaiting))
        return 0

    assert execute_batch(platform, contexts) == 2
    # Every started attempt was in the heartbeat's set while the batch ran.
    assert seen == [{c.uuid for c in contexts}] * 2
    assert not claim.awaiting


@pytest.mark.postgres
def test_the_heartbeat_never_waits_for_a_batch_being_recorded(postgres_url):
    """PostgreSQL: renewing the started attempts of several batches skips the rows another
    transaction holds (a batch being recorded locks its rows in uuid order; a renewal that
    waited for them while holding others deadlocked with it, failing a 500-stage batch in
    the PostgreSQL benchmark). The held ones are being recorded: nothing to renew."""
    engine = connect(postgres_url)
    tracker = Tracker(engine, processes=[cancellation_process()])
    tracker.start_many(P, [{"request_id": f"H{i}"} for i in range(6)])
    uuids = sorted(s.uuid for s in tracker.claim(P, "A", owner="run-1", limit=6))
    tracker.start_attempts("A", "validate", uuids, owner="run-1")
    done: list[int] = []
    with engine.begin() as recording:  # a complete_many of the first three, in progress
        recording.execute(sa.select(STAGE.c.id).where(STAGE.c.uuid.in_(uuids[:3]))
                          .with_for_update())
        beat = threading.Thread(target=lambda: done.append(
            tracker.renew_attempts(uuids, owner="run-1", seconds=60)))
        beat.start()
        beat.join(timeout=10)
        assert not beat.is_alive(), "the heartbeat waited for the rows being recorded"
    assert done == [3]
    engine.dispose()


def test_record_attempts_starts_and_records_in_one_transaction(engine, clock):
    from tracking import Completion, ExecutionResult, Start

    tracker = Tracker(engine, processes=[cancellation_process()], clock=clock)
    tracker.start_many(P, [{"request_id": f"S{i}"} for i in range(4)])
    mine = tracker.claim(P, "A", owner="run-1", limit=3)
    other = tracker.claim(P, "A", owner="run-2", limit=1)
    tracker.start_attempts("A", "validate", [mine[0].uuid], owner="run-1")
    attempts, recorded = tracker.record_attempts(
        [Start(mine[1].uuid, "A", "validate"), Start(other[0].uuid, "A", "validate"),
         Start(mine[2].uuid, "A", "validate")],
        [Completion(mine[0].uuid, "A", "validate", ExecutionResult(0))], owner="run-1")
    assert attempts == [1, None, 1]  # None: reserved by another run, not started
    assert [s.state for s in recorded] == [StageState.COMPLETED]
    assert [r[1:] for r in _rows(tracker)] == [
        ("IN_PROGRESS", "COMPLETED", 1, True),
        ("IN_PROGRESS", "IN_PROGRESS", 1, True),
        ("IN_PROGRESS", "IN_PROGRESS", 1, True),
        ("PENDING", "IN_PROGRESS", 0, False),
    ]


def test_record_attempts_rolls_back_its_starts_when_a_result_fails(engine, clock):
    from tracking import Completion, ExecutionResult, Start

    tracker = Tracker(engine, processes=[cancellation_process()], clock=clock)
    tracker.start_many(P, [{"request_id": f"S{i}"} for i in range(2)])
    mine = tracker.claim(P, "A", owner="run-1", limit=2)
    tracker.start_attempts("A", "validate", [mine[0].uuid], owner="run-1")
    twice = [Completion(mine[0].uuid, "A", "validate", ExecutionResult(0))] * 2
    with pytest.raises(ValueError, match="one result per transaction"):
        tracker.record_attempts([Start(mine[1].uuid, "A", "validate")], twice, owner="run-1")
    assert [r[3:] for r in _rows(tracker)] == [(1, True), (0, False)]  # nothing written


@pytest.mark.parametrize("starts", ["A", [("u", "A", "validate")], [None]])
def test_record_attempts_rejects_starts_that_are_not_start_entries(engine, starts):
    tracker = Tracker(engine, processes=[cancellation_process()])
    with pytest.raises(TypeError, match="tracking.store.Start entries"):
        tracker.record_attempts(starts, [], owner="run-1")


@pytest.mark.parametrize("start", [(1, "A", "validate"), ("u", None, "validate"),
                                   ("u", "A", b"validate")])
def test_record_attempts_rejects_a_start_whose_fields_are_not_strings(engine, start):
    from tracking import Start

    tracker = Tracker(engine, processes=[cancellation_process()])
    with pytest.raises(ValueError, match="must be a string"):
        tracker.record_attempts([Start(*start)], [], owner="run-1")
