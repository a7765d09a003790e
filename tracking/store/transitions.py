"""Transitions: recording an attempt's result, a lost attempt, and the operator's cancel,
requeue and defer. Each is one database transaction on locked rows, decided by
``tracking.states``.

Nothing here needs the in-memory process definition: a stage carries the retry policy it runs
under, and requeue takes the platform's current policy from the catalog in the database.
"""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tracking.errors import InvalidTransition, LeaseLost
from tracking.models import EventKind, StageState, TxStage, TxState, from_row
from tracking.outcomes import ExecutionResult
from tracking.states import (
    FINAL_STAGE_STATES,
    StageFacts,
    StageSnapshot,
    check_cancel,
    check_defer,
    check_requeue,
    decide,
    deferred_until,
)
from tracking.store.catalog import current_policies
from tracking.store.driver import Conn, Record, execute
from tracking.store.sql import (
    CANCEL_REST,
    INSERT_EVENT,
    INSERT_EVENTS,
    RESERVED,
    RUNNABLE,
    STAGE,
    UPDATE_STAGE,
    UPDATE_TX,
    label,
    operator_event,
    policy_columns,
    policy_of,
    set_tx_state,
)

_UPDATE_STAGE_FENCED = UPDATE_STAGE.where(STAGE.c.state == sa.bindparam("b_state"))


def find_stage(stages: list[Record], uuid: str, platform: str, stage: str | None) -> Record:
    """The locked row of ``platform``/``stage`` among a transaction's stages (``stage`` may
    be None for a one-stage platform)."""
    rows = [s for s in stages if s.platform == platform]
    if not rows:
        known = ", ".join(dict.fromkeys(s.platform for s in stages)) or "none"
        process = stages[0].process_code if stages else "?"
        raise ValueError(
            f"unknown platform {platform!r} for process {process!r} (platforms: {known})"
        )
    names = [s.stage for s in rows]
    if stage is None:
        if len(rows) > 1:
            raise ValueError(f"platform {platform!r} has stages {names}: pass stage=")
        return rows[0]
    for row in rows:
        if row.stage == stage:
            return row
    raise ValueError(
        f"unknown stage {stage!r} for platform {platform!r} (stages: {', '.join(names)})"
    )


def lease_lost(row: Any, owner: str) -> LeaseLost:
    """The error for a stage ``owner`` no longer holds."""
    return LeaseLost(f"{label(row)} is no longer claimed by {owner!r} "
                     f"(state {StageState(row.state).value}, owner {row.lease_owner!r})")


def check_can_complete(row: Record, owner: str | None, now: datetime) -> None:
    """Refuse to record an attempt on a stage that is not this caller's to record."""
    state = StageState(row.state)
    if owner is not None:
        if state != StageState.IN_PROGRESS or row.lease_owner != owner:
            raise lease_lost(row, owner)
        return
    if state in FINAL_STAGE_STATES:
        raise InvalidTransition(f"{label(row)} is already {state.value}")
    if state == StageState.IN_PROGRESS:
        raise InvalidTransition(
            f"{label(row)} is claimed by {row.lease_owner!r} until "
            f"{row.lease_expires_at.isoformat()}; pass owner= to complete it"
        )
    if row.next_attempt_at is None:
        raise InvalidTransition(f"{label(row)} is not runnable: earlier stages are not completed")
    if row.next_attempt_at > now:
        raise InvalidTransition(f"{label(row)} is not due until {row.next_attempt_at.isoformat()}")


def apply(
    conn: Conn,
    tx: Record,
    stages: list[Record],
    row: Record,
    result: ExecutionResult,
    now: datetime,
    rng: random.Random,
    *,
    kind: EventKind,
    actor: str | None = None,
    flow_run_id: str | None = None,
    task_run_id: str | None = None,
) -> TxStage:
    """Write one attempt's outcome: the stage, its neighbours, the transaction, the event."""
    from_state = StageState(row.state)
    # A reserved stage completed without start_attempt: its attempt starts (counts) now.
    started = from_state == StageState.IN_PROGRESS and row.started_at is not None
    attempt = row.attempt if started else row.attempt + 1
    later = [s for s in stages if s.seq > row.seq]
    facts = StageFacts(attempt, row.attempts_allowed, is_last=not later)
    t = decide(facts, TxState(tx.state), result, policy_of(row), now, rng)
    changes: dict[str, Any] = {
        "state": t.stage_state,
        "attempt": attempt,
        "next_attempt_at": t.next_attempt_at,
        # lease_owner stays: it names the run that made the last attempt (see claim).
        "lease_expires_at": None,
        "started_at": row.started_at if started else now,
        "error_code": result.error_code,
        "error_type": result.error_type,
        "error_description": result.description,
        "updated_at": now,
    }
    if t.finished:
        changes["finished_at"] = now
    if t.unlock_next and later[0].state == StageState.PENDING:
        execute(conn, UPDATE_STAGE, {"b_id": later[0].id, "next_attempt_at": now,
                                     "updated_at": now})
    if t.cancel_rest:
        execute(conn, CANCEL_REST, {"b_uuid": row.uuid, "b_id": row.id, "v_now": now})
    # The rows are locked; the state condition only guards against a bypassed lock.
    if execute(conn, _UPDATE_STAGE_FENCED, {"b_id": row.id, "b_state": from_state, **changes}
               ) != 1:
        raise LeaseLost(f"{label(row)} changed while its attempt was being recorded")
    set_tx_state(conn, tx, t.tx_state, now)
    execute(
        conn,
        INSERT_EVENTS,
        {
            "uuid": row.uuid,
            "process_code": row.process_code,
            "kind": kind,
            "platform": row.platform,
            "stage": row.stage,
            "attempt": attempt,
            "outcome": result.outcome,
            "error_code": result.error_code,
            "description": result.description,
            "traceback": result.traceback,
            "from_state": from_state.value,
            "to_state": t.stage_state.value,
            "tx_state": t.tx_state,
            "actor": actor,
            "flow_run_id": flow_run_id,
            "task_run_id": task_run_id,
            "started_at": changes["started_at"],
            "created_at": now,
        },
    )
    return from_row(TxStage, {**row._asdict(), **changes})


