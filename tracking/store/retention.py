"""Retention: finished transactions older than a cutoff, archived and deleted in chunks.

Only a transaction in a final state (``states.FINAL_TX_STATES``) that finished before its
process's cutoff, with no stage reserved, running or due (``PURGEABLE``), is purged; waiting
and running ones never are. ``purge`` takes one chunk at a time, oldest first (on
``ix_tx_process_finished``), each in its own database transaction:

1. lock the chunk (its stages, then its transactions: the global lock order), re-checking
   under the lock that each one may still be purged;
2. read their stages and events (one statement each) and hand the records to the archive
   sink, which returns only once they are durable (written, flushed, fsynced);
3. list them in ``tx_purging`` (the only way past the append-only trigger of ``tx_event``),
   delete their events, stages and the transactions (a statement each), empty
   ``tx_purging``, and add the chunk to the run's ``tx_purge`` row;
4. commit.

A failure anywhere rolls back the chunk's deletion: what is deleted is always archived, and
the audit row counts exactly what is deleted. The locks are row locks of finished, idle
transactions (PostgreSQL), or SQLite's write lock for the length of one chunk, so workers
keep running.
"""

from __future__ import annotations

import uuid as uuid_lib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tracking.connections import read_only
from tracking.errors import TrackingError
from tracking.models import CatalogProcess, StageState, TxPurge, TxPurging, TxState
from tracking.states import FINAL_TX_STATES, in_order
from tracking.store.sql import EVENT, STAGE, TX, check_limit

PURGE = TxPurge.__table__
PURGING = TxPurging.__table__
CATALOG = CatalogProcess.__table__
DEFAULT_CHUNK = 500
MAX_CHUNK = 5_000

#: The records of one chunk (a dict per transaction with its ``stages`` and ``events``),
#: to be made durable before the sink returns.
Sink = Callable[[list[dict[str, Any]]], None]


@dataclass(frozen=True)
class Target:
    """Purge the transactions of ``process_code`` finished before ``cutoff``."""

    process_code: str
    older_than: timedelta
    cutoff: datetime


@dataclass(frozen=True)
class PurgePreview:
    """What a purge of ``process_code`` would delete, per transaction state."""

    process_code: str
    state: TxState
    transactions: int
    oldest_finished_at: datetime
    newest_finished_at: datetime


@dataclass(frozen=True)
class PurgeTotals:
    """What one purge run deleted of one process (its ``tx_purge`` row, None if nothing)."""

    process_code: str
    purge_id: int | None
    transactions: int = 0
    stages: int = 0
    events: int = 0
    chunks: int = 0


class PurgeStopped(TrackingError):
    """A purge stopped by an error: ``totals`` is what it had deleted (and archived) before;
    the chunk it was working on is untouched in the database."""

    def __init__(self, message: str, totals: list[PurgeTotals]) -> None:
        super().__init__(message)
        self.totals = totals


@dataclass(frozen=True)
class PurgeRecord:
    """One row of the purge audit trail (``tx_purge``)."""

    id: int
    run_id: str
    process_code: str
    older_than_seconds: float
    cutoff: datetime
    started_at: datetime
    purged_at: datetime
    finished_at: datetime | None
    chunks: int
    transactions: int
    stages: int
    events: int
    oldest_finished_at: datetime | None
    newest_finished_at: datetime | None
    archive_path: str | None
    archive_format: str | None
    actor: str | None


def check_chunk_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_CHUNK:
        raise ValueError(f"chunk size must be an int from 1 to {MAX_CHUNK}, got {size!r}")
    return size


#: A stage that keeps its transaction alive: reserved or running, or due to run.
BUSY_STAGE = sa.or_(STAGE.c.state == StageState.IN_PROGRESS, STAGE.c.next_attempt_at.is_not(None))


def purgeable(target: Target) -> sa.ColumnElement[bool]:
    """The transactions ``target`` purges: final, finished before the cutoff, none of their
    stages reserved, running or due."""
    busy = sa.select(STAGE.c.id).where(STAGE.c.uuid == TX.c.uuid, BUSY_STAGE).exists()
    return sa.and_(
        TX.c.process_code == target.process_code,
        TX.c.finished_at.is_not(None),
        TX.c.finished_at < target.cutoff,
        TX.c.state.in_(in_order(FINAL_TX_STATES)),
        ~busy,
    )


# -- reading -------------------------------------------------------------------------------


def retentions(engine: Engine) -> dict[str, float | None]:
    """Each process of the catalog with its retention in seconds (None: kept forever)."""
    with read_only(engine) as conn:
        rows = conn.execute(sa.select(CATALOG.c.code, CATALOG.c.retention_seconds)
                            .order_by(CATALOG.c.code))
        return {r.code: r.retention_seconds for r in rows}


