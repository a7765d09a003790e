"""Leases: giving reservations back, and recovering the stages of dead runs.

    release     reserved -> back to runnable with its attempts intact (a RELEASED event)
    recover     an expired reservation is released; an expired started attempt is lost
                (a LEASE_EXPIRED system error, see ``transitions.record_lost_attempt``)

Both find their stages on ``ix_tx_stage_lease`` (``_expired``, ``_held``).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tracking.connections import read_only
from tracking.models import EventKind, StageState
from tracking.states import released_state
from tracking.store.driver import execute, fetch
from tracking.store.sql import (
    CHUNK,
    EVENT,
    NOW,
    OWNER,
    PLATFORM,
    PROCESS,
    RESERVED,
    STAGE,
    TX,
    any_of,
    check_limit,
    lock,
)
from tracking.store.transitions import record_lost_attempt

EXPIRED_RESERVATION = "reservation expired before the attempt started (its run stopped)"


# The statements below are built once (``functools.cache``) and run on the driver
# (``tracking.store.driver``): a claim gives back expired reservations first, every time, and
# building and hashing its statements cost more than running them.


def _held() -> list[Any]:
    """Conditions of the stages of a process that an owner holds."""
    return [
        STAGE.c.process_code == PROCESS,
        STAGE.c.lease_expires_at.is_not(None),
        STAGE.c.lease_owner == OWNER,
    ]


def _expired(by_platform: bool) -> list[Any]:
    """Conditions of the stages of a process (of one platform) whose lease expired
    (ix_tx_stage_lease)."""
    where = [
        STAGE.c.process_code == PROCESS,
        STAGE.c.lease_expires_at.is_not(None),
        STAGE.c.lease_expires_at <= NOW,
        STAGE.c.state == StageState.IN_PROGRESS,
    ]
    return [*where, STAGE.c.platform == PLATFORM] if by_platform else where


@functools.cache
def _releasing(expired: bool, by_platform: bool, by_uuids: bool, skip_locked: bool
               ) -> sa.Update:
    """Reserved stages back to runnable: the expired reservations of a process (of one
    platform), or those an owner holds (of some transactions); their ids.

    ``skip_locked`` (PostgreSQL) leaves rows another transaction holds for a later call:
    expired reservations are given back by whoever comes along (a claim, a recovery), which
    must not wait or deadlock.
    """
    where = _expired(by_platform) if expired else _held()
    if by_uuids:
        where.append(any_of(STAGE.c.uuid, "b_uuids"))
    matching: Any = sa.and_(*where, RESERVED)
    if skip_locked:
        locked = sa.select(STAGE.c.id).where(matching).with_for_update(skip_locked=True)
        matching = sa.and_(STAGE.c.id.in_(locked.scalar_subquery()), RESERVED)
    return (
        sa.update(STAGE)
        .where(matching)
        .values(
            state=sa.case(
                (STAGE.c.error_code.is_(None), released_state(had_error=False).value),
                else_=released_state(had_error=True).value,
            ),
            next_attempt_at=NOW,
            # lease_owner stays: the releasing run is not handed the stage again.
            lease_expires_at=None,
            updated_at=NOW,
        )
        .returning(STAGE.c.id)
    )


# The RELEASED events of just-released stages (one INSERT ... SELECT).
_RELEASED_EVENTS = sa.insert(EVENT).from_select(
    ["uuid", "process_code", "kind", "platform", "stage", "attempt", "description",
     "from_state", "to_state", "tx_state", "actor", "created_at"],
    sa.select(
        STAGE.c.uuid, STAGE.c.process_code, sa.literal(EventKind.RELEASED.value),
        STAGE.c.platform, STAGE.c.stage, STAGE.c.attempt,
        sa.bindparam("b_description", type_=EVENT.c.description.type),
        sa.literal(StageState.IN_PROGRESS.value), STAGE.c.state, TX.c.state,
        STAGE.c.lease_owner, NOW,
    )
    .join(TX, TX.c.uuid == STAGE.c.uuid)
    .where(any_of(STAGE.c.id, "b_ids")),
)


def release_held(engine: Engine, process_code: str, owner: str, description: str,
                 now: datetime, uuids: Sequence[str] | None = None) -> int:
    """Give back the stages of ``process_code`` that ``owner`` reserved and has not started
    (of these transactions only, when ``uuids`` is given, each chunk of 500 in a
    transaction of its own)."""
    params = {"b_process": process_code, "b_owner": owner, "b_now": now}
    if uuids is None:
        with engine.begin() as conn:
            return release_in(conn, _releasing(False, False, False, False), params,
                              description, now)
    released = 0
    for i in range(0, len(uuids), CHUNK):
        with engine.begin() as conn:
            released += release_in(conn, _releasing(False, False, True, False),
                                   {**params, "b_uuids": list(uuids[i : i + CHUNK])},
                                   description, now)
    return released


def release_expired(engine: Engine, process_code: str, platform: str | None,
                    now: datetime) -> int:
    """Give back the expired reservations of ``process_code`` (of one platform)."""
    with engine.begin() as conn:
        return release_expired_in(conn, process_code, platform, now)


def release_expired_in(conn: Connection, process_code: str, platform: str | None,
                       now: datetime) -> int:
    """``release_expired`` in the caller's database transaction (a claim's)."""
    statement = _releasing(True, platform is not None, False,
                           conn.dialect.name == "postgresql")
    params = {"b_process": process_code, "b_now": now}
    if platform is not None:
        params["b_platform"] = platform
    return release_in(conn, statement, params, EXPIRED_RESERVATION, now)


def release_in(conn: Connection, statement: sa.Update, params: dict[str, Any],
               description: str, now: datetime) -> int:
    """Run a ``_releasing`` statement, and write the RELEASED events of what it gave back."""
    ids = [row.id for row in fetch(conn, statement, params)]
    for i in range(0, len(ids), CHUNK):
        execute(conn, _RELEASED_EVENTS,
                {"b_ids": ids[i : i + CHUNK], "b_description": description, "b_now": now})
    return len(ids)


@functools.cache
def _lost(by_platform: bool) -> sa.Select[Any]:
    """The transactions of started attempts whose lease expired."""
    return (
        sa.select(STAGE.c.uuid)
        .where(*_expired(by_platform), STAGE.c.started_at.is_not(None))
        .limit(sa.bindparam("b_limit", type_=sa.Integer))
    )


def recover_lost_attempts(engine: Engine, process_code: str, platform: str | None,
                          limit: int, clock: Callable[[], datetime], rng: random.Random) -> int:
    """Record the started attempts whose lease expired as lost (one transaction each)."""
    now = clock()
    params: dict[str, Any] = {"b_process": process_code, "b_now": now,
                              "b_limit": check_limit(limit, 100_000)}
    if platform is not None:
        params["b_platform"] = platform
    with read_only(engine) as conn:
        lost = [row.uuid for row in fetch(conn, _lost(platform is not None), params)]
    recovered = 0
    for uuid in lost:
        with engine.begin() as conn:
            stages, tx = lock(conn, uuid)
            recovered += record_lost_attempt(conn, tx, stages, now, rng)
    return recovered
