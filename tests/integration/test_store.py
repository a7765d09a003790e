"""The tracker's state machine, on SQLite and PostgreSQL."""

from __future__ import annotations

import enum
import random
import uuid as uuid_lib
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

import pytest
import sqlalchemy as sa

from tests.conftest import cancellation_process
from tracking import (
    ExecutionResult,
    InvalidTransition,
    KeyFields,
    LeaseLost,
    Platform,
    Process,
    RetryPolicy,
    StageState,
    Tracker,
    TransactionNotFound,
    TxState,
    UnknownProcessError,
)
from tracking.models import EventKind
from tracking.outcomes import ErrorType, Outcome

P = "CANCELLATION"


def states(tracker: Tracker, uuid: str) -> list[tuple[str, str, StageState]]:
    return [(s.platform, s.stage, s.state) for s in tracker.get_transaction(uuid).stages]


def test_start_creates_every_stage_in_order(tracker):
    uuid, is_new = tracker.start_or_resume(P, {"request_id": "FE-1", "name": "x"})
    assert is_new
    tx = tracker.get_transaction(uuid)
    assert tx.state == TxState.PENDING and tx.payload == {"request_id": "FE-1", "name": "x"}
    assert tx.business_key == "FE-1"
    assert states(tracker, uuid) == [
        ("A", "validate", StageState.PENDING),
        ("B", "process", StageState.PENDING),
        ("B", "confirm", StageState.PENDING),
        ("C", "main", StageState.PENDING),
    ]
    assert [e.kind for e in tx.events] == [EventKind.CREATED]
    assert tx.created_at.tzinfo is not None


def test_uuids_sort_in_the_order_transactions_were_taken_in(tracker):
    """UUIDv7: the uuid indexes take new transactions at their end (not on a random page)."""
    uuids = [tracker.start_or_resume(P, {"request_id": "O-0"})[0]]
    for k in range(3):
        uuids += [i.uuid for i in tracker.start_many(
            P, [{"request_id": f"O-{k}-{j}"} for j in range(200)])]
    uuids.append(tracker.start_or_resume(P, {"request_id": "O-last"})[0])
    assert uuids == sorted(uuids)
    assert {uuid_lib.UUID(u).version for u in uuids} == {7}


def test_duplicate_returns_existing_transaction(tracker):
    first = tracker.start_or_resume(P, {"request_id": "FE-1", "name": "x"})
    second = tracker.start_or_resume(P, {"request_id": "FE-1", "name": "changed"})
    assert second == (first[0], False)
    tx = tracker.get_transaction(first[0])
    assert tx.payload["name"] == "x"  # the duplicate changed nothing


