"""The cursors of the event outbox (``tracking.store.outbox``), one row of
``tx_event_cursor`` each: how far its emitter has read the audit trail, and who holds it.

An emitter takes a cursor with one UPDATE (``acquire``: the row lock on PostgreSQL, SQLite's
write lock under ``BEGIN IMMEDIATE``, so two cannot both take it) and holds it for a lease,
renewed by every ``advance``; ``advance`` and ``mark_overdue_sent`` change it only while the
owner holds it (and ``advance`` only from the position it read), so an emitter whose lease ran
out and was taken over changes nothing.
"""

from __future__ import annotations

import os
import socket
import uuid as uuid_lib
from collections.abc import Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tracking.connections import read_only
from tracking.models import TxEventCursor, TxOverdueSent
from tracking.store.sql import insert_for

CURSOR = TxEventCursor.__table__
SENT_OVERDUE = TxOverdueSent.__table__
PREFECT = "prefect"  # the cursor of the Prefect events (tracking.prefect_events)


def default_owner() -> str:
    """Who holds a cursor: ``<host>:<pid>:<random>`` (one emitter call)."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid_lib.uuid4().hex[:8]}"


def ensure_cursor(conn: Connection, name: str, now: datetime) -> None:
    # A missing cursor (a database emptied by hand) starts at the beginning of the trail.
    conn.execute(
        insert_for(conn.dialect, CURSOR)
        .values(name=name, last_event_id=0, sent=0, updated_at=now)
        .on_conflict_do_nothing(index_elements=["name"])
    )


def acquire(engine: Engine, name: str, owner: str, now: datetime, lease: float) -> int | None:
    """Take the cursor for ``owner`` unless another holds it; its position, or None."""
    with engine.begin() as conn:
        ensure_cursor(conn, name, now)
        return conn.execute(
            sa.update(CURSOR)
            .where(
                CURSOR.c.name == name,
                sa.or_(CURSOR.c.owner.is_(None), CURSOR.c.owner == owner,
                       CURSOR.c.lease_expires_at <= now),
            )
            .values(owner=owner, lease_expires_at=now + timedelta(seconds=lease),
                    updated_at=now)
            .returning(CURSOR.c.last_event_id)
        ).scalar()


def advance(engine: Engine, name: str, owner: str, expected: int, position: int, sent: int,
             now: datetime, lease: float) -> bool:
    """Move the cursor from ``expected`` to ``position`` if ``owner`` still holds it there."""
    with engine.begin() as conn:
        done = conn.execute(
            sa.update(CURSOR)
            .where(CURSOR.c.name == name, CURSOR.c.owner == owner,
                   CURSOR.c.last_event_id == expected)
            .values(last_event_id=position, sent=CURSOR.c.sent + sent,
                    lease_expires_at=now + timedelta(seconds=lease), updated_at=now)
        )
    return done.rowcount == 1


def mark_overdue_sent(engine: Engine, name: str, owner: str,
                      sent: Sequence[tuple[str, datetime]], now: datetime, lease: float) -> bool:
    """Record that the going overdue of these ``(uuid, due_at)`` was sent, if ``owner``
    still holds the cursor (its lease renewed)."""
    with engine.begin() as conn:
        held = conn.execute(
            sa.update(CURSOR)
            .where(CURSOR.c.name == name, CURSOR.c.owner == owner)
            .values(sent=CURSOR.c.sent + len(sent),
                    lease_expires_at=now + timedelta(seconds=lease), updated_at=now)
        ).rowcount == 1
        if held and sent:
            insert = insert_for(conn.dialect, SENT_OVERDUE)
            conn.execute(
                insert.on_conflict_do_update(
                    index_elements=["uuid"],
                    set_={"due_at": insert.excluded.due_at, "sent_at": insert.excluded.sent_at},
                ),
                [{"uuid": uuid, "due_at": due_at, "sent_at": now} for uuid, due_at in sent],
            )
    return held


def release(engine: Engine, name: str, owner: str, now: datetime) -> None:
    """Let go of the cursor (if ``owner`` holds it)."""
    with engine.begin() as conn:
        conn.execute(
            sa.update(CURSOR)
            .where(CURSOR.c.name == name, CURSOR.c.owner == owner)
            .values(owner=None, lease_expires_at=None, updated_at=now)
        )


def position(engine: Engine, name: str) -> int:
    """Where the cursor is (0 when it has no row yet)."""
    with read_only(engine) as conn:
        value = conn.execute(
            sa.select(CURSOR.c.last_event_id).where(CURSOR.c.name == name)
        ).scalar()
    return value or 0