def preview(engine: Engine, targets: Sequence[Target]) -> list[PurgePreview]:
    """What ``purge`` would delete now: one grouped statement per target."""
    found: list[PurgePreview] = []
    with read_only(engine) as conn:
        for target in targets:
            rows = conn.execute(
                sa.select(TX.c.state, sa.func.count().label("n"),
                          sa.func.min(TX.c.finished_at).label("oldest"),
                          sa.func.max(TX.c.finished_at).label("newest"))
                .where(purgeable(target))
                .group_by(TX.c.state)
                .order_by(TX.c.state)
            )
            found += [PurgePreview(target.process_code, TxState(r.state), r.n,
                                   _aware(r.oldest), _aware(r.newest)) for r in rows]
    return found


def _aware(value: Any) -> Any:
    # min()/max() bypass the column type on SQLite: a string or a naive datetime comes back.
    return PURGE.c.cutoff.type.process_result_value(
        datetime.fromisoformat(value) if isinstance(value, str) else value, None
    )


def history(engine: Engine, process_code: str | None = None, limit: int = 100
            ) -> list[PurgeRecord]:
    """The purge audit trail, newest first."""
    query = sa.select(PURGE).order_by(PURGE.c.started_at.desc(), PURGE.c.id.desc())
    if process_code is not None:
        query = query.where(PURGE.c.process_code == process_code)
    with read_only(engine) as conn:
        rows = conn.execute(query.limit(check_limit(limit))).all()
    return [PurgeRecord(**r._mapping) for r in rows]


# -- purging -------------------------------------------------------------------------------


def purge(
    engine: Engine,
    targets: Sequence[Target],
    sink: Sink,
    *,
    clock: Callable[[], datetime],
    chunk_size: int = DEFAULT_CHUNK,
    actor: str | None = None,
    archive_path: str | None = None,
    archive_format: str | None = None,
    on_chunk: Callable[[str, int], None] | None = None,
) -> list[PurgeTotals]:
    """Archive (through ``sink``) and delete what each target purges, a chunk at a time.

    Each target with something to purge gets one ``tx_purge`` row (one ``run_id`` for the
    run), updated with every chunk in that chunk's database transaction and marked finished
    at the end. ``on_chunk(process_code, transactions)`` is told of each chunk deleted.
    """
    chunk_size = check_chunk_size(chunk_size)
    run_id = str(uuid_lib.uuid4())
    started = clock()
    meta = {"run_id": run_id, "archive_path": archive_path, "archive_format": archive_format,
            "actor": actor, "started_at": started}
    results: list[PurgeTotals] = []
    for target in targets:
        totals = PurgeTotals(target.process_code, None)
        cursor: tuple[datetime, str] | None = None
        try:
            while True:
                with engine.begin() as conn:
                    cursor, totals, deleted = _chunk(conn, target, cursor, chunk_size, sink,
                                                     totals, meta, clock)
                if cursor is None:
                    break
                if deleted and on_chunk is not None:
                    on_chunk(target.process_code, deleted)
            if totals.purge_id is not None:
                with engine.begin() as conn:
                    conn.execute(sa.update(PURGE).where(PURGE.c.id == totals.purge_id)
                                 .values(finished_at=clock()))
        except Exception as exc:
            done = [*results, totals]
            purged = sum(t.transactions for t in done)
            raise PurgeStopped(
                f"the purge of {target.process_code} stopped after {purged} transaction(s) "
                f"in all (each one archived; the rest untouched): {exc}", done,
            ) from exc
        results.append(totals)
    return results


