"""The pre-aggregated transaction counts (``tx_count``, migration 0008) behind the summary
report: after intake, every kind of state change and purges, on both databases, the summary
of any window equals a count of the rows; PostgreSQL's concurrent writers neither wait for
one another on them nor deadlock, and folding while they write loses nothing."""

from __future__ import annotations

import random
import threading
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.conftest import FakeClock, cancellation_process
from tests.integration.test_retention import Items
from tracking import ExecutionResult, Tracker, TxState, connect
from tracking.db import upgrade
from tracking.errors import InvalidTransition
from tracking.reports import Reports, counts
from tracking.reports.counts import COUNT, DELTA, fold
from tracking.retention import Archive
from tracking.store import Completion
from tracking.store.retention import Target
from tracking.store.sql import TX

P = "CANCELLATION"
HOUR = timedelta(hours=1)


def raw(engine, start: datetime, end: datetime, process: str | None = None) -> list[tuple]:
    """The summary counted from the rows (what the counts must equal)."""
    q = (sa.select(TX.c.process_code, TX.c.state, sa.func.count())
         .where(TX.c.created_at >= start, TX.c.created_at < end)
         .group_by(TX.c.process_code, TX.c.state).order_by(TX.c.process_code, TX.c.state))
    if process:
        q = q.where(TX.c.process_code == process)
    with engine.connect() as conn:
        return [(p, TxState(s).value, n) for p, s, n in conn.execute(q)]


def summary(reports: Reports, start: datetime, end: datetime,
            process: str | None = None) -> list[tuple]:
    return [(r.process, r.state.value, r.count)
            for r in reports.summary_by_process_and_state(start, end, process)]


def windows(first: datetime, last: datetime, rng: random.Random) -> list[tuple]:
    """Aligned, partial, inside one hour, empty, in the future, and random windows."""
    h = first.replace(minute=0, second=0, microsecond=0)
    out = [(first - HOUR, last + HOUR), (h, h + 3 * HOUR), (h + HOUR, h + HOUR),
           (h + timedelta(minutes=7), h + timedelta(minutes=50)),
           (h + timedelta(minutes=59), h + 2 * HOUR + timedelta(minutes=1)),
           (last, last + 10 * HOUR), (last + HOUR, last + 2 * HOUR)]
    span = (last - first).total_seconds()
    for _ in range(40):
        a, b = sorted(first + timedelta(seconds=rng.uniform(-600, span + 600)) for _ in "ab")
        out.append((a, b))
    return out


def scene(tracker: Tracker, clock: FakeClock) -> None:
    """Transactions of every kind created over about five hours."""
    items = Items(tracker, clock)
    kinds = [items.new, items.completed, items.rejected, items.exhausted, items.cancelled,
             items.retrying, items.running, items.cancelled_while_running]
    for k in range(40):
        kinds[k % len(kinds)]()
        clock.advance(7 * 60 + 13)


@pytest.fixture
def reports(engine, clock) -> Reports:
    return Reports(engine, clock)


def test_the_summary_equals_a_count_of_the_rows(tracker, clock, engine, reports, tmp_path):
    first = clock.now
    scene(tracker, clock)
    last = clock.now
    # more changes: requeues, a purge of the oldest finished ones, a second process
    for row in reports.requeue_candidates(P, limit=3):
        tracker.requeue(row.uuid, actor="ops")
    clock.advance(10 * 86_400)
    with Archive(tmp_path / "archive.jsonl") as archive:
        (done,) = tracker.purge([Target(P, timedelta(days=1), first + 2 * HOUR)], archive)
    assert done.transactions > 0
    rng = random.Random(7)
    for start, end in windows(first, last, rng):
        assert summary(reports, start, end) == raw(engine, start, end), (start, end)
        assert summary(reports, start, end, P) == raw(engine, start, end, P), (start, end)
    assert summary(reports, first - HOUR, last + HOUR, "OTHER") == []
    fold(engine)  # PostgreSQL: the deltas now in the counts, the same answers
    for start, end in windows(first, last, rng)[:10]:
        assert summary(reports, start, end) == raw(engine, start, end), (start, end)


