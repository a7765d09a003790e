"""Priority: kept beside the payload, copied onto every stage, and the claim order (higher
first, then oldest due) on ix_tx_stage_runnable, whose cost follows the limit, on SQLite and
PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.integration.test_queries import count_statements
from tracking import Tracker
from tracking.schedule import Item, Schedule, check_priority, check_time, split_record
from tracking.store import claims

P = "CANCELLATION"


def keys(tracker: Tracker, stages) -> list[str]:
    """The business keys of these stages' transactions, in order."""
    return [tracker.get_transaction(s.uuid).business_key for s in stages]


def plan(engine, query) -> str:
    """The query plan, with sorts and other access paths discouraged on PostgreSQL (so a
    Sort node in it means the index cannot give the order)."""
    compiled = query.compile(engine, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            return " ".join(str(r) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}"))
        for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
            conn.exec_driver_sql(f"SET {setting} = off")
        return " ".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN {compiled}"))


def test_priority_is_stored_on_the_transaction_and_every_stage(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"}, priority=7)
    tx = tracker.get_transaction(uuid)
    assert tx.priority == 7 and tx.payload == {"request_id": "FE-1"}
    assert [s.priority for s in tx.stages] == [7, 7, 7, 7]
    other, _ = tracker.start_or_resume(P, {"request_id": "FE-2"})
    assert tracker.get_transaction(other).priority == 0  # the default


@pytest.mark.parametrize("how", ["claim", "reserve"])
def test_claims_take_higher_priority_first_then_oldest_due(tracker, clock, how):
    tracker.start_or_resume(P, {"request_id": "old-low"}, priority=-1)
    clock.advance(1)
    tracker.start_or_resume(P, {"request_id": "old-normal"})
    clock.advance(1)
    tracker.start_many(P, [Item({"request_id": "new-high"}, priority=5),
                           Item({"request_id": "newer-high"}, priority="5"),
                           {"request_id": "new-normal"}])
    clock.advance(1)
    assert keys(tracker, tracker.get_pending_stages(P, "A")) == [
        "new-high", "newer-high", "old-normal", "new-normal", "old-low"]
    claim = getattr(tracker, how)
    assert keys(tracker, claim(P, "A", owner="w", limit=2)) == ["new-high", "newer-high"]
    assert keys(tracker, claim(P, "A", owner="w", limit=10)) == [
        "old-normal", "new-normal", "old-low"]


def test_later_stages_keep_the_priority(tracker, clock):
    low, _ = tracker.start_or_resume(P, {"request_id": "low"})
    high, _ = tracker.start_or_resume(P, {"request_id": "high"}, priority=3)
    tracker.complete_stage(low, "A", 0)  # low reaches B first...
    clock.advance(60)
    tracker.complete_stage(high, "A", 0)
    clock.advance(1)
    # ...but high goes first there too.
    assert keys(tracker, tracker.claim(P, "B", "process", owner="w")) == ["high", "low"]


def test_start_many_defaults_apply_to_plain_payloads_only(tracker):
    results = tracker.start_many(
        P, [{"request_id": "a"}, Item({"request_id": "b"}, priority=1)], priority=9)
    got = [tracker.get_transaction(r.uuid).priority for r in results]
    assert got == [9, 1]


def test_a_duplicate_keeps_its_schedule(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"}, priority=1)
    again = tracker.start_or_resume(P, {"request_id": "FE-1"}, priority=100)
    assert again == (uuid, False)
    assert tracker.get_transaction(uuid).priority == 1


@pytest.mark.parametrize("bad", ["high", 1.5, True, None, 2**31, "", "1e3"])
def test_a_bad_priority_is_refused_naming_the_value(tracker, bad):
    with pytest.raises(ValueError, match="priority must be a whole number") as caught:
        tracker.start_many(P, [{"request_id": "ok"}, Item({"request_id": "x"}, priority=bad)])
    assert repr(bad) in str(caught.value) and "payload #1" in str(caught.value)
    assert tracker.get_pending_stages(P, "A") == []  # the whole batch is refused


def test_runnable_query_uses_the_index_in_its_order(tracker, engine):
    tracker.start_many(P, [Item({"request_id": f"Q{i}"}, priority=i % 3) for i in range(60)])
    found = plan(engine, claims.runnable(P, "A", "validate", tracker.clock()).limit(10))
    assert "ix_tx_stage_runnable" in found, found
    assert "TEMP B-TREE" not in found.upper() and "Sort" not in found, found


def test_overdue_query_uses_its_own_index(tracker, engine, clock):
    past = clock.now - timedelta(hours=1)
    tracker.start_many(P, [Item({"request_id": f"D{i}"}, deadline=past if i % 2 else None)
                           for i in range(60)])
    found = plan(engine, claims.overdue(P, "A", "validate", tracker.clock()).limit(10))
    assert "ix_tx_stage_overdue" in found, found
    assert "TEMP B-TREE" not in found.upper() and "Sort" not in found, found


@pytest.mark.parametrize("how", ["claim", "reserve"])
def test_claim_statements_do_not_grow_with_rows_or_priorities(tracker, how):
    tracker.start_many(P, [Item({"request_id": f"Q{i}"}, priority=i % 7) for i in range(300)])
    claim = getattr(tracker, how)
    with count_statements(tracker.engine) as small:
        assert len(claim(P, "A", owner="w", limit=5)) == 5
    with count_statements(tracker.engine) as large:
        assert len(claim(P, "A", owner="w", limit=200)) == 200
    assert len(small) == len(large) <= 5, large


# -- the schedule's values, without a database ------------------------------------------------


def test_check_priority_and_time():
    assert check_priority(" -3 ") == -3 and check_priority(2**31 - 1) == 2**31 - 1
    assert check_time("2026-12-03T08:00Z", "until") == datetime(2026, 12, 3, 8, tzinfo=UTC)
    assert check_time("2026-12-03T08:00", "until") == datetime(2026, 12, 3, 8, tzinfo=UTC)
    assert check_time("2026-12-03", "until") == datetime(2026, 12, 3, tzinfo=UTC)
    assert check_time("2026-12-03T10:00+02:00", "x") == datetime(2026, 12, 3, 8, tzinfo=UTC)
    with pytest.raises(ValueError, match="deadline must be an ISO 8601 .* got 'soon'"):
        check_time("soon", "deadline")
    with pytest.raises(ValueError, match="timezone-aware"):
        check_time(datetime(2026, 12, 3), "not_before")  # a naive datetime in Python
    with pytest.raises(ValueError, match="deadline .* is before not_before"):
        Schedule.of(not_before="2026-12-03", deadline="2026-12-02")


def test_split_record_takes_the_reserved_fields_out_of_the_payload():
    item = split_record({"request_id": "FE-1", "priority": "4", "not_before": "",
                         "deadline": "2026-12-03T17:00Z", "name": "x"})
    assert item.payload == {"request_id": "FE-1", "name": "x"}
    assert item.schedule() == Schedule(4, None, datetime(2026, 12, 3, 17, tzinfo=UTC))
    plain = {"request_id": "FE-2"}
    assert split_record(plain).payload is plain
    assert split_record({"request_id": "x", "priority": None}).schedule() == Schedule()


def test_take_in_reads_the_schedule_of_records(tracker: Tracker):
    from tracking.items import take_in

    summary = take_in(tracker, P, [{"request_id": "r1", "priority": "2"}, {"request_id": "r2"}])
    assert [tracker.get_transaction(u).priority for u in summary.uuids] == [2, 0]
    with pytest.raises(ValueError, match="item 2: priority must be .* got 'x'"):
        take_in(tracker, P, [{"request_id": "r3"}, {"request_id": "r4", "priority": "x"}])
