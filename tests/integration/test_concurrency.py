"""Several workers on one database: dedup races, claims, leases and crashes."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import sqlalchemy as sa

from tests import workers
from tests.conftest import cancellation_process
from tracking import LeaseLost, StageState, Tracker, TxState, connect
from tracking.models import EventKind
from tracking.outcomes import Outcome

P = "CANCELLATION"
SPAWN = mp.get_context("spawn")


def _run_processes(target, args_list):
    procs = [SPAWN.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    return procs


def test_eight_processes_submitting_one_item_create_one_transaction(db_url):
    connect(db_url, migrate=True).dispose()  # migrate once up front
    barrier, results = SPAWN.Barrier(8), SPAWN.Queue()
    procs = _run_processes(workers.submit_same_item, [(db_url, barrier, results)] * 8)
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert len({uuid for uuid, _ in outcomes}) == 1
    assert sum(is_new for _, is_new in outcomes) == 1
    engine = connect(db_url, migrate=True)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM tx_process")).scalar() == 1
        assert conn.execute(sa.text("SELECT count(*) FROM tx_stage")).scalar() == 4
        assert conn.execute(sa.text("SELECT count(*) FROM tx_event")).scalar() == 1


def test_eight_threads_submitting_one_item_create_one_transaction(tracker):
    barrier, results = threading.Barrier(8), []

    def submit(n: int) -> None:
        barrier.wait()
        results.append(tracker.start_or_resume(P, {"request_id": "SAME-2", "n": n}))

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({uuid for uuid, _ in results}) == 1
    assert sorted(is_new for _, is_new in results) == [False] * 7 + [True]


def test_concurrent_claims_never_share_a_stage(db_url):
    tracker = Tracker(connect(db_url, migrate=True), processes=[cancellation_process()])
    results = tracker.start_many(P, [{"request_id": f"R{i}"} for i in range(150)])
    assert all(r.is_new for r in results)
    barrier, queue = SPAWN.Barrier(4), SPAWN.Queue()
    procs = _run_processes(
        workers.claim_until_empty, [(db_url, f"w{i}", barrier, queue) for i in range(4)]
    )
    claimed = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
    ids = [i for batch in claimed for i in batch]
    assert len(ids) == len(set(ids)) == 150  # each stage claimed exactly once
    with tracker.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT attempt, state FROM tx_stage WHERE platform = 'A'")
        ).all()
        attempts = conn.execute(
            sa.text("SELECT count(*) FROM tx_event WHERE kind = 'ATTEMPT'")
        ).scalar()
    assert {(r.attempt, r.state) for r in rows} == {(1, "COMPLETED")}
    assert attempts == 150  # every attempt counted exactly once


def test_expired_lease_is_recorded_and_taken_over(tracker, clock):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.complete_stage(uuid, "A", 0)
    (stage,) = tracker.claim(P, "B", stage="process", owner="w1", lease_seconds=60)
    assert stage.attempt == 0  # reserved: no attempt counted yet
    assert tracker.start_attempt(uuid, "B", "process", owner="w1", lease_seconds=60) == 1
    assert tracker.claim(P, "B", stage="process", owner="w2") == []  # still leased
    clock.advance(61)
    (again,) = tracker.claim(P, "B", stage="process", owner="w2")
    assert again.uuid == uuid and again.attempt == 1
    assert tracker.start_attempt(uuid, "B", "process", owner="w2") == 2
    lost = [e for e in tracker.get_transaction(uuid).events if e.kind == EventKind.LEASE_EXPIRED]
    assert len(lost) == 1
    assert (lost[0].attempt, lost[0].outcome, lost[0].actor) == (1, Outcome.SYSTEM_ERROR, "w1")
    with pytest.raises(LeaseLost):  # the stale worker cannot overwrite the new attempt
        tracker.complete_stage(uuid, "B", 0, stage="process", owner="w1")
    final = tracker.complete_stage(uuid, "B", 0, stage="process", owner="w2")
    assert final.state == StageState.COMPLETED and final.attempt == 2


def test_expired_lease_on_last_attempt_exhausts_the_stage(tracker, clock):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.claim(P, "A", owner="w1", lease_seconds=10)  # A allows one attempt
    tracker.start_attempt(uuid, "A", "validate", owner="w1", lease_seconds=10)
    clock.advance(11)
    assert tracker.recover_expired_leases(P) == 1
    tx = tracker.get_transaction(uuid)
    assert tx.stages[0].state == StageState.EXHAUSTED and tx.state == TxState.EXHAUSTED
    assert tracker.recover_expired_leases(P) == 0


def test_extend_lease_keeps_a_long_attempt(tracker, clock):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.claim(P, "A", owner="w1", lease_seconds=10)
    clock.advance(8)
    tracker.extend_lease(uuid, "A", owner="w1", seconds=60)
    clock.advance(30)
    assert tracker.recover_expired_leases(P) == 0
    assert tracker.complete_stage(uuid, "A", 0, owner="w1").state == StageState.COMPLETED
    with pytest.raises(LeaseLost):
        tracker.extend_lease(uuid, "A", owner="w1", seconds=60)


def test_worker_killed_with_sigkill_loses_no_item(db_url):
    """Half the reserved stages were started when the worker died: only those lose an
    attempt; the others come back with their attempts intact."""
    tracker = Tracker(connect(db_url, migrate=True), processes=[cancellation_process()])
    tracker.start_many(P, [{"request_id": f"K{i}"} for i in range(20)])
    ready = SPAWN.Event()
    (proc,) = _run_processes(workers.claim_then_die, [(db_url, ready, 10)])
    assert ready.wait(120)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    assert tracker.claim(P, "A", owner="survivor", limit=100) == []  # leases still held
    time.sleep(1.2)
    taken = tracker.claim(P, "A", owner="survivor", limit=100)
    # A allows one attempt: the 10 started attempts were lost and exhausted their stages;
    # the 10 never started are runnable again, with no attempt used.
    assert len(taken) == 10 and {s.attempt for s in taken} == {0}
    with tracker.engine.connect() as conn:
        states = conn.execute(
            sa.text("SELECT state, count(*) FROM tx_stage WHERE platform='A' GROUP BY state")
        ).all()
        kinds = conn.execute(
            sa.text("SELECT kind, count(*) FROM tx_event WHERE kind != 'CREATED' GROUP BY kind")
        ).all()
    assert dict(states) == {"EXHAUSTED": 10, "IN_PROGRESS": 10}
    assert dict(kinds) == {"LEASE_EXPIRED": 10, "RELEASED": 10}
    for stage in taken:
        tracker.complete_stage(stage.uuid, "A", 0, owner="survivor")
    # An operator requeues the exhausted ones and a healthy worker finishes the job.
    uuids = [r.uuid for r in tracker.start_many(P, [{"request_id": f"K{i}"} for i in range(20)])]
    for uuid in uuids:
        if tracker.get_transaction(uuid).state == TxState.EXHAUSTED:
            tracker.requeue(uuid, actor="ops")
    done = tracker.claim(P, "A", owner="survivor-2", limit=100)
    assert len(done) == 10 and {s.attempt for s in done} == {1}


def test_expired_reservation_comes_back_with_its_attempts_intact(tracker, clock):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.claim(P, "A", owner="w1", lease_seconds=10)  # A allows one attempt
    clock.advance(11)
    assert tracker.recover_expired_leases(P) == 1
    (stage, *_) = tracker.get_transaction(uuid).stages
    assert (stage.state, stage.attempt) == (StageState.PENDING, 0)
    with pytest.raises(LeaseLost):  # the dead run's claim is gone: it may not start now
        tracker.start_attempt(uuid, "A", "validate", owner="w1")
    (again,) = tracker.claim(P, "A", owner="w2")
    assert tracker.start_attempt(uuid, "A", "validate", owner="w2") == 1
    tracker.complete_stage(uuid, "A", 0, owner="w2")
    tx = tracker.get_transaction(uuid)
    assert [e.kind for e in tx.events] == [EventKind.CREATED, EventKind.RELEASED,
                                          EventKind.ATTEMPT]
    released = tx.events[1]
    assert (released.attempt, released.actor, released.to_state) == (0, "w1", "PENDING")


def test_renewed_reservations_outlive_the_lease_but_a_started_call_does_not(tracker, clock):
    a, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    b, _ = tracker.start_or_resume(P, {"request_id": "FE-2"})
    tracker.claim(P, "A", owner="w1", lease_seconds=10, limit=2)
    tracker.start_attempt(a, "A", "validate", owner="w1", lease_seconds=30)
    for _ in range(5):  # the run's heartbeat
        clock.advance(8)
        assert tracker.renew_reservations(P, owner="w1", seconds=10) == 1  # b only
        assert tracker.claim(P, "A", owner="w2") == []
    # 40 s in: a's call (lease 30 s, not renewed) was lost (w2's claim recovered it), b is
    # still reserved for w1.
    lost = [e for e in tracker.get_transaction(a).events if e.kind == EventKind.LEASE_EXPIRED]
    assert len(lost) == 1 and lost[0].attempt == 1
    assert tracker.start_attempt(b, "A", "validate", owner="w1") == 1
    with pytest.raises(LeaseLost):
        tracker.complete_stage(a, "A", 0, owner="w1")


def test_release_gives_back_only_what_was_not_started(tracker):
    uuids = [tracker.start_or_resume(P, {"request_id": f"R{i}"})[0] for i in range(3)]
    tracker.claim(P, "A", owner="run-1", limit=3)
    tracker.start_attempt(uuids[0], "A", "validate", owner="run-1")
    assert tracker.release(P, owner="run-1") == 2
    assert tracker.release(P, owner="run-1") == 0
    states = {s.uuid: (s.state, s.attempt) for s in tracker.get_stages(uuids, "A", "validate")}
    assert states[uuids[0]] == (StageState.IN_PROGRESS, 1)
    assert states[uuids[1]] == states[uuids[2]] == (StageState.PENDING, 0)
    assert tracker.claim(P, "A", owner="run-1", limit=3) == []  # not back to the same run
    assert len(tracker.claim(P, "A", owner="run-2", limit=3)) == 2
    tracker.complete_stage(uuids[0], "A", 0, owner="run-1")  # its attempt is still its own


def test_a_run_never_reclaims_a_stage_it_just_attempted(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.complete_stage(uuid, "A", 0)
    for _ in range(2):
        tracker.start_or_resume(P, {"request_id": "other"})
    (stage,) = tracker.claim(P, "B", stage="process", owner="run-1")
    tracker.complete_stage(uuid, "B", -1, stage="process", owner="run-1")  # due again at once
    assert tracker.claim(P, "B", stage="process", owner="run-1") == []  # not in a tight loop
    (again,) = tracker.claim(P, "B", stage="process", owner="run-2")  # the next run retries
    assert tracker.start_attempt(uuid, "B", "process", owner="run-2") == 2


def test_claim_stage_allows_an_in_run_retry(tracker, clock):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.complete_stage(uuid, "A", 0)
    tracker.claim(P, "B", stage="process", owner="run-1")
    tracker.complete_stage(uuid, "B", -1, stage="process", owner="run-1")
    retry = tracker.claim_stage(uuid, "B", stage="process", owner="run-1")
    assert retry is not None and retry.attempt == 1 and retry.state == StageState.IN_PROGRESS
    assert tracker.start_attempt(uuid, "B", "process", owner="run-1") == 2
    assert tracker.claim_stage(uuid, "B", stage="process", owner="run-2") is None  # taken
    tracker.complete_stage(uuid, "B", -1, stage="process", owner="run-1")  # exhausted (2 of 2)
    assert tracker.claim_stage(uuid, "B", stage="process", owner="run-1") is None


def test_claim_can_be_limited_to_one_transaction(tracker):
    uuids = [tracker.start_or_resume(P, {"request_id": f"U{i}"})[0] for i in range(5)]
    (stage,) = tracker.claim(P, "A", owner="api", uuid=uuids[3])
    assert stage.uuid == uuids[3]
    assert tracker.claim(P, "A", owner="api", uuid=uuids[3]) == []


def test_start_and_release_refuse_bad_input_and_change_nothing(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.claim(P, "A", owner="w1")
    for bad in ({"uuid": 42}, {"platform": None}, {"owner": ""}, {"lease_seconds": float("nan")}):
        args = {"uuid": uuid, "platform": "A", "stage": "validate", "owner": "w1", **bad}
        with pytest.raises(ValueError):
            tracker.start_attempt(args.pop("uuid"), args.pop("platform"), args.pop("stage"),
                                  **args)
    with pytest.raises(ValueError):
        tracker.release(P, owner="w1", uuids=uuid)  # a string, not a list of uuids
    assert tracker.start_attempt(uuid, "A", "validate", owner="w1") == 1  # still reserved
