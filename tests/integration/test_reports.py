"""The operational reports (aging, attempts, throughput, durations, requeue selection) and the
markdown summary, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.integration.test_queries import count_statements
from tracking import ExecutionResult, Reports, StageState, TxState
from tracking.reports import AttemptCount, HourlyThroughput, summary_markdown

P = "CANCELLATION"
DAY = timedelta(days=1)


def finish_all(tracker, uuid):
    for platform, stage in (("A", None), ("B", "process"), ("B", "confirm"), ("C", None)):
        tracker.complete_stage(uuid, platform, 0, stage=stage)


@pytest.fixture
def reports(engine):
    return Reports(engine)


def test_aging_lists_waiting_transactions_oldest_first_with_their_stage(tracker, reports, clock):
    created = clock.now
    pending, _ = tracker.start_or_resume(P, {"request_id": "pending"})
    clock.advance(60)
    at_b, _ = tracker.start_or_resume(P, {"request_id": "at-b"})
    tracker.complete_stage(at_b, "A", 0)
    clock.advance(60)
    retrying, _ = tracker.start_or_resume(P, {"request_id": "retrying"})
    tracker.complete_stage(retrying, "A", 0)
    tracker.complete_stage(retrying, "B", ExecutionResult(-2, "SAP down"), stage="process")
    done, _ = tracker.start_or_resume(P, {"request_id": "done"})
    finish_all(tracker, done)
    rejected, _ = tracker.start_or_resume(P, {"request_id": "rejected"})
    tracker.complete_stage(rejected, "A", 3)

    now = created + timedelta(hours=2)
    items = reports.aging(now=now)

    assert [i.uuid for i in items] == [pending, at_b, retrying]
    first, second, third = items
    assert (first.state, first.platform, first.stage, first.stage_state) == (
        TxState.PENDING, "A", "validate", StageState.PENDING)
    assert first.age_seconds == 7200.0 and first.created_at == created
    assert (second.state, second.platform, second.stage) == (TxState.IN_PROGRESS, "B", "process")
    assert second.age_seconds == 7140.0
    assert (third.state, third.stage_state, third.attempts, third.attempts_allowed) == (
        TxState.TERMINATED, StageState.TERMINATED, 1, 2)
    assert (third.error_code, third.error_description) == (-2, "SAP down")
    assert third.next_attempt_at is not None
    assert [i.uuid for i in reports.aging(now=now, limit=1)] == [pending]
    assert [i.uuid for i in reports.aging(now=now, start=created + timedelta(seconds=30))] == [
        at_b, retrying]
    assert reports.aging("OTHER", now=now) == []


def test_aging_is_one_statement(tracker, reports):
    tracker.start_many(P, [{"request_id": f"R{i}"} for i in range(30)])
    with count_statements(reports.engine) as seen:
        assert len(reports.aging()) == 30
    assert len(seen) == 1


def test_aging_refuses_naive_datetimes(reports):
    with pytest.raises(ValueError, match="timezone-aware"):
        reports.aging(now=datetime(2026, 1, 1))


def test_attempts_distribution(tracker, reports, clock):
    a, _ = tracker.start_or_resume(P, {"request_id": "a"})
    b, _ = tracker.start_or_resume(P, {"request_id": "b"})
    tracker.complete_stage(a, "A", 0)
    tracker.complete_stage(b, "A", 0)
    tracker.complete_stage(a, "B", -1, stage="process")
    tracker.complete_stage(a, "B", 0, stage="process")
    rows = reports.attempts_distribution(clock.now - DAY, clock.now + DAY)
    # a: A 1 attempt, B.process 2, B.confirm 0, C 0; b: A 1, the rest 0
    assert rows == [
        AttemptCount("A", 1, 2),
        AttemptCount("B", 0, 3),
        AttemptCount("B", 2, 1),
        AttemptCount("C", 0, 2),
    ]
    assert reports.attempts_distribution(clock.now - DAY, clock.now + DAY, "OTHER") == []


def test_throughput_counts_finished_transactions_per_hour_with_empty_hours(
    tracker, reports, clock
):
    start = clock.now  # 09:00
    done, _ = tracker.start_or_resume(P, {"request_id": "done"})
    clock.advance(3599)  # 09:59:59
    finish_all(tracker, done)
    rejected, _ = tracker.start_or_resume(P, {"request_id": "rejected"})
    clock.advance(1)  # 10:00:00 belongs to the 10:00 hour
    tracker.complete_stage(rejected, "A", 4)
    exhausted, _ = tracker.start_or_resume(P, {"request_id": "exhausted"})
    clock.advance(2 * 3600)  # 12:00
    tracker.complete_stage(exhausted, "A", -1)
    cancelled, _ = tracker.start_or_resume(P, {"request_id": "cancelled"})
    tracker.cancel(cancelled, reason="test")

    rows = reports.throughput_by_hour(start - timedelta(minutes=30), start + timedelta(hours=4))
    hour = start.replace(minute=0)
    assert rows == [
        HourlyThroughput(hour - timedelta(hours=1), 0, 0, 0, 0),
        HourlyThroughput(hour, 1, 0, 0, 0),
        HourlyThroughput(hour + timedelta(hours=1), 0, 1, 0, 0),
        HourlyThroughput(hour + timedelta(hours=2), 0, 0, 0, 0),
        HourlyThroughput(hour + timedelta(hours=3), 0, 0, 1, 1),
    ]
    assert rows[4].finished == 2
    assert all(r.hour.tzinfo == UTC for r in rows)
    # the window is by finish time
    first_hour = reports.throughput_by_hour(start, start + timedelta(hours=1))
    assert sum(r.finished for r in first_hour) == 1
    assert reports.throughput_by_hour(start, start + timedelta(hours=4), "OTHER")[1].completed == 0


def test_stage_durations_mean_p95_and_max_per_platform(tracker, reports, clock):
    uuids = [r.uuid for r in tracker.start_many(P, [{"request_id": f"D{i}"} for i in range(20)])]
    start = clock.now
    for seconds, uuid in enumerate(uuids, start=1):
        (stage,) = tracker.claim(P, "A", owner="w", limit=1, uuid=uuid)
        clock.advance(3)  # reserved, waiting: not part of the attempt's duration
        tracker.start_attempt(uuid, "A", "validate", owner="w")
        clock.advance(seconds)
        tracker.complete_stage(uuid, "A", 0, owner="w")
    (stage,) = tracker.claim(P, "B", "process", owner="w", limit=1)
    tracker.start_attempt(stage.uuid, "B", "process", owner="w")
    clock.advance(0.25)
    tracker.complete_stage(stage.uuid, "B", 0, stage="process", owner="w")

    rows = reports.stage_durations(start, clock.now + timedelta(seconds=1))
    assert [(r.process, r.platform, r.attempts) for r in rows] == [(P, "A", 20), (P, "B", 1)]
    a, b = rows
    assert (a.mean_seconds, a.p95_seconds, a.max_seconds) == (10.5, 19.0, 20.0)
    assert (b.mean_seconds, b.p95_seconds, b.max_seconds) == (0.25, 0.25, 0.25)
    assert reports.stage_durations(start, clock.now, "OTHER") == []


def test_stage_durations_is_one_statement(tracker, reports, clock):
    tracker.start_many(P, [{"request_id": f"D{i}"} for i in range(10)])
    for stage in tracker.claim(P, "A", owner="w", limit=10):
        tracker.complete_stage(stage.uuid, "A", 0, owner="w")
    with count_statements(reports.engine) as seen:
        reports.stage_durations(clock.now - DAY, clock.now + DAY)
    assert len(seen) == 1


def test_requeue_candidates_select_by_state_and_platform(tracker, reports):
    exhausted_a, _ = tracker.start_or_resume(P, {"request_id": "xa"})
    tracker.complete_stage(exhausted_a, "A", -1)
    exhausted_b, _ = tracker.start_or_resume(P, {"request_id": "xb"})
    tracker.complete_stage(exhausted_b, "A", 0)
    tracker.complete_stage(exhausted_b, "B", -1, stage="process")
    tracker.complete_stage(exhausted_b, "B", ExecutionResult(-7, "boom"), stage="process")
    rejected, _ = tracker.start_or_resume(P, {"request_id": "r"})
    tracker.complete_stage(rejected, "A", 5)

    everything = reports.requeue_candidates(P)
    assert {c.uuid for c in everything} == {exhausted_a, exhausted_b}
    only_b = reports.requeue_candidates(P, "EXHAUSTED", platform="B")
    assert [(c.uuid, c.platform, c.stage, c.error_code, c.error_description) for c in only_b] == [
        (exhausted_b, "B", "process", -7, "boom")]
    assert [c.uuid for c in reports.requeue_candidates(P, TxState.REJECTED)] == [rejected]
    assert reports.requeue_candidates(P, "REJECTED", platform="B") == []
    assert len(reports.requeue_candidates(P, limit=1)) == 1
    with pytest.raises(ValueError, match="can be requeued"):
        reports.requeue_candidates(P, "COMPLETED")


def test_existing_uuids_and_process_codes(tracker, reports):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "x"})
    assert reports.existing_uuids([uuid, "nope", uuid]) == {uuid}
    assert reports.existing_uuids([]) == set()
    assert reports.process_codes() == [P]


def test_summary_markdown(tracker, reports, clock):
    done, _ = tracker.start_or_resume(P, {"request_id": "done"})
    finish_all(tracker, done)
    rejected, _ = tracker.start_or_resume(P, {"request_id": "rejected"})
    tracker.complete_stage(rejected, "A", ExecutionResult(9, "bad | input\nsecond line"))
    text = summary_markdown(reports, clock.now - DAY, clock.now + DAY, P)
    assert text.startswith("# Tracking summary: CANCELLATION\n")
    assert "**2**" in text
    assert "| COMPLETED | 1 |" in text and "| REJECTED | 1 |" in text
    assert "| Platform | COMPLETED | REJECTED | CANCELLED | Total |" in text
    assert "| A | 1 | 1 | 0 | 2 |" in text
    assert "| B | 2 | 0 | 2 | 4 |" in text
    assert "bad \\| input second line" in text  # escaped, on one line
    empty = summary_markdown(reports, clock.now - DAY, clock.now + DAY, "OTHER")
    assert empty.count("_none_") == 3
