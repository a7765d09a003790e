"""Reads: one transaction with its stages and audit trail, stages of many, runnable work.

Read-only connections (``db.read_only``) never take SQLite's write lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import selectinload
from sqlmodel import Session, select

from tracking.connections import read_only
from tracking.errors import TransactionNotFound
from tracking.models import StageState, TxProcess, TxStage, TxState
from tracking.store.sql import CHUNK, STAGE, TX, check_uuid


def process_of(engine: Engine, uuid: str) -> str:
    """The process code of a transaction (``TransactionNotFound`` if there is none)."""
    check_uuid(uuid)
    with read_only(engine) as conn:
        code = conn.execute(
            sa.select(TX.c.process_code).where(TX.c.uuid == uuid)
        ).scalar_one_or_none()
    if code is None:
        raise TransactionNotFound(f"no transaction {uuid!r}")
    return code


def get_transaction(engine: Engine, uuid: str) -> TxProcess:
    """The transaction with its ``stages`` (in order) and ``events`` (the audit trail)."""
    query = (
        select(TxProcess)
        .where(TxProcess.uuid == uuid)
        .options(selectinload(TxProcess.stages), selectinload(TxProcess.events))  # type: ignore[arg-type]
    )
    with read_only(engine) as conn, Session(bind=conn) as session:
        tx = session.exec(query).one_or_none()
        if tx is None:
            raise TransactionNotFound(f"no transaction {uuid!r}")
        return tx


def get_stages(engine: Engine, uuids: Sequence[str], platform: str, stage: str) -> list[TxStage]:
    """One platform stage of each of these transactions, in the order of ``uuids`` (one
    query per 500 uuids, on the unique index of uuid, platform and stage)."""
    found: dict[str, TxStage] = {}
    with read_only(engine) as conn, Session(bind=conn) as session:
        for i in range(0, len(uuids), CHUNK):
            query = select(TxStage).where(
                TxStage.uuid.in_(list(uuids[i : i + CHUNK])),  # type: ignore[attr-defined]
                TxStage.platform == platform,
                TxStage.stage == stage,
            )
            found.update({s.uuid: s for s in session.exec(query)})
    missing = [u for u in uuids if u not in found]
    if missing:
        raise TransactionNotFound(f"no stage {platform}.{stage} of transaction {missing[0]}")
    return [found[u] for u in uuids]


def get_pending_stages(engine: Engine, query: sa.Select[Any]) -> list[TxStage]:
    """The stages whose ids ``query`` selects (a ``claims.runnable`` query), in its order."""
    ids = query.subquery()
    rows = (
        select(TxStage)
        .join(ids, TxStage.id == ids.c.id)  # type: ignore[arg-type]
        .order_by(TxStage.priority.desc(), TxStage.next_attempt_at,  # type: ignore[attr-defined]
                  TxStage.id)
    )
    with read_only(engine) as conn, Session(bind=conn) as session:
        return list(session.exec(rows).all())



@dataclass(frozen=True)
class Runnability:
    """Whether a transaction has anything to run now (see ``runnability``)."""

    process: str
    state: TxState
    runnable: bool
    running: bool
    next_attempt_at: datetime | None


def runnability(engine: Engine, uuid: str, now: datetime) -> Runnability:
    """State of the transaction and whether a stage of it can be claimed now, in one query.

    Runnable: a stage is due (what ``claims.runnable`` finds), or a stage's lease expired (its
    worker died; the next claim recovers it). Running: a stage is claimed right now.
    """
    check_uuid(uuid)
    mine = STAGE.c.uuid == TX.c.uuid
    due = sa.and_(STAGE.c.next_attempt_at.is_not(None), STAGE.c.next_attempt_at <= now)
    claimed = STAGE.c.state == StageState.IN_PROGRESS
    expired = sa.and_(claimed, STAGE.c.lease_expires_at <= now)
    query = sa.select(
        TX.c.process_code,
        TX.c.state,
        sa.exists().where(mine, sa.or_(due, expired)).label("runnable"),
        sa.exists().where(mine, claimed, STAGE.c.lease_expires_at > now).label("running"),
        sa.select(sa.func.min(STAGE.c.next_attempt_at)).where(mine)
        .scalar_subquery().label("next_attempt_at"),
    ).where(TX.c.uuid == uuid)
    with read_only(engine) as conn:
        row = conn.execute(query).one_or_none()
    if row is None:
        raise TransactionNotFound(f"no transaction {uuid!r}")
    next_at = row.next_attempt_at
    if next_at is not None:  # an aggregate comes back untyped (a string on SQLite)
        next_at = STAGE.c.next_attempt_at.type.process_result_value(
            datetime.fromisoformat(next_at) if isinstance(next_at, str) else next_at,
            engine.dialect,
        )
    return Runnability(
        row.process_code, TxState(row.state), bool(row.runnable), bool(row.running), next_at
    )