def test_a_window_that_ends_now_reads_the_counts_not_the_rows(tracker, clock, engine,
                                                              reports):
    """The summary of the last 7 days counts rows created after now only: changing the
    counts (as a bug in a trigger would) shows in it, proving where it reads."""
    tracker.start_many(P, [{"request_id": f"N{k}"} for k in range(5)])
    clock.advance(60)
    fold(engine)
    with engine.begin() as conn:
        conn.execute(sa.update(COUNT).values(n=COUNT.c.n + 100))
    (row,) = summary(reports, clock.now - timedelta(days=7), clock.now)
    assert row == (P, "PENDING", 105)


@pytest.mark.postgres
def test_concurrent_writers_neither_deadlock_nor_lose_a_count(postgres_url):
    engine = connect(postgres_url)
    clock = FakeClock()
    process = cancellation_process()
    writers = [Tracker(engine, processes=[process], clock=clock) for _ in range(4)]
    errors: list[BaseException] = []

    def work(k: int, tracker: Tracker) -> None:
        try:
            for r in range(6):
                intake = tracker.start_many(P, [{"request_id": f"W{k}-{r}-{i}"}
                                                for i in range(40)])
                owner = f"w{k}-{r}"
                stages = tracker.claim(P, "A", owner=owner, limit=40) if r % 2 else []
                started = tracker.start_attempts("A", "validate", [s.uuid for s in stages],
                                                 owner=owner)
                tracker.complete_many(
                    [Completion(u, "A", "validate", ExecutionResult((i % 3) - 1))
                     for i, u in enumerate(started)], owner=owner)
                for i in intake[:5]:
                    try:
                        tracker.cancel(i.uuid, reason="withdrawn")
                    except InvalidTransition:  # another writer's claim finished it first
                        pass
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    def folder() -> None:
        while any(t.is_alive() for t in threads):
            fold(engine)

    threads = [threading.Thread(target=work, args=(k, t)) for k, t in enumerate(writers)]
    for t in threads:
        t.start()
    folding = threading.Thread(target=folder)
    folding.start()
    for t in [*threads, folding]:
        t.join(timeout=120)
    assert not errors, errors[0]
    reports = Reports(engine, clock)
    window = (clock.now - timedelta(days=1), clock.now + timedelta(days=1))
    assert summary(reports, *window) == raw(engine, *window)
    assert sum(n for *_, n in summary(reports, *window)) == 4 * 6 * 40
    fold(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(DELTA)).scalar() == 0
    assert summary(reports, *window) == raw(engine, *window)
    engine.dispose()


@pytest.mark.postgres
def test_a_report_folds_when_many_deltas_wait(postgres_url, monkeypatch):
    engine, clock = connect(postgres_url), FakeClock()
    tracker = Tracker(engine, [cancellation_process()], clock=clock)
    reports = Reports(engine, clock)
    window = (clock.now - HOUR, clock.now + HOUR)
    tracker.start_many(P, [{"request_id": f"F{k}"} for k in range(30)])

    def waiting() -> int:
        with engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(DELTA)).scalar()

    monkeypatch.setattr(counts, "FOLD_AT", 100)
    assert summary(reports, *window) == [(P, "PENDING", 30)]
    assert waiting() == 30  # few: left for the end of a run
    monkeypatch.setattr(counts, "FOLD_AT", 10)
    assert summary(reports, *window) == [(P, "PENDING", 30)]
    assert waiting() == 0
    assert summary(reports, *window) == [(P, "PENDING", 30)]
    engine.dispose()


def test_upgrading_counts_the_transactions_already_there(db_url, clock):
    engine = connect(db_url)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    upgrade(engine, "0007")
    old = Tracker(engine, processes=[cancellation_process()], clock=clock)
    old.start_many(P, [{"request_id": f"U{k}"} for k in range(12)])
    clock.advance(2 * 3600)
    old.start_many(P, [{"request_id": f"V{k}"} for k in range(3)])
    upgrade(engine)
    window = (clock.now - timedelta(days=1), clock.now + HOUR)
    got = summary(Reports(engine, clock), *window)
    assert got == raw(engine, *window) == [(P, "PENDING", 15)]
    engine.dispose()