def record_lost_attempt(
    conn: Connection, tx: Record, stages: list[Record], now: datetime, rng: random.Random
) -> int:
    """The started attempt of this locked transaction whose lease expired counts as lost:
    a LEASE_EXPIRED event (a system error, code -1). Returns 1 if there was one."""
    for row in stages:
        lease = row.lease_expires_at
        started = row.started_at is not None
        if row.state == StageState.IN_PROGRESS and started and lease and lease <= now:
            result = ExecutionResult(
                -1,
                f"lease of {row.lease_owner!r} expired at {lease.isoformat()}: "
                "the worker stopped before recording its attempt",
            )
            apply(conn, tx, stages, row, result, now, rng, kind=EventKind.LEASE_EXPIRED,
                  actor=row.lease_owner)
            return 1
    return 0


def cancel(
    conn: Connection, tx: Record, reason: str, actor: str | None, now: datetime
) -> None:
    """Cancel a locked transaction: its open and reserved stages become CANCELLED."""
    to_state = check_cancel(tx.uuid, TxState(tx.state))
    conn.execute(
        sa.update(STAGE)
        .where(
            STAGE.c.uuid == tx.uuid,
            sa.or_(RUNNABLE, RESERVED),
        )
        .values(
            state=StageState.CANCELLED,
            next_attempt_at=None,
            lease_expires_at=None,  # a cancelled reservation holds nothing
            updated_at=now,
            finished_at=now,
            error_description=f"cancelled: {reason}",
        )
    )
    set_tx_state(conn, tx, to_state, now)
    operator_event(conn, tx, EventKind.CANCELLED, reason, actor, now, to_state)


def requeue(
    conn: Connection,
    tx: Record,
    stages: list[Record],
    reason: str,
    actor: str | None,
    now: datetime,
) -> None:
    """Reopen a locked, stopped transaction from its first unfinished stage, each reopened
    stage with a fresh set of attempts under its platform's current policy (the catalog's)."""
    snapshots = [StageSnapshot(StageState(s.state), s.started_at is not None) for s in stages]
    to_state = check_requeue(tx.uuid, TxState(tx.state), snapshots)
    policies = current_policies(conn, tx.process_code)
    first = True
    for s in stages:
        if s.state == StageState.COMPLETED:
            continue
        policy = policies.get(s.platform)
        if policy is None:
            raise InvalidTransition(
                f"transaction {tx.uuid}: platform {s.platform!r} is no longer in the catalog "
                f"of process {tx.process_code!r}; register the process to requeue it"
            )
        allowed_now = policy.max_attempts
        conn.execute(
            UPDATE_STAGE,
            {
                "b_id": s.id,
                "state": StageState.PENDING,
                "attempts_allowed": None if allowed_now is None else s.attempt + allowed_now,
                **policy_columns(policy),
                "lease_owner": None,
                "lease_expires_at": None,
                "next_attempt_at": now if first else None,
                "finished_at": None,
                "error_code": None,
                "error_type": None,
                "error_description": None,
                "updated_at": now,
            },
        )
        first = False
    set_tx_state(conn, tx, to_state, now)
    operator_event(conn, tx, EventKind.REQUEUED, reason, actor, now, to_state)


def defer(conn: Connection, tx: Record, stages: list[Record], until: datetime,
          reason: str, actor: str | None, now: datetime) -> None:
    """Postpone a locked, waiting transaction: the stage that runs next is not due before
    ``until`` (``states.deferred_until``); ``not_before`` records it, a DEFERRED event too."""
    check_defer(tx.uuid, TxState(tx.state),
                [StageSnapshot(StageState(s.state), s.started_at is not None) for s in stages])
    row = next((s for s in stages if s.next_attempt_at is not None), None)
    if row is None:
        raise InvalidTransition(f"transaction {tx.uuid} has no stage waiting to run")
    at = deferred_until(row.next_attempt_at, until)
    conn.execute(UPDATE_STAGE, {"b_id": row.id, "next_attempt_at": at, "updated_at": now})
    conn.execute(UPDATE_TX, {"b_uuid": tx.uuid, "not_before": until, "updated_at": now})
    state = TxState(tx.state)
    conn.execute(INSERT_EVENT, {
        "uuid": tx.uuid, "process_code": tx.process_code, "kind": EventKind.DEFERRED,
        "platform": row.platform, "stage": row.stage, "attempt": row.attempt,
        "description": f"deferred until {at.isoformat()}: {reason}",
        "from_state": state.value, "to_state": state.value, "tx_state": state, "actor": actor,
        "created_at": now,
    })
