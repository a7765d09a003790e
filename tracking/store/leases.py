"""Leases: giving reservations back, and recovering the stages of dead runs.

    release     reserved -> back to runnable with its attempts intact (a RELEASED event)
    recover     an expired reservation is released; an expired started attempt is lost
                (a LEASE_EXPIRED system error, see ``transitions.record_lost_attempt``)

Both find their stages on ``ix_tx_stage_lease`` (``expired_leases``, ``held_by``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tracking.db import read_only
from tracking.models import EventKind, StageState
from tracking.states import released_state
from tracking.store.sql import CHUNK, EVENT, RESERVED, STAGE, TX, check_limit, lock
from tracking.store.transitions import record_lost_attempt

EXPIRED_RESERVATION = "reservation expired before the attempt started (its run stopped)"


def held_by(process_code: str, owner: str) -> list[Any]:
    """Conditions of the stages of a process that ``owner`` holds."""
    return [
        STAGE.c.process_code == process_code,
        STAGE.c.lease_expires_at.is_not(None),
        STAGE.c.lease_owner == owner,
    ]


def expired_leases(process_code: str, platforms: list[str] | None, now: datetime) -> list[Any]:
    """Conditions of the stages of ``process_code`` whose lease expired (ix_tx_stage_lease)."""
    where = [
        STAGE.c.process_code == process_code,
        STAGE.c.lease_expires_at.is_not(None),
        STAGE.c.lease_expires_at <= now,
        STAGE.c.state == StageState.IN_PROGRESS,
    ]
    if platforms:
        where.append(STAGE.c.platform.in_(platforms))
    return where


def release(engine: Engine, where: list[Any], description: str, now: datetime, *,
            uuids: Sequence[str] | None = None, skip_locked: bool = False) -> int:
    """Give back the reserved stages matching ``where`` (of these transactions only, when
    ``uuids`` is given), each in a transaction of at most 500 uuids."""
    if uuids is None:
        with engine.begin() as conn:
            return release_in(conn, where, description, now, skip_locked=skip_locked)
    released = 0
    for i in range(0, len(uuids), CHUNK):
        chunk = [*where, STAGE.c.uuid.in_(list(uuids[i : i + CHUNK]))]
        with engine.begin() as conn:
            released += release_in(conn, chunk, description, now, skip_locked=skip_locked)
    return released


def release_in(
    conn: Connection, where: list[Any], description: str, now: datetime, *, skip_locked: bool
) -> int:
    """Reserved stages matching ``where`` back to runnable, with their RELEASED events.

    ``skip_locked`` leaves rows another transaction holds (PostgreSQL) for a later call: a
    claim that gives back expired reservations of other runs must not wait or deadlock.
    """
    matching: Any = sa.and_(*where, RESERVED)
    if skip_locked and conn.dialect.name == "postgresql":
        locked = sa.select(STAGE.c.id).where(matching).with_for_update(skip_locked=True)
        matching = sa.and_(STAGE.c.id.in_(locked.scalar_subquery()), RESERVED)
    released = (
        sa.update(STAGE)
        .where(matching)
        .values(
            state=sa.case(
                (STAGE.c.error_code.is_(None), released_state(had_error=False).value),
                else_=released_state(had_error=True).value,
            ),
            next_attempt_at=now,
            # lease_owner stays: the releasing run is not handed the stage again.
            lease_expires_at=None,
            updated_at=now,
        )
        .returning(STAGE.c.id)
    )
    ids = conn.execute(released).scalars().all()
    for i in range(0, len(ids), CHUNK):
        conn.execute(_released_events(ids[i : i + CHUNK], description, now))
    return len(ids)


def _released_events(ids: Sequence[int], description: str, now: datetime) -> sa.Insert:
    """The RELEASED events of these just-released stages (one INSERT ... SELECT)."""
    source = (
        sa.select(
            STAGE.c.uuid, STAGE.c.process_code, sa.literal(EventKind.RELEASED.value),
            STAGE.c.platform, STAGE.c.stage, STAGE.c.attempt, sa.literal(description),
            sa.literal(StageState.IN_PROGRESS.value), STAGE.c.state, TX.c.state,
            STAGE.c.lease_owner, sa.literal(now, type_=EVENT.c.created_at.type),
        )
        .join(TX, TX.c.uuid == STAGE.c.uuid)
        .where(STAGE.c.id.in_(list(ids)))
    )
    columns = ["uuid", "process_code", "kind", "platform", "stage", "attempt", "description",
               "from_state", "to_state", "tx_state", "actor", "created_at"]
    return sa.insert(EVENT).from_select(columns, source)


def recover_lost_attempts(engine: Engine, process_code: str, platforms: list[str] | None,
                          limit: int, clock: Callable[[], datetime], rng: random.Random) -> int:
    """Record the started attempts whose lease expired as lost (one transaction each)."""
    now = clock()
    query = sa.select(STAGE.c.uuid).where(
        *expired_leases(process_code, platforms, now), STAGE.c.started_at.is_not(None)
    )
    with read_only(engine) as conn:
        lost = conn.execute(query.limit(check_limit(limit, 100_000))).scalars().all()
    recovered = 0
    for uuid in lost:
        with engine.begin() as conn:
            stages, tx = lock(conn, uuid)
            recovered += record_lost_attempt(conn, tx, stages, now, rng)
    return recovered