def test_only_the_first_unfinished_stage_is_runnable(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    assert [s.uuid for s in tracker.get_pending_stages(P, "A")] == [uuid]
    assert tracker.get_pending_stages(P, "B", stage="process") == []
    with pytest.raises(InvalidTransition, match="earlier stages"):
        tracker.complete_stage(uuid, "B", 0, stage="process")
    tracker.complete_stage(uuid, "A", 0)
    assert tracker.get_pending_stages(P, "A") == []
    assert [s.uuid for s in tracker.get_pending_stages(P, "B", stage="process")] == [uuid]
    assert tracker.get_pending_stages(P, "B", stage="confirm") == []
    assert tracker.get_transaction(uuid).state == TxState.IN_PROGRESS


def test_full_success(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.complete_stage(uuid, "A", 0)
    tracker.complete_stage(uuid, "B", 0, stage="process")
    tracker.complete_stage(uuid, "B", ExecutionResult(0, "confirmed"), stage="confirm")
    stage = tracker.complete_stage(uuid, "C", 0)
    assert stage.state == StageState.COMPLETED and stage.attempt == 1
    tx = tracker.get_transaction(uuid)
    assert tx.state == TxState.COMPLETED and tx.finished_at is not None
    assert all(s.state == StageState.COMPLETED for s in tx.stages)
    attempts = [e for e in tx.events if e.kind == EventKind.ATTEMPT]
    assert [(e.platform, e.stage, e.outcome) for e in attempts] == [
        ("A", "validate", Outcome.SUCCESS),
        ("B", "process", Outcome.SUCCESS),
        ("B", "confirm", Outcome.SUCCESS),
        ("C", "main", Outcome.SUCCESS),
    ]
    assert attempts[2].description == "confirmed"


def test_business_error_rejects_and_cancels_the_rest(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    stage = tracker.complete_stage(uuid, "A", ExecutionResult(7, "customer unknown"))
    assert stage.state == StageState.REJECTED
    assert stage.error_type == ErrorType.BUSINESS and stage.error_code == 7
    assert states(tracker, uuid) == [
        ("A", "validate", StageState.REJECTED),
        ("B", "process", StageState.CANCELLED),
        ("B", "confirm", StageState.CANCELLED),
        ("C", "main", StageState.CANCELLED),
    ]
    assert tracker.get_transaction(uuid).state == TxState.REJECTED
    for platform, stage_name in (("B", "process"), ("B", "confirm"), ("C", None)):
        assert tracker.get_pending_stages(P, platform, stage=stage_name) == []


def test_system_error_is_retried_until_attempts_run_out(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.complete_stage(uuid, "A", 0)
    first = tracker.complete_stage(uuid, "B", -2, stage="process")
    assert first.state == StageState.TERMINATED and first.error_type == ErrorType.SYSTEM
    assert tracker.get_transaction(uuid).state == TxState.TERMINATED
    assert len(tracker.get_pending_stages(P, "B", stage="process")) == 1
    second = tracker.complete_stage(uuid, "B", ExecutionResult(-3, "down"), stage="process")
    assert second.state == StageState.EXHAUSTED and second.attempt == 2
    tx = tracker.get_transaction(uuid)
    assert tx.state == TxState.EXHAUSTED
    assert tracker.get_pending_stages(P, "B", stage="process") == []
    with pytest.raises(InvalidTransition, match="already EXHAUSTED"):
        tracker.complete_stage(uuid, "B", 0, stage="process")


def test_single_attempt_platform_is_exhausted_at_once(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    assert tracker.complete_stage(uuid, "A", -1).state == StageState.EXHAUSTED


def test_unlimited_retries(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    for platform, stage in (("A", None), ("B", "process"), ("B", "confirm")):
        tracker.complete_stage(uuid, platform, 0, stage=stage)
    for _ in range(25):
        assert tracker.complete_stage(uuid, "C", -1).state == StageState.TERMINATED
    assert tracker.complete_stage(uuid, "C", 0).attempt == 26


def test_next_attempt_follows_delay_backoff_and_cap(engine, clock):
    process = Process(
        "BACKOFF",
        platforms=[
            Platform("X", order=1, retry=RetryPolicy(max_attempts=5, delay=60, backoff=2,
                                                      max_delay=200)),
        ],
        dedup=KeyFields("id"),
    )
    tracker = Tracker(engine, processes=[process], clock=clock)
    uuid, _ = tracker.start_or_resume("BACKOFF", {"id": 1})
    waits = []
    for _ in range(4):
        stage = tracker.complete_stage(uuid, "X", -1)
        waits.append((stage.next_attempt_at - clock.now).total_seconds())
        # Not due yet: neither listed nor completable.
        assert tracker.get_pending_stages("BACKOFF", "X") == []
        with pytest.raises(InvalidTransition, match="not due"):
            tracker.complete_stage(uuid, "X", 0)
        clock.advance(waits[-1])
    assert waits == [60, 120, 200, 200]
    assert tracker.complete_stage(uuid, "X", -1).state == StageState.EXHAUSTED


def test_jitter_stays_within_bounds():
    policy = RetryPolicy(delay=100, jitter=10)
    rng = random.Random(1)
    values = [policy.delay_after(1, rng) for _ in range(200)]
    assert all(90 <= v <= 110 for v in values)
    assert max(values) - min(values) > 5  # it really varies


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"max_attempts": True}, {"delay": -1}, {"backoff": 0.5},
     {"jitter": -1}, {"delay": "5"}],
)
def test_bad_retry_policies_are_rejected(kwargs):
    with pytest.raises((ValueError, TypeError)):
        RetryPolicy(**kwargs)


def test_policy_accepts_timedelta():
    assert RetryPolicy(delay=timedelta(minutes=5)).delay_after(1) == 300


# -- the seed library's integration scenarios --------------------------------------------


def test_seed_scenario_rejection_retry_and_success(tracker, engine, clock):
    from tracking import Reports

    t1, _ = tracker.start_or_resume(P, {"request_id": "T1"})
    t2, _ = tracker.start_or_resume(P, {"request_id": "T2"})
    t3, _ = tracker.start_or_resume(P, {"request_id": "T3"})

    # Hourly run 1, platform by platform, the way the seed's loop does it.
    for stage in tracker.get_pending_stages(P, "A"):
        code = 1 if stage.uuid == t1 else 0  # T1 is rejected at A
        tracker.complete_stage(stage.uuid, "A", code)
    for stage in tracker.get_pending_stages(P, "B", stage="process"):
        code = -1 if stage.uuid == t2 else 0  # T2 hits a system error at B
        tracker.complete_stage(stage.uuid, "B", code, stage="process")
    for stage in tracker.get_pending_stages(P, "B", stage="confirm"):
        tracker.complete_stage(stage.uuid, "B", 0, stage="confirm")
    for stage in tracker.get_pending_stages(P, "C"):
        tracker.complete_stage(stage.uuid, "C", 0)

    assert tracker.get_transaction(t2).state == TxState.TERMINATED
    # Hourly run 2: T2 is retried at B and now gets a business error.
    pending = tracker.get_pending_stages(P, "B", stage="process")
    assert [s.uuid for s in pending] == [t2]
    tracker.complete_stage(t2, "B", ExecutionResult(3, "order already shipped"), stage="process")

    assert tracker.get_transaction(t1).state == TxState.REJECTED
    assert tracker.get_transaction(t2).state == TxState.REJECTED
    assert tracker.get_transaction(t3).state == TxState.COMPLETED

    reports = Reports(engine)
    start, end = clock.now - timedelta(hours=1), clock.now + timedelta(hours=1)
    by_state = {r.state: r.count for r in reports.summary_by_state(start, end)}
    assert by_state == {TxState.REJECTED: 2, TxState.COMPLETED: 1}
    stage_counts: dict[StageState, int] = {}
    for row in reports.stage_summary_by_platform(start, end):
        stage_counts[row.state] = stage_counts.get(row.state, 0) + row.count
    assert stage_counts[StageState.CANCELLED] == 5
    assert stage_counts[StageState.REJECTED] == 2
    per_stage = {(r.platform, r.stage, r.state): r.count
                 for r in reports.stage_summary_by_platform_and_stage(start, end, process=P)}
    assert per_stage[("B", "process", StageState.REJECTED)] == 1
    assert per_stage[("C", "main", StageState.COMPLETED)] == 1
    assert {t.uuid for t in reports.transactions_between(start, end)} == {t1, t2, t3}
    assert reports.summary_by_state(start, end, process="OTHER") == []
    errors = reports.top_errors(start, end)
    assert {(e.platform, e.error_code, e.count) for e in errors} == {
        ("A", 1, 1), ("B", -1, 1), ("B", 3, 1)
    }


def test_seed_scenario_system_error_exhausts_platform_b(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "T9"})
    tracker.complete_stage(uuid, "A", 0)
    tracker.complete_stage(uuid, "B", -1, stage="process")
    tracker.complete_stage(uuid, "B", -1, stage="process")
    tx = tracker.get_transaction(uuid)
    assert tx.state == TxState.EXHAUSTED
    # Exhausted stages simply stop appearing in pending queries; later stages wait.
    assert tracker.get_pending_stages(P, "B", stage="process") == []
    assert [s.state for s in tx.stages][2:] == [StageState.PENDING, StageState.PENDING]


# -- bad input changes nothing ----------------------------------------------------------


def _snapshot(engine):
    with engine.connect() as conn:
        return tuple(
            conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar()
            for t in ("tx_process", "tx_stage", "tx_event")
        )


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda t, u: t.start_or_resume("NOPE", {"request_id": "x"}), UnknownProcessError),
        (lambda t, u: t.start_or_resume(P, {"name": "no key"}), ValueError),
        (lambda t, u: t.start_or_resume(P, {"request_id": None}), ValueError),
        (lambda t, u: t.start_or_resume(P, {"request_id": "x", "when": object()}), ValueError),
        (lambda t, u: t.start_or_resume(P, {"request_id": float("nan")}), ValueError),
        (lambda t, u: t.start_or_resume(P, ["not", "a", "mapping"]), ValueError),
        (lambda t, u: t.start_many(P, [{"request_id": "ok"}, {"bad": 1}]), ValueError),
        (lambda t, u: t.complete_stage(u, "Z", 0), ValueError),
        (lambda t, u: t.complete_stage(u, "B", 0), ValueError),  # two stages: stage= needed
        (lambda t, u: t.complete_stage(u, "B", 0, stage="nope"), ValueError),
        (lambda t, u: t.complete_stage(u, "A", True), TypeError),
        (lambda t, u: t.complete_stage(u, "A", 1.0), TypeError),
        (lambda t, u: t.complete_stage(u, "A", "0"), TypeError),
        (lambda t, u: t.complete_stage(u, "A", None), TypeError),
        (lambda t, u: t.complete_stage("no-such-uuid", "A", 0), TransactionNotFound),
        (lambda t, u: t.get_pending_stages(P, "A", limit=0), ValueError),
        (lambda t, u: t.claim(P, "A", owner=""), ValueError),
        (lambda t, u: t.claim(P, "A", owner="w", uuid=123), ValueError),
        (lambda t, u: t.reserve(P, "A", owner="w", uuid=[u]), ValueError),
        (lambda t, u: t.complete_stage(u, "A", 0, owner="someone"), LeaseLost),
    ],
)
def test_bad_input_is_rejected_and_changes_nothing(tracker, engine, call, error):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    before = _snapshot(engine)
    with pytest.raises(error) as info:
        call(tracker, uuid)
    assert str(info.value)  # a message that says what was wrong
    assert _snapshot(engine) == before
    assert tracker.get_transaction(uuid).stages[0].attempt == 0


