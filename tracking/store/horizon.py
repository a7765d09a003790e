"""How far the audit trail is settled: the highest ``tx_event`` id up to which every event
that will ever exist is committed, so a reader past a cursor (``tracking.store.outbox``)
can move the cursor there and miss nothing.

* SQLite: writers are serialised (``BEGIN IMMEDIATE``), so every id below the highest
  committed one is final: the horizon is ``max(id)``.
* PostgreSQL: ids come from a sequence when rows are inserted, and transactions commit in any
  order, so an id may commit after a higher one is visible (a reader that moved past it
  would never see it). The horizon is ``max(id)`` when the ids after the cursor run without
  a gap. A gap is a writer still busy, or one rolled back (for ever): it is waited out, first
  for the transactions in progress to end (``pg_xact_status``, no lock, at most
  ``SETTLE_SECONDS``), then for a moment under ``LOCK TABLE tx_event IN SHARE MODE``, which
  is granted once no transaction that inserted an event is open (new ones wait, at most
  ``BARRIER_LOCK_TIMEOUT``): ``max(id)`` read then is settled. If the lock is not granted
  in time, the horizon stops before the gap and the next reader goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tracking.connections import read_only
from tracking.store.sql import EVENT

SETTLE_SECONDS = 5.0  # how long to wait for PostgreSQL writers in flight before the barrier
BARRIER_LOCK_TIMEOUT = "2s"  # longest a barrier may hold up writers (PostgreSQL)
_POLL_SECONDS = 0.2


def settled_horizon(
    engine: Engine, after: int, *, settle_seconds: float = SETTLE_SECONDS,
    lock_timeout: str = BARRIER_LOCK_TIMEOUT, sleep: Callable[[float], None] = time.sleep,
) -> int:
    """The highest audit event id up to which nothing more can appear: every event with
    ``after < id <= horizon`` that will ever exist is committed now (see the module doc)."""
    with read_only(engine) as conn:
        if conn.dialect.name != "postgresql":  # SQLite: writers are serialised
            return max(after, conn.execute(sa.select(sa.func.max(EVENT.c.id))).scalar() or 0)
        top, count = conn.execute(
            sa.select(sa.func.max(EVENT.c.id), sa.func.count()).where(EVENT.c.id > after)
        ).one()
        if top is None:
            return after
        if count == top - after:  # no gap: all committed
            return top
        snapshot = conn.exec_driver_sql("SELECT pg_current_snapshot()::text").scalar()
    _wait_for_writers(engine, snapshot, settle_seconds, sleep)
    barrier = _barrier(engine, lock_timeout)
    if barrier is not None:
        return max(after, barrier)
    return _end_of_run(engine, after)


def _wait_for_writers(engine: Engine, snapshot: str, seconds: float,
                      sleep: Callable[[float], None]) -> None:
    """Wait (up to ``seconds``) until the transactions in progress at ``snapshot`` ended."""
    deadline = time.monotonic() + seconds
    query = sa.text(
        "SELECT count(*) FROM pg_snapshot_xip(CAST(:s AS pg_snapshot)) AS x "
        "WHERE pg_xact_status(x) = 'in progress'"
    )
    while True:
        with read_only(engine) as conn:
            if not conn.execute(query, {"s": snapshot}).scalar():
                return
        if time.monotonic() >= deadline:
            return
        sleep(_POLL_SECONDS)


def _barrier(engine: Engine, lock_timeout: str) -> int | None:
    """The highest audit event id once no transaction is inserting one (PostgreSQL: under
    ``SHARE`` mode, which waits for every ``ROW EXCLUSIVE`` holder), or None if the lock was
    not granted within ``lock_timeout``. Held for one statement."""
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{lock_timeout}'")
            conn.exec_driver_sql("LOCK TABLE tx_event IN SHARE MODE")
            return conn.execute(sa.select(sa.func.max(EVENT.c.id))).scalar() or 0
    except sa.exc.OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) == "55P03":  # lock_not_available
            return None
        raise


def _end_of_run(engine: Engine, after: int) -> int:
    """The last id of the run of consecutive ids right after ``after`` (``after`` itself if
    ``after + 1`` does not exist): visible consecutive ids hide nothing between them."""
    nxt = EVENT.alias("n")
    with read_only(engine) as conn:
        first = conn.execute(sa.select(sa.func.min(EVENT.c.id)).where(EVENT.c.id > after)
                             ).scalar()
        if first != after + 1:
            return after
        end = conn.execute(
            sa.select(sa.func.min(EVENT.c.id)).where(
                EVENT.c.id > after,
                ~sa.exists().where(nxt.c.id == EVENT.c.id + 1),
            )
        ).scalar()
    return end if end is not None else after
