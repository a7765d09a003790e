"""not_before, deadline, SLA and defer: when an item may start, when it is overdue (claimed
first, reported by ``Reports.overdue``/``sla`` and the views ``v_overdue``/``v_sla_daily``),
and the operator's defer, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic import command

from tests.conftest import FakeClock, cancellation_process
from tracking import InvalidTransition, Process, Reports, Tracker, TxState
from tracking.db import _alembic_config, upgrade
from tracking.models import EventKind
from tracking.schedule import Item

P = "CANCELLATION"
HOUR = timedelta(hours=1)


def sla_process(sla: timedelta = 4 * HOUR) -> Process:
    base = cancellation_process()
    return Process(P, platforms=base.platforms, dedup=base.dedup, sla=sla)


@pytest.fixture
def sla_tracker(engine, clock: FakeClock) -> Tracker:
    return Tracker(engine, processes=[sla_process()], clock=clock)


def keys(tracker: Tracker, stages) -> list[str]:
    return [tracker.get_transaction(s.uuid).business_key for s in stages]


# -- not_before and deadline at intake ---------------------------------------------------------


def test_not_before_delays_the_first_stage(tracker, clock):
    later = clock.now + 2 * HOUR
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"}, not_before=later)
    tx = tracker.get_transaction(uuid)
    assert tx.not_before == later and tx.stages[0].next_attempt_at == later
    assert tracker.claim(P, "A", owner="w") == []
    clock.advance(2 * 3600)
    assert [s.uuid for s in tracker.claim(P, "A", owner="w")] == [uuid]


def test_a_past_not_before_is_now(tracker, clock):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"}, not_before=clock.now - HOUR)
    assert tracker.get_transaction(uuid).stages[0].next_attempt_at == clock.now


def test_due_at_is_the_earlier_of_deadline_and_sla(sla_tracker, clock):
    created = clock.now
    early = sla_tracker.start_or_resume(P, {"request_id": "early"}, deadline=created + HOUR)[0]
    late = sla_tracker.start_or_resume(P, {"request_id": "late"}, deadline=created + 9 * HOUR)[0]
    none = sla_tracker.start_or_resume(P, {"request_id": "none"})[0]
    got = {u: sla_tracker.get_transaction(u) for u in (early, late, none)}
    assert got[early].due_at == created + HOUR and got[early].deadline == created + HOUR
    assert got[late].due_at == created + 4 * HOUR and got[late].deadline == created + 9 * HOUR
    assert got[none].due_at == created + 4 * HOUR and got[none].deadline is None
    assert {s.due_at for s in got[early].stages} == {created + HOUR}
    # Without an SLA, only the item's own deadline makes it due.
    tracker = Tracker(sla_tracker.engine, processes=[cancellation_process()], clock=clock)
    plain = tracker.start_or_resume(P, {"request_id": "plain"})[0]
    assert tracker.get_transaction(plain).due_at is None


def test_a_changed_sla_applies_to_new_items(engine, clock):
    old = Tracker(engine, [sla_process(4 * HOUR)], clock=clock)
    first = old.start_or_resume(P, {"request_id": "first"})[0]
    new = Tracker(engine, [sla_process(HOUR)], clock=clock)
    second = new.start_or_resume(P, {"request_id": "second"})[0]
    assert new.get_transaction(first).due_at == clock.now + 4 * HOUR
    assert new.get_transaction(second).due_at == clock.now + HOUR


def test_bad_times_are_refused_naming_the_value(tracker, clock):
    with pytest.raises(ValueError, match="deadline must be an ISO 8601 .*'tomorrow'"):
        tracker.start_or_resume(P, {"request_id": "x"}, deadline="tomorrow")
    with pytest.raises(ValueError, match="not_before must be timezone-aware"):
        tracker.start_or_resume(P, {"request_id": "x"}, not_before=datetime(2026, 1, 5))
    uuid, _ = tracker.start_or_resume(P, {"request_id": "x"}, deadline="2026-01-06T10:00")
    assert tracker.get_transaction(uuid).deadline == datetime(2026, 1, 6, 10, tzinfo=UTC)


# -- overdue first -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["claim", "reserve"])
def test_overdue_items_are_claimed_first_most_overdue_first(sla_tracker, clock, how):
    sla_tracker.start_or_resume(P, {"request_id": "high"}, priority=100)
    sla_tracker.start_or_resume(P, {"request_id": "due-in-2h"}, deadline=clock.now + 2 * HOUR)
    sla_tracker.start_or_resume(P, {"request_id": "due-in-1h"}, deadline=clock.now + HOUR)
    deferred, _ = sla_tracker.start_or_resume(P, {"request_id": "deferred"},
                                              deadline=clock.now + HOUR)
    sla_tracker.defer(deferred, until=clock.now + 5 * HOUR)
    clock.advance(3 * 3600)  # both deadlines passed; the SLA (4 h) not yet
    claim = getattr(sla_tracker, how)
    assert keys(sla_tracker, claim(P, "A", owner="w", limit=1)) == ["due-in-1h"]
    assert keys(sla_tracker, claim(P, "A", owner="w", limit=2)) == [
        "due-in-2h", "high"]  # the overdue one, then by priority
    assert claim(P, "A", owner="w") == []  # "deferred": overdue but not due


def test_a_claim_fills_its_limit_from_both_orders(sla_tracker, clock):
    sla_tracker.start_many(P, [Item({"request_id": f"late-{i}"}, deadline=clock.now)
                               for i in range(3)])
    sla_tracker.start_many(P, [{"request_id": f"n-{i}"} for i in range(5)], priority=1)
    clock.advance(1)
    claimed = keys(sla_tracker, sla_tracker.claim(P, "A", owner="w", limit=6))
    assert claimed[:3] == ["late-0", "late-1", "late-2"] and len(set(claimed)) == 6


# -- defer -----------------------------------------------------------------------------------


def test_defer_postpones_the_next_stage_and_is_audited(tracker, clock):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.complete_stage(uuid, "A", 0)
    until = clock.now + 5 * HOUR
    tx = tracker.defer(uuid, until=until, reason="customer on holiday", actor="alice")
    assert tx.state == TxState.IN_PROGRESS and tx.not_before == until
    assert tx.stages[1].next_attempt_at == until and tx.stages[1].stage == "process"
    event = tx.events[-1]
    assert (event.kind, event.actor, event.platform, event.stage) == (
        EventKind.DEFERRED, "alice", "B", "process")
    assert event.description == f"deferred until {until.isoformat()}: customer on holiday"
    assert tracker.claim(P, "B", "process", owner="w") == []
    clock.advance(5 * 3600)
    assert len(tracker.claim(P, "B", "process", owner="w")) == 1


def test_defer_keeps_a_later_retry_time(engine, clock):
    from tracking import Platform, RetryPolicy

    process = Process(P, platforms=[Platform("A", order=1, retry=RetryPolicy(delay=7200))])
    tracker = Tracker(engine, [process], clock=clock)
    uuid, _ = tracker.start_or_resume(P, {"n": 1})
    tracker.complete_stage(uuid, "A", -1)  # TERMINATED, retried in 2 h
    retry_at = clock.now + 2 * HOUR
    tx = tracker.defer(uuid, until=clock.now + HOUR)
    assert tx.state == TxState.TERMINATED and tx.stages[0].next_attempt_at == retry_at


def test_defer_takes_iso_text(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tx = tracker.defer(uuid, until="2026-12-03T08:00Z")
    assert tx.stages[0].next_attempt_at == datetime(2026, 12, 3, 8, tzinfo=UTC)


def test_defer_refuses_running_final_and_past(tracker, clock):
    running, _ = tracker.start_or_resume(P, {"request_id": "running"})
    reserved, _ = tracker.start_or_resume(P, {"request_id": "reserved"})
    done, _ = tracker.start_or_resume(P, {"request_id": "done"})
    tracker.cancel(done, reason="no")
    tracker.claim(P, "A", owner="w", uuid=running)
    tracker.start_attempt(running, "A", "validate", owner="w")
    tracker.claim(P, "A", owner="w", uuid=reserved)
    later = clock.now + HOUR
    with pytest.raises(InvalidTransition, match="has a stage running right now"):
        tracker.defer(running, until=later)
    with pytest.raises(InvalidTransition, match="has a stage claimed by a run right now"):
        tracker.defer(reserved, until=later)
    with pytest.raises(InvalidTransition, match=r"is CANCELLED: only waiting transactions "
                                                r"\(PENDING, IN_PROGRESS, TERMINATED\)"):
        tracker.defer(done, until=later)
    with pytest.raises(ValueError, match="until must be in the future"):
        tracker.defer(running, until=clock.now)
    # Nothing was written by the refusals.
    kinds = [e.kind for u in (running, reserved, done) for e in tracker.get_transaction(u).events]
    assert EventKind.DEFERRED not in kinds


def test_defer_and_its_event_commit_together(tracker, clock, monkeypatch):
    from tracking.store import transitions

    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    before = tracker.get_transaction(uuid).stages[0].next_attempt_at
    # The event's insert fails after the stage and transaction were updated: all rolls back.
    monkeypatch.setattr(transitions, "INSERT_EVENT", sa.text("INSERT INTO nowhere VALUES (1)"))
    with pytest.raises(sa.exc.DBAPIError):
        tracker.defer(uuid, until=clock.now + HOUR)
    tx = tracker.get_transaction(uuid)
    assert tx.stages[0].next_attempt_at == before and tx.not_before is None


# -- reports and views -----------------------------------------------------------------------


def _overdue_scenario(tracker: Tracker, clock: FakeClock) -> dict[str, str]:
    """Created 2026-01-05 09:00 (SLA 4 h: due 13:00): one finished in time, one finished
    late, one still open (overdue); then 2026-01-06 10:00, one new (due 14:00)."""
    made = {}
    for key in ("in-time", "late", "open-overdue"):
        made[key] = tracker.start_or_resume(P, {"request_id": key}, priority=2)[0]
    tracker.cancel(made["in-time"], reason="done early")      # finished within 4 h
    clock.advance(5 * 3600)
    tracker.cancel(made["late"], reason="done late")          # finished after 4 h
    clock.advance(20 * 3600)                                  # the next day, 06:00
    made["fresh"] = tracker.start_or_resume(P, {"request_id": "fresh"})[0]
    return made


def test_overdue_and_sla_reports(sla_tracker, clock):
    made = _overdue_scenario(sla_tracker, clock)
    reports = Reports(sla_tracker.engine)
    overdue = reports.overdue(P, now=clock.now)
    assert [o.uuid for o in overdue] == [made["open-overdue"]]
    item = overdue[0]
    assert item.priority == 2 and (item.platform, item.stage) == ("A", "validate")
    assert item.overdue_seconds == 21 * 3600
    days = reports.sla(clock.now - timedelta(days=2), clock.now + HOUR, P, now=clock.now)
    assert [(d.day.isoformat(), d.transactions, d.finished, d.within_sla, d.late, d.open,
             d.overdue, d.attainment, d.sla_seconds) for d in days] == [
        ("2026-01-05", 3, 2, 1, 1, 1, 1, 0.5, 4 * 3600.0),
        ("2026-01-06", 1, 0, 0, 0, 1, 0, None, 4 * 3600.0),
    ]
    assert reports.overdue(now=clock.now, limit=5) == overdue
    assert reports.overdue("OTHER", now=clock.now) == []


def test_views_match_the_reports(sla_tracker, clock):
    """The views read the database clock: the scenario lies in the past of the real one."""
    _overdue_scenario(sla_tracker, clock)
    reports, now = Reports(sla_tracker.engine), datetime.now(UTC)
    with sla_tracker.engine.connect() as conn:
        overdue = conn.execute(sa.text("SELECT * FROM v_overdue ORDER BY due_at")).all()
        daily = conn.execute(sa.text(
            "SELECT * FROM v_sla_daily ORDER BY process_code, created_day")).all()
    assert now > clock.now + 4 * HOUR  # so every open one is overdue by the real clock
    expected = reports.overdue(now=now)
    assert [r.uuid for r in overdue] == [o.uuid for o in expected] and len(expected) == 2
    assert [(r.priority, r.platform, r.stage, r.tx_state) for r in overdue] == [
        (o.priority, o.platform, o.stage, o.state.value) for o in expected]
    assert all(abs(r.overdue_seconds - o.overdue_seconds) < 60 for r, o in zip(
        overdue, expected, strict=True))
    rows = reports.sla(clock.now - timedelta(days=3), clock.now + HOUR, now=now)
    assert [(str(r.created_day), r.transactions, r.finished, r.within_sla, r.late, r.open,
             r.overdue, r.attainment) for r in daily] == [
        (d.day.isoformat(), d.transactions, d.finished, d.within_sla, d.late, d.open, d.overdue,
         d.attainment) for d in rows]


def test_the_views_go_away_on_downgrade(engine):
    def views() -> set[str]:
        return {"v_overdue", "v_sla_daily"} & set(sa.inspect(engine).get_view_names())

    assert views() == {"v_overdue", "v_sla_daily"}
    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0005")
    assert views() == set()
    with engine.connect() as conn:
        assert "priority" not in {c["name"] for c in sa.inspect(conn).get_columns("tx_stage")}
    upgrade(engine)
    assert views() == {"v_overdue", "v_sla_daily"}