@pytest.mark.parametrize("blank", ["", "   "])
def test_blank_dedup_key_is_refused_and_changes_nothing(tracker, engine, blank):
    before = _snapshot(engine)
    with pytest.raises(ValueError, match="'request_id'.*must not be blank"):
        tracker.start_or_resume(P, {"request_id": blank, "customer": "C1"})
    with pytest.raises(ValueError, match=r"payload #2: .*'request_id'.*must not be blank"):
        tracker.start_many(
            P, [{"request_id": "R1"}, {"request_id": "R2"}, {"request_id": blank}]
        )
    assert _snapshot(engine) == before  # not even the good payloads of the batch


def test_int_dedup_keys_stay_valid(tracker):
    results = tracker.start_many(P, [{"request_id": 0}, {"request_id": 7}, {"request_id": 7}])
    assert [r.is_new for r in results] == [True, True, False]
    assert tracker.get_transaction(results[0].uuid).business_key == "0"


def test_execution_result_rejects_non_int_codes():
    for bad in (True, False, 1.5, "1", None):
        with pytest.raises(TypeError, match="error code must be an int"):
            ExecutionResult(bad)


def test_completing_a_final_stage_is_refused(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.complete_stage(uuid, "A", 0)
    with pytest.raises(InvalidTransition, match="already COMPLETED"):
        tracker.complete_stage(uuid, "A", 0)


def test_process_definition_errors():
    with pytest.raises(ValueError, match="repeats platform code 'A'"):
        Process("P", platforms=[Platform("A", order=1), Platform("A", order=2)])
    with pytest.raises(ValueError, match="orders must be distinct"):
        Process("P", platforms=[Platform("A", order=1), Platform("B", order=1)])
    with pytest.raises(ValueError, match="repeats a stage"):
        Platform("A", order=1, stages=("x", "x"))
    with pytest.raises(ValueError, match="process code"):
        Process("has space")


def test_register_stores_the_catalog(tracker, engine):
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT code, platform_order, max_attempts FROM tx_catalog_platform "
                    "WHERE process_code = 'CANCELLATION' ORDER BY platform_order")
        ).all()
        dedup = conn.execute(
            sa.text("SELECT dedup_strategy FROM tx_catalog_process WHERE code='CANCELLATION'")
        ).scalar()
    assert [tuple(r) for r in rows] == [("A", 1, 1), ("B", 2, 2), ("C", 3, None)]
    assert dedup == "key_fields"
    tracker.register(cancellation_process())  # registering again is an update, not an error