def _chunk(
    conn: Connection,
    target: Target,
    cursor: tuple[datetime, str] | None,
    size: int,
    sink: Sink,
    totals: PurgeTotals,
    meta: Mapping[str, Any],
    clock: Callable[[], datetime],
) -> tuple[tuple[datetime, str] | None, PurgeTotals, int]:
    """One chunk, in ``conn``'s database transaction: ``(cursor past it, totals, deleted)``;
    the cursor is None when nothing was left."""
    candidates = sa.select(TX.c.uuid, TX.c.finished_at).where(purgeable(target))
    if cursor is not None:
        at, last = cursor
        candidates = candidates.where(sa.or_(
            TX.c.finished_at > at, sa.and_(TX.c.finished_at == at, TX.c.uuid > last)))
    found = conn.execute(
        candidates.order_by(TX.c.finished_at, TX.c.uuid).limit(size)
    ).all()
    if not found:
        return None, totals, 0
    next_cursor = (found[-1].finished_at, found[-1].uuid)
    uuids = [r.uuid for r in found]
    postgres = conn.dialect.name == "postgresql"
    if postgres:  # the global lock order: stages, then the transaction
        conn.execute(sa.select(STAGE.c.id).where(STAGE.c.uuid.in_(uuids)).with_for_update())
    locked = sa.select(TX).where(TX.c.uuid.in_(uuids), purgeable(target)).order_by(
        TX.c.finished_at, TX.c.uuid)
    txs = conn.execute(locked.with_for_update(of=TX) if postgres else locked).all()
    if not txs:
        return next_cursor, totals, 0
    uuids = [t.uuid for t in txs]
    records = _records(conn, txs, uuids)
    sink(records)  # durable from here on: only now may the chunk be deleted
    counts = _delete_chunk(conn, uuids, target, totals, meta, clock())
    return next_cursor, counts, len(uuids)


def _records(conn: Connection, txs: Sequence[Any], uuids: list[str]) -> list[dict[str, Any]]:
    """Each transaction's columns with its ``stages`` and ``events``: three statements."""
    stages: dict[str, list[dict[str, Any]]] = {u: [] for u in uuids}
    events: dict[str, list[dict[str, Any]]] = {u: [] for u in uuids}
    for row in conn.execute(sa.select(STAGE).where(STAGE.c.uuid.in_(uuids))
                            .order_by(STAGE.c.uuid, STAGE.c.seq)):
        stages[row.uuid].append(dict(row._mapping))
    for row in conn.execute(sa.select(EVENT).where(EVENT.c.uuid.in_(uuids))
                            .order_by(EVENT.c.uuid, EVENT.c.id)):
        events[row.uuid].append(dict(row._mapping))
    return [dict(t._mapping) | {"stages": stages[t.uuid], "events": events[t.uuid]}
            for t in txs]


def _delete_chunk(
    conn: Connection,
    uuids: list[str],
    target: Target,
    totals: PurgeTotals,
    meta: Mapping[str, Any],
    now: datetime,
) -> PurgeTotals:
    """Delete these (locked, archived) transactions with their stages and events, and record
    it in the run's ``tx_purge`` row: in the caller's database transaction."""
    finished = conn.execute(
        sa.select(sa.func.min(TX.c.finished_at), sa.func.max(TX.c.finished_at))
        .where(TX.c.uuid.in_(uuids))
    ).one()
    oldest, newest = _aware(finished[0]), _aware(finished[1])
    purge_id = totals.purge_id
    if purge_id is None:
        purge_id = conn.execute(
            sa.insert(PURGE).values(
                process_code=target.process_code,
                older_than_seconds=target.older_than.total_seconds(), cutoff=target.cutoff,
                purged_at=now, chunks=0, transactions=0, stages=0, events=0,
                oldest_finished_at=oldest, **meta,
            ).returning(PURGE.c.id)
        ).scalar_one()
    conn.execute(sa.insert(PURGING).from_select(
        ["uuid", "purge_id"],
        sa.select(TX.c.uuid, sa.literal(purge_id, sa.Integer)).where(TX.c.uuid.in_(uuids)),
    ))
    events = conn.execute(sa.delete(EVENT).where(EVENT.c.uuid.in_(uuids))).rowcount
    stages = conn.execute(sa.delete(STAGE).where(STAGE.c.uuid.in_(uuids))).rowcount
    transactions = conn.execute(sa.delete(TX).where(TX.c.uuid.in_(uuids))).rowcount
    conn.execute(sa.delete(PURGING).where(PURGING.c.purge_id == purge_id))
    if transactions != len(uuids):  # they were locked: cannot happen, but never half-done
        raise RuntimeError(f"purge deleted {transactions} of {len(uuids)} locked transactions")
    totals = PurgeTotals(
        target.process_code, purge_id, totals.transactions + transactions,
        totals.stages + stages, totals.events + events, totals.chunks + 1,
    )
    conn.execute(
        sa.update(PURGE).where(PURGE.c.id == purge_id).values(
            purged_at=now, chunks=totals.chunks, transactions=totals.transactions,
            stages=totals.stages, events=totals.events, newest_finished_at=newest,
        )
    )
    return totals


__all__ = ["DEFAULT_CHUNK", "MAX_CHUNK", "PurgePreview", "PurgeRecord", "PurgeStopped",
           "PurgeTotals", "Sink",
           "Target", "check_chunk_size", "history", "preview", "purge", "purgeable",
           "retentions"]
