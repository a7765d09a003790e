"""Transactions counted by process and state over a window, from the pre-aggregated hourly
counts (``tx_count``, kept by triggers: migration 0008) instead of every row.

A window ``[start, end)`` is the whole hours inside it, counted from ``tx_count`` (plus, on
PostgreSQL, the deltas not folded yet), and its two partial hours at the edges. An edge is
counted from ``tx_process`` rows, either as the rows inside the window (added) or as its
hour's count less the rows outside the window (taken away), whichever reads fewer rows, as
far as the clock tells: for a window that ends now, the current hour is its count less the
rows created after now (none), so the report reads a few hundred rows whatever the table's
size. Every part is one statement, so it counts one snapshot of the database.

Folding (PostgreSQL): its triggers append a delta row per change of a transaction's state,
so writers never wait for one another; the counts read here add the deltas, so they are
exact at any time, and cheap while the deltas are few. ``fold`` moves the deltas into the
counts in one statement (what it deletes is what it adds, in one database transaction, so a
report sees either), one folder at a time (an advisory lock: another one skips). A resume run
folds as it ends; a report folds after it reads more than ``FOLD_AT`` waiting. SQLite's
triggers add to the counts directly: nothing to fold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tracking.models import TxCount, TxCountDelta
from tracking.reports.tables import TX

COUNT = TxCount.__table__
DELTA = TxCountDelta.__table__
HOUR = timedelta(hours=1)
FOLD_AT = 10_000
# pg_try_advisory_xact_lock key of the folder: "tx_count" in ASCII.
_FOLD_LOCK = 0x74785F636F756E74
_FOLD = sa.text("""
WITH moved AS (DELETE FROM tx_count_delta RETURNING process_code, created_hour, state, n)
INSERT INTO tx_count (process_code, created_hour, state, n)
SELECT process_code, created_hour, state, sum(n) FROM moved
 GROUP BY process_code, created_hour, state
 ORDER BY process_code, created_hour, state
ON CONFLICT (process_code, created_hour, state) DO UPDATE SET n = tx_count.n + excluded.n
""")


def floor_hour(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


@dataclass
class Plan:
    """How a window is counted: the hours ``[hours[0], hours[1])`` from the counts, plus the
    rows created in each ``added`` range, less those in each ``taken`` range."""

    hours: tuple[datetime, datetime] | None = None
    added: list[tuple[datetime, datetime]] = field(default_factory=list)
    taken: list[tuple[datetime, datetime]] = field(default_factory=list)


def _span(a: datetime, b: datetime, now: datetime) -> float:
    """How many seconds of rows ``[a, b)`` holds, as far as the clock tells (none after now)."""
    return max(0.0, (min(b, now) - a).total_seconds())


def plan(start: datetime, end: datetime, now: datetime) -> Plan:
    """The cheapest way to count ``[start, end)`` exactly (``now`` only guides the choice)."""
    p = Plan()
    if start >= end:
        return p
    first, last = floor_hour(start), floor_hour(end)
    if first == last and start != first:
        # Inside one hour: its rows, or the hour less the rows around them.
        h = first
        outside = [(a, b) for a, b in ((h, start), (end, h + HOUR)) if a < b]
        if _span(start, end, now) <= sum(_span(a, b, now) for a, b in outside):
            p.added.append((start, end))
        else:
            p.hours, p.taken = (h, h + HOUR), outside
        return p
    lo, hi = start, end
    if start != first:
        if _span(start, first + HOUR, now) <= _span(first, start, now):
            p.added.append((start, first + HOUR))
            lo = first + HOUR
        else:
            p.taken.append((first, start))
            lo = first
    if end != last:
        if _span(last, end, now) <= _span(end, last + HOUR, now):
            p.added.append((last, end))
            hi = last
        else:
            p.taken.append((end, last + HOUR))
            hi = last + HOUR
    if lo < hi:
        p.hours = (lo, hi)
    return p


def counts_query(start: datetime, end: datetime, now: datetime,
                 process: str | None = None) -> sa.Select[Any]:
    """(process_code, state, n, backlog) of the transactions created in ``[start, end)``
    (the states with any), ordered by process and state, in one statement; ``backlog``:
    whether to fold (more than ``FOLD_AT`` deltas wait)."""
    p = plan(start, end, now)
    parts: list[sa.Select[Any]] = []
    if p.hours is not None:
        for table in (COUNT, DELTA):
            q = sa.select(table.c.process_code, table.c.state, table.c.n.label("n")).where(
                table.c.created_hour >= p.hours[0], table.c.created_hour < p.hours[1])
            parts.append(q.where(table.c.process_code == process) if process else q)
    for ranges, sign in ((p.added, 1), (p.taken, -1)):
        for a, b in ranges:
            q = (sa.select(TX.c.process_code, TX.c.state, (sign * sa.func.count()).label("n"))
                 .where(TX.c.created_at >= a, TX.c.created_at < b)
                 .group_by(TX.c.process_code, TX.c.state))
            parts.append(q.where(TX.c.process_code == process) if process else q)
    if not parts:  # an empty window
        parts.append(sa.select(TX.c.process_code, TX.c.state, sa.literal(0).label("n"))
                     .where(sa.false()))
    every = sa.union_all(*parts).subquery("parts")
    total = sa.func.sum(every.c.n)
    # How many deltas wait to be folded (at most FOLD_AT + 1 counted), on every row.
    backlog = sa.select(sa.func.count()).select_from(
        sa.select(DELTA.c.id).limit(FOLD_AT + 1).subquery()).scalar_subquery()
    return (sa.select(every.c.process_code, every.c.state, total.label("n"),
                      backlog.label("backlog"))
            .group_by(every.c.process_code, every.c.state)
            .having(total != 0)
            .order_by(every.c.process_code, every.c.state))


def backlogged(rows: Sequence[Any]) -> bool:
    """Whether the rows of ``counts_query`` saw more than ``FOLD_AT`` deltas waiting."""
    return bool(rows) and rows[0].backlog > FOLD_AT


def fold(engine: Engine) -> int:
    """Fold the deltas into the counts; how many count rows changed (0 on SQLite, or when
    another folder is at it)."""
    if engine.dialect.name != "postgresql":
        return 0
    with engine.begin() as conn:
        if not conn.execute(sa.select(sa.func.pg_try_advisory_xact_lock(_FOLD_LOCK))).scalar():
            return 0
        return conn.execute(_FOLD).rowcount