# -- audit trail ------------------------------------------------------------------------


def test_events_are_append_only(tracker, engine):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    with pytest.raises(sa.exc.DatabaseError, match="append-only"):
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE tx_event SET description = 'x'"))
    with pytest.raises(sa.exc.DatabaseError, match="append-only"):
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM tx_event"))
    assert len(tracker.get_transaction(uuid).events) == 1


def test_event_records_attempt_details(tracker, clock):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.claim(P, "A", owner="run-7")
    clock.advance(5)  # reserved, not started: the wait is not part of the attempt
    assert tracker.start_attempt(uuid, "A", "validate", owner="run-7") == 1
    clock.advance(2)
    tracker.complete_stage(uuid, "A", ExecutionResult(-1, "boom", "Traceback..."), owner="run-7",
                           flow_run_id="f-1", task_run_id="t-1")
    event = tracker.get_transaction(uuid).events[-1]
    assert (event.platform, event.stage, event.attempt) == ("A", "validate", 1)
    assert (event.outcome, event.error_code) == (Outcome.SYSTEM_ERROR, -1)
    assert event.description == "boom"
    assert event.traceback == "Traceback..."
    assert (event.flow_run_id, event.task_run_id, event.actor) == ("f-1", "t-1", "run-7")
    assert (event.from_state, event.to_state) == ("IN_PROGRESS", "EXHAUSTED")
    assert event.duration_ms == 2000


