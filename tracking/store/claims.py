"""Claims and leases: reserving runnable stages for one run, starting attempts, keeping
reservations alive, giving them back, and recovering the stages of dead runs.

An attempt counts when it starts, not when it is reserved::

    claim       PENDING|TERMINATED -> IN_PROGRESS, started_at NULL (reserved, attempt unchanged)
    start       reserved -> started: attempt + 1, lease = now + lease_seconds (a stuck call
                loses it then)
    renew       a live run keeps its reservations' leases from expiring
    release     reserved -> back to runnable with its attempts intact (a RELEASED event)
    recover     an expired reservation is released; an expired started attempt is lost
                (a LEASE_EXPIRED system error, see ``transitions.record_lost_attempt``)

Releasing and recovering are in ``tracking.store.leases``.

Finding work is an indexed statement whose cost follows the claim's limit, not the table
(PostgreSQL ``FOR UPDATE SKIP LOCKED``; SQLite serialises writers with ``BEGIN IMMEDIATE``):
first the *overdue* due stages (their transaction's ``due_at`` passed), earliest due time
first, on ``ix_tx_stage_overdue``; then, if the limit is not reached, the due stages in the
normal order on ``ix_tx_stage_runnable``: higher priority first, then oldest due.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tracking.connections import read_only, write_transaction
from tracking.errors import LeaseLost
from tracking.models import StageState, TxProcess, TxStage, TxState, from_row
from tracking.store.driver import Conn, execute, fetch
from tracking.store.leases import release_expired_in
from tracking.store.sql import (
    CHUNK,
    NOW,
    OWNER,
    PLATFORM,
    PROCESS,
    RESERVED,
    RUNNABLE,
    STAGE,
    TX,
    any_of,
    as_dicts,
)

# Starts the attempts of reserved stages of one platform stage (one or many).
_START_ATTEMPTS = (
    sa.update(STAGE)
    .where(
        any_of(STAGE.c.uuid, "b_uuids"),
        STAGE.c.platform == sa.bindparam("b_platform"),
        STAGE.c.stage == sa.bindparam("b_stage"),
        STAGE.c.lease_owner == sa.bindparam("b_owner"),
        RESERVED,
    )
    .values(
        attempt=STAGE.c.attempt + 1,
        started_at=sa.bindparam("b_now"),
        lease_expires_at=sa.bindparam("b_expires"),
        updated_at=sa.bindparam("b_now"),
    )
    .returning(STAGE.c.uuid, STAGE.c.attempt)
)


#: The claim order of due stages (``ix_tx_stage_runnable``'s order).
CLAIM_ORDER = (STAGE.c.priority.desc(), STAGE.c.next_attempt_at, STAGE.c.id)


def runnable(process_code: str, platform: str, stage: str, now: datetime) -> sa.Select[Any]:
    """Ids of the due stages of one platform stage, higher priority first, then oldest due
    (an index scan of ix_tx_stage_runnable in its order that stops after the caller's
    limit)."""
    return sa.select(STAGE.c.id).where(*_due(process_code, platform, stage, now)).order_by(
        *CLAIM_ORDER
    )


def overdue(process_code: str, platform: str, stage: str, now: datetime) -> sa.Select[Any]:
    """Ids of the due stages of one platform stage whose transaction is overdue, earliest
    ``due_at`` first (a range scan of ix_tx_stage_overdue: it reads overdue stages only)."""
    return (
        sa.select(STAGE.c.id)
        .where(*_due(process_code, platform, stage, now),
               STAGE.c.due_at.is_not(None), STAGE.c.due_at <= now)
        .order_by(STAGE.c.due_at, STAGE.c.next_attempt_at, STAGE.c.id)
    )


def _due(process_code: str, platform: str, stage: str, now: datetime) -> list[Any]:
    """Conditions of the stages of one platform stage that are due now."""
    return [
        STAGE.c.process_code == process_code,
        STAGE.c.platform == platform,
        STAGE.c.stage == stage,
        STAGE.c.next_attempt_at.is_not(None),
        STAGE.c.next_attempt_at <= now,
    ]


def claimable(process_code: Any, platform: Any, stage: Any, owner: Any, now: Any,
              uuid: Any | None, limit: Any, *, overdue_only: bool = False) -> sa.Select[Any]:
    """What ``claim`` may take (only the overdue, with ``overdue_only``): due, and not last
    tried by ``owner`` (an owner stands for one run, so a failing stage is retried by a
    later run, never in a tight loop). Each argument is a value or a bound parameter."""
    query = (overdue if overdue_only else runnable)(process_code, platform, stage, now).where(
        sa.or_(STAGE.c.lease_owner.is_(None), STAGE.c.lease_owner != owner)
    )
    if uuid is not None:
        query = query.where(STAGE.c.uuid == uuid)
    return query.limit(limit)


def one_open_stage(uuid: str, platform: str, stage: str) -> sa.Select[Any]:
    """This stage, if it can be retried right away (Prefect's in-run retries)."""
    return sa.select(STAGE.c.id).where(
        STAGE.c.uuid == uuid,
        STAGE.c.platform == platform,
        STAGE.c.stage == stage,
        RUNNABLE,
        STAGE.c.next_attempt_at.is_not(None),
    )


class Reservation(NamedTuple):
    """A stage reserved for a run, with what its platform call needs from the transaction
    (``Tracker.reserve``): read narrow, so a batch of them costs a fraction of the whole
    ``TxStage`` rows ``Tracker.claim`` gives (and a named tuple: a batch makes hundreds).
    ``started_at`` is set when its attempt was started with the reservation
    (``reserve(start=True)``): ``attempt`` is then that attempt's number, and ``tx_state``
    the transaction's state before it started."""

    id: int
    uuid: str
    process_code: str
    platform: str
    stage: str
    attempt: int
    business_key: str
    tx_state: TxState
    payload: dict[str, Any]
    started_at: datetime | None = None


# reserve unpacks these by position: change the order in both places.
_RESERVED_COLUMNS = (STAGE.c.id, STAGE.c.uuid, STAGE.c.process_code, STAGE.c.platform,
                     STAGE.c.stage, STAGE.c.attempt, STAGE.c.priority)
_TXS_OF_CLAIMED = sa.select(TX).where(any_of(TX.c.uuid, "b_uuids"))
_TX_OF_RESERVED = sa.select(TX.c.uuid, TX.c.business_key, TX.c.state, TX.c.payload).where(
    any_of(TX.c.uuid, "b_uuids")
)
_TXS_STARTED = sa.update(TX).where(
    any_of(TX.c.uuid, "b_uuids"),
    sa.or_(TX.c.state == TxState.PENDING, TX.c.state == TxState.TERMINATED),  # driver: no IN
).values(state=TxState.IN_PROGRESS, updated_at=sa.bindparam("b_now"))


# The other parameters of the claiming statements (built once, run on the driver).
_UUID, _EXPIRES = sa.bindparam("b_uuid"), sa.bindparam("b_expires", type_=NOW.type)
_LIMIT = sa.bindparam("b_limit", type_=sa.Integer)


@functools.cache
def _claiming(overdue_only: bool, by_uuid: bool, narrow: bool, start: bool,
              postgresql: bool) -> sa.Update:
    """The statement that reserves a claim's candidates (``claimable``) of one platform
    stage, returning ``_RESERVED_COLUMNS`` (``narrow``) or the whole stages."""
    candidates = claimable(PROCESS, PLATFORM, sa.bindparam("b_stage"), OWNER, NOW,
                           _UUID if by_uuid else None, _LIMIT, overdue_only=overdue_only)
    return _reserving(candidates, _RESERVED_COLUMNS if narrow else tuple(STAGE.c), start,
                      postgresql)


@functools.cache
def _claiming_one(postgresql: bool) -> sa.Update:
    """The statement of ``claim_one``."""
    return _reserving(one_open_stage(_UUID, PLATFORM, sa.bindparam("b_stage")),
                      tuple(STAGE.c), False, postgresql)


def _reserving(candidates: sa.Select[Any], columns: Sequence[Any], start: bool,
               postgresql: bool) -> sa.Update:
    """Reserve the stages ``candidates`` selects for ``b_owner`` until ``b_expires``; with
    ``start``, their attempts start too (counted, ``started_at`` now)."""
    if postgresql:
        candidates = candidates.with_for_update(skip_locked=True)
    values: dict[str, Any] = {
        "state": StageState.IN_PROGRESS, "next_attempt_at": None, "lease_owner": OWNER,
        "lease_expires_at": _EXPIRES, "started_at": None, "updated_at": NOW,
    }
    if start:
        values.update(started_at=NOW, attempt=STAGE.c.attempt + 1)
    return (
        sa.update(STAGE)
        .where(STAGE.c.id.in_(candidates.scalar_subquery()), RUNNABLE)
        .values(values)
        .returning(*columns)
    )


class Claim(NamedTuple):
    """What one claim reserves: up to ``limit`` due stages of one platform stage (of one
    transaction, with ``uuid``) for ``owner``, leased for ``lease_seconds`` from ``now``."""

    process_code: str
    platform: str
    stage: str
    owner: str
    lease_seconds: float
    now: datetime
    limit: int
    uuid: str | None = None


def _reserve(conn: Connection, request: Claim, narrow: bool, start: bool = False) -> list[Any]:
    """Give back the platform's expired reservations, then reserve the overdue candidates and,
    if the limit is not reached, the others; the rows by priority within each, then id."""
    release_expired_in(conn, request.process_code, request.platform, request.now)
    params: dict[str, Any] = {
        "b_process": request.process_code, "b_platform": request.platform,
        "b_stage": request.stage, "b_owner": request.owner, "b_now": request.now,
        "b_expires": request.now + timedelta(seconds=request.lease_seconds),
    }
    if request.uuid is not None:
        params["b_uuid"] = request.uuid
    postgresql = conn.dialect.name == "postgresql"
    rows: list[Any] = []
    for overdue_only in (True, False):
        if len(rows) >= request.limit:
            break
        params["b_limit"] = request.limit - len(rows)
        statement = _claiming(overdue_only, request.uuid is not None, narrow, start, postgresql)
        rows += sorted(fetch(conn, statement, params), key=_claim_order)
    return rows


def _claim_order(row: Any) -> tuple[int, int]:
    return -row.priority, row.id


def claim(engine: Engine, request: Claim) -> list[TxStage]:
    """Reserve what ``request`` says, with the stages' transactions loaded (``Tracker.claim``)."""
    with engine.begin() as conn:
        return _with_transactions(conn, _reserve(conn, request, narrow=False))


def claim_one(engine: Engine, uuid: str, platform: str, stage: str, owner: str,
              lease_seconds: float, now: datetime) -> TxStage | None:
    """Reserve this one stage if it can run now, even if not due (``Tracker.claim_stage``)."""
    params = {"b_uuid": uuid, "b_platform": platform, "b_stage": stage, "b_owner": owner,
              "b_now": now, "b_expires": now + timedelta(seconds=lease_seconds)}
    with engine.begin() as conn:
        rows = fetch(conn, _claiming_one(conn.dialect.name == "postgresql"), params)
        claimed = _with_transactions(conn, rows)
    return claimed[0] if claimed else None


def _with_transactions(conn: Connection, rows: list[Any]) -> list[TxStage]:
    """The claimed stages, each with its transaction set on it."""
    if not rows:
        return []
    found = fetch(conn, _TXS_OF_CLAIMED, {"b_uuids": [r.uuid for r in rows]})
    txs = {t["uuid"]: t for t in as_dicts(found)}
    stages = []
    for values in as_dicts(rows):
        # The rows come from the database: built without validation (10x faster; a claim
        # of 500 spent most of its time validating), the transaction set on the instance.
        s = from_row(TxStage, values)
        s.__dict__["transaction"] = from_row(TxProcess, dict(txs[values["uuid"]]))
        stages.append(s)
    return stages


def reserve(engine: Engine, request: Claim, start: bool = False) -> list[Reservation]:
    """``claim`` for a run: the same reservation, read narrow; with ``start``, the
    attempts start in the same database transaction (and their transactions are
    IN_PROGRESS), as ``start_attempts`` would start them right after."""
    with engine.begin() as conn:
        rows = _reserve(conn, request, narrow=True, start=start)
        uuids = [r[1] for r in rows]
        found = fetch(conn, _TX_OF_RESERVED, {"b_uuids": uuids}) if rows else []
        txs = {uuid: (key, state, payload) for uuid, key, state, payload in found}
        if start and rows:  # after reading the states they had: unstart puts them back
            execute(conn, _TXS_STARTED, {"b_uuids": uuids, "b_now": request.now})
    started_at = request.now if start else None
    # Unpacked as tuples: by far the cheapest way to read a row's values.
    return [Reservation(id_, uuid, process_code, platform, stage, attempt, *txs[uuid],
                        started_at)
            for id_, uuid, process_code, platform, stage, attempt, _ in rows]


def extend_lease(engine: Engine, uuid: str, platform: str, stage: str, owner: str,
                 expires: datetime) -> datetime:
    """Push back the lease of a long-running attempt (``LeaseLost`` if it was lost)."""
    with engine.begin() as conn:
        done = conn.execute(
            sa.update(STAGE)
            .where(
                STAGE.c.uuid == uuid,
                STAGE.c.platform == platform,
                STAGE.c.stage == stage,
                STAGE.c.state == StageState.IN_PROGRESS,
                STAGE.c.lease_owner == owner,
            )
            .values(lease_expires_at=expires)
        ).rowcount
    if not done:
        raise LeaseLost(
            f"stage {platform}.{stage} of transaction {uuid} is not claimed by {owner!r}"
        )
    return expires


class Start(NamedTuple):
    """The start of one reserved stage's attempt, for ``Tracker.record_attempts``."""

    uuid: str
    platform: str
    stage: str


def start_attempt(engine: Engine, uuid: str, platform: str, stage: str, owner: str,
                  now: datetime, lease_seconds: float) -> int:
    """Start the attempt of a reserved stage; its number, or ``LeaseLost``."""
    started = start_attempts(engine, platform, stage, [uuid], owner, now, lease_seconds)
    if uuid not in started:
        raise LeaseLost(why_not_reserved(engine, uuid, platform, stage, owner))
    return started[uuid]


def start_attempts(engine: Engine, platform: str, stage: str, uuids: Sequence[str], owner: str,
                   now: datetime, lease_seconds: float) -> dict[str, int]:
    """Start the attempts of many reserved stages of one platform stage together (two
    statements however many); the attempt number of each one started, by uuid (the others are
    no longer reserved by ``owner``)."""
    with write_transaction(engine) as conn:
        return start_attempts_in(conn, platform, stage, uuids, owner, now, lease_seconds)


def start_attempts_in(conn: Conn, platform: str, stage: str, uuids: Sequence[str],
                      owner: str, now: datetime, lease_seconds: float) -> dict[str, int]:
    """``start_attempts`` in the caller's database transaction."""
    params = {"b_uuids": list(uuids), "b_platform": platform, "b_stage": stage,
              "b_owner": owner, "b_now": now,
              "b_expires": now + timedelta(seconds=lease_seconds)}
    rows = fetch(conn, _START_ATTEMPTS, params)
    if rows:
        execute(conn, _TXS_STARTED, {"b_uuids": [uuid for uuid, _ in rows], "b_now": now})
    return {uuid: int(attempt) for uuid, attempt in rows}


def unstart(engine: Engine, platform: str, stage: str, before: dict[str, TxState], owner: str,
            since: datetime, now: datetime) -> int:
    """Take back attempts started by ``start_attempts`` from ``since`` on whose platform was
    never called (the run is stopping): each stage is reserved again, its attempt uncounted,
    its transaction back in the state it had (``before``, by uuid). Returns how many."""
    uuids = list(before)
    undone = []
    with engine.begin() as conn:
        for i in range(0, len(uuids), CHUNK):
            undone += conn.execute(
                sa.update(STAGE)
                .where(STAGE.c.uuid.in_(uuids[i : i + CHUNK]), STAGE.c.platform == platform,
                       STAGE.c.stage == stage, STAGE.c.lease_owner == owner,
                       STAGE.c.state == StageState.IN_PROGRESS,
                       STAGE.c.started_at >= since)
                .values(attempt=STAGE.c.attempt - 1, started_at=None, updated_at=now)
                .returning(STAGE.c.uuid)
            ).scalars().all()
        if undone:
            conn.execute(
                sa.update(TX)
                .where(TX.c.uuid == sa.bindparam("b_uuid"), TX.c.state == TxState.IN_PROGRESS)
                .values(state=sa.bindparam("b_state")),
                [{"b_uuid": u, "b_state": before[u]} for u in undone],
            )
    return len(undone)


def why_not_reserved(engine: Engine, uuid: str, platform: str, stage: str, owner: str) -> str:
    """Why ``owner`` cannot start this stage (read-only): what ``LeaseLost`` says."""
    where = f"stage {platform}.{stage} of transaction {uuid}"
    with read_only(engine) as conn:
        row = conn.execute(
            sa.select(STAGE.c.state, STAGE.c.lease_owner, STAGE.c.started_at).where(
                STAGE.c.uuid == uuid, STAGE.c.platform == platform, STAGE.c.stage == stage
            )
        ).one_or_none()
    if row is None:
        return f"no {where}"
    if row.state == StageState.IN_PROGRESS and row.lease_owner == owner:
        return f"{where}: its attempt already started"
    return (
        f"{where} is no longer reserved by {owner!r} "
        f"(state {StageState(row.state).value}, owner {row.lease_owner!r})"
    )


def renew(engine: Engine, process_code: str, owner: str, expires: datetime) -> int:
    """Renew every not-yet-started reservation ``owner`` holds (one statement)."""
    held: Any = sa.and_(
        STAGE.c.process_code == process_code,
        STAGE.c.lease_expires_at.is_not(None),
        STAGE.c.lease_owner == owner,
        RESERVED,
    )
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # A row being started or released right now is renewed at the next beat;
            # waiting for it could deadlock with that multi-row statement.
            locked = sa.select(STAGE.c.id).where(held).with_for_update(skip_locked=True)
            held = sa.and_(STAGE.c.id.in_(locked.scalar_subquery()), held)
        return conn.execute(sa.update(STAGE).where(held).values(lease_expires_at=expires)).rowcount


def renew_started(engine: Engine, uuids: Sequence[str], owner: str, expires: datetime) -> int:
    """Renew the leases of the started attempts of these transactions that ``owner`` holds."""
    renewed = 0
    with engine.begin() as conn:
        for i in range(0, len(uuids), CHUNK):
            held: Any = sa.and_(
                STAGE.c.uuid.in_(list(uuids[i : i + CHUNK])), STAGE.c.lease_owner == owner,
                STAGE.c.state == StageState.IN_PROGRESS, STAGE.c.started_at.is_not(None))
            if conn.dialect.name == "postgresql":
                # A row locked now is being recorded (complete_many locks its batch's rows
                # in uuid order): waiting for it, holding rows it wants, could deadlock.
                locked = sa.select(STAGE.c.id).where(held).with_for_update(skip_locked=True)
                held = sa.and_(STAGE.c.id.in_(locked.scalar_subquery()), held)
            renewed += conn.execute(
                sa.update(STAGE).where(held).values(lease_expires_at=expires)).rowcount
    return renewed