# -- operator actions -------------------------------------------------------------------


def test_cancel_and_requeue(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.complete_stage(uuid, "A", 0)
    tx = tracker.cancel(uuid, reason="duplicate order", actor="ops")
    assert tx.state == TxState.CANCELLED
    assert [s.state for s in tx.stages] == [StageState.COMPLETED] + [StageState.CANCELLED] * 3
    assert tx.events[-1].kind == EventKind.CANCELLED and tx.events[-1].actor == "ops"
    assert tracker.get_pending_stages(P, "B", stage="process") == []
    with pytest.raises(InvalidTransition):
        tracker.cancel(uuid, reason="again")

    tx = tracker.requeue(uuid, actor="ops")
    assert tx.state == TxState.IN_PROGRESS
    assert [s.state for s in tx.stages] == [StageState.COMPLETED] + [StageState.PENDING] * 3
    assert tx.events[-1].kind == EventKind.REQUEUED
    assert [s.uuid for s in tracker.get_pending_stages(P, "B", stage="process")] == [uuid]


def test_requeue_gives_exhausted_stage_fresh_attempts(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.complete_stage(uuid, "A", -1)  # max_attempts=1: exhausted
    with pytest.raises(InvalidTransition):
        tracker.requeue(tracker.start_or_resume(P, {"request_id": "FE-2"})[0])  # pending
    tracker.requeue(uuid)
    stage = tracker.complete_stage(uuid, "A", -1)
    assert stage.attempt == 2 and stage.state == StageState.EXHAUSTED  # counted, not reset
    with pytest.raises(ValueError, match="reason"):
        tracker.cancel(uuid, reason=" ")


def test_reserve_reserves_as_claim_does_with_what_a_platform_call_needs(tracker, clock):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1", "amount": 12.5})
    (r,) = tracker.reserve(P, "A", owner="w1", lease_seconds=60)
    assert (r.uuid, r.process_code, r.platform, r.stage, r.attempt) == (
        uuid, P, "A", "validate", 0)
    assert (r.business_key, r.tx_state) == ("FE-1", TxState.PENDING)
    assert r.payload == {"request_id": "FE-1", "amount": 12.5}
    (stage, *_) = tracker.get_transaction(uuid).stages
    assert (stage.state, stage.lease_owner, stage.started_at) == (
        StageState.IN_PROGRESS, "w1", None)
    assert tracker.claim(P, "A", owner="w2") == tracker.reserve(P, "A", owner="w2") == []
    clock.advance(61)  # the reservation expired: given back first, its attempts intact
    (again,) = tracker.reserve(P, "A", owner="w2")
    assert (again.uuid, again.attempt) == (uuid, 0)
    assert tracker.start_attempt(uuid, "A", "validate", owner="w2") == 1
    assert tracker.complete_stage(uuid, "A", 0, owner="w2").state == StageState.COMPLETED


def test_cancel_of_a_reserved_stage_stops_it_before_its_attempt(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.claim(P, "A", owner="w1")
    tracker.cancel(uuid, reason="customer called")
    with pytest.raises(LeaseLost):  # the run must not call the platform any more
        tracker.start_attempt(uuid, "A", "validate", owner="w1")
    (stage, *_) = tracker.get_transaction(uuid).stages
    assert (stage.state, stage.attempt) == (StageState.CANCELLED, 0)


def test_cancel_while_running_keeps_the_attempt_but_runs_nothing_after(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.claim(P, "A", owner="w1")
    tracker.start_attempt(uuid, "A", "validate", owner="w1")
    tracker.cancel(uuid, reason="customer called")
    stage = tracker.complete_stage(uuid, "A", 0, owner="w1")
    assert stage.state == StageState.COMPLETED
    tx = tracker.get_transaction(uuid)
    assert tx.state == TxState.CANCELLED
    assert tracker.get_pending_stages(P, "B", stage="process") == []


def test_operator_actions_and_completions_work_for_a_process_this_program_did_not_import(
    engine, clock
):
    """Requeue raised UnknownProcessError for a process outside the tracker's registrations
    while cancel worked: the retry policy now lives with each stage and in the catalog."""
    writer = Tracker(engine, processes=[cancellation_process()], clock=clock)
    uuid, _ = writer.start_or_resume("CANCELLATION", {"request_id": "FE-ANY"})
    operator = Tracker(engine, clock=clock)  # knows no process, like a bare CLI or API
    stage = operator.complete_stage(uuid, "A", -1, stage="validate")
    assert stage.state == StageState.EXHAUSTED  # A allows one attempt
    tx = operator.requeue(uuid, reason="fixed", actor="ops")
    assert tx.state == TxState.PENDING
    assert tx.stages[0].attempts_allowed == 2 and tx.stages[0].next_attempt_at is not None
    assert operator.cancel(uuid, reason="no longer wanted").state == TxState.CANCELLED


def test_a_stage_keeps_the_retry_policy_it_was_created_under(engine, clock):
    process = Process("POLICY", platforms=[Platform(
        "A", order=1, retry=RetryPolicy(max_attempts=5, delay=60, backoff=2, max_delay=100))])
    tracker = Tracker(engine, processes=[process], clock=clock)
    uuid, _ = tracker.start_or_resume("POLICY", {"k": 1})
    bare = Tracker(engine, clock=clock)
    first = bare.complete_stage(uuid, "A", -1)
    assert first.next_attempt_at == clock.now + timedelta(seconds=60)
    clock.advance(60)
    assert bare.complete_stage(uuid, "A", -1).next_attempt_at == clock.now + timedelta(
        seconds=100)


def _containing_itself() -> list:
    value: list = [1]
    value.append(value)
    return value


def _nested(depth: int) -> list:
    value: list = [1]
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"request_id": "FE-1", "note": "a\x00b"}, "payload strings must not contain NUL"),
        ({"request_id": "FE-1", "k\x00": 1}, "payload keys must not contain NUL"),
        ({"request_id": "FE-1", "x": float("nan")}, "payload numbers must be finite"),
        ({"request_id": "FE-1", "deep": _nested(40)}, "payload is nested deeper than 32 levels"),
        ({"request_id": "FE-1", "own": _containing_itself()},
         "payload is nested deeper than 32 levels"),
        ({"request_id": "FE-1", "é": ["x\ud800"]}, "payload strings must be valid Unicode"),
        ({"request_id": "FE-1", "k\udfff": 1}, "payload keys must be valid Unicode"),
        ({"request_id": "FE-1", "tags": {"a"}},
         "payload is not JSON-serialisable: a value of type set"),
        ({"request_id": "FE-1", "at": datetime(2026, 1, 1, tzinfo=UTC)},
         "payload is not JSON-serialisable: a value of type datetime"),
        ({"request_id": "FE-1", "m": MappingProxyType({"a": 1})},
         "payload is not JSON-serialisable: a value of type mappingproxy"),
    ],
)
def test_payloads_the_databases_cannot_store_are_refused_by_the_store(tracker, payload, message):
    """The NUL check PostgreSQL needs lived only in the API: the Python API and the CLI let a
    NUL reach PostgreSQL, which failed with a driver error. The store checks every payload."""
    with pytest.raises(ValueError, match=message):
        tracker.start_or_resume("CANCELLATION", payload)
    with pytest.raises(ValueError, match=f"payload #1: {message}"):
        tracker.start_many("CANCELLATION", [{"request_id": "ok"}, payload])
    with tracker.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM tx_process")).scalar_one() == 0


class _Colour(enum.StrEnum):
    RED = "red"


class _Size(enum.IntEnum):
    BIG = 3


def test_json_values_of_subclassed_types_are_taken_in_as_json(tracker):
    """The store's check takes what JSON can hold, subclasses included (an enum of str or
    int, a tuple), and a read-only mapping as the payload itself."""
    payload = MappingProxyType({"request_id": "FE-1", "colour": _Colour.RED, "size": _Size.BIG,
                                "pair": (1, "two"), "ok": True, "none": None})
    uuid, is_new = tracker.start_or_resume("CANCELLATION", payload)
    assert is_new
    assert tracker.get_transaction(uuid).payload == {
        "request_id": "FE-1", "colour": "red", "size": 3, "pair": [1, "two"], "ok": True,
        "none": None}
