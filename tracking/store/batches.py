"""Many attempt results at once (``Tracker.complete_many``): one database transaction and a
handful of set-based statements whatever the batch size, each result decided by
``tracking.states.decide`` exactly as ``transitions.apply`` decides one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from tracking.errors import LeaseLost, TransactionNotFound
from tracking.models import EventKind, StageState, TxStage, TxState, from_row
from tracking.outcomes import ExecutionResult
from tracking.states import FINAL_TX_STATES, RUNNABLE_STAGE_STATES, StageFacts, decide
from tracking.store.sql import CHUNK, INSERT_EVENTS, STAGE, TX, execute_many, policy_of
from tracking.store.transitions import check_can_complete, find_stage

# Every stage of the batch's transactions is locked and read narrow (where each one stands);
# the stages recorded are read whole, less the columns every result overwrites (fewer values
# to convert, which is most of a batch's time), to be returned with the changes.
_LOCK_STAGES_OF = (
    sa.select(STAGE.c.id, STAGE.c.uuid, STAGE.c.seq, STAGE.c.state, STAGE.c.platform,
              STAGE.c.stage, STAGE.c.process_code)
    .where(STAGE.c.uuid.in_(sa.bindparam("b_uuids", expanding=True)))
    .order_by(STAGE.c.uuid, STAGE.c.seq)
    .with_for_update()
)
_OVERWRITTEN = ("next_attempt_at", "lease_expires_at", "error_code", "error_type",
                "error_description", "updated_at")
_STAGES_BY_ID = sa.select(*(c for c in STAGE.c if c.name not in _OVERWRITTEN)).where(
    STAGE.c.id.in_(sa.bindparam("b_ids", expanding=True))
)
_LOCK_TXS_OF = (
    sa.select(TX.c.uuid, TX.c.state, TX.c.finished_at)
    .where(TX.c.uuid.in_(sa.bindparam("b_uuids", expanding=True)))
    .order_by(TX.c.uuid)
    .with_for_update()
)
_STAGE_COLUMNS = ("state", "attempt", "next_attempt_at", "lease_expires_at", "started_at",
                  "error_code", "error_type", "error_description", "updated_at", "finished_at")
_UPDATE_STAGES = (
    sa.update(STAGE)
    .where(STAGE.c.id == sa.bindparam("b_id"))
    .values({c: sa.bindparam(f"v_{c}") for c in _STAGE_COLUMNS})
)
_UNLOCK_STAGES = (
    sa.update(STAGE)
    .where(STAGE.c.id == sa.bindparam("b_id"), STAGE.c.state == StageState.PENDING)
    .values(next_attempt_at=sa.bindparam("v_now"), updated_at=sa.bindparam("v_now"))
)
_CANCEL_STAGES = (
    sa.update(STAGE)
    .where(STAGE.c.id == sa.bindparam("b_id"))
    .values(state=StageState.CANCELLED, next_attempt_at=None, updated_at=sa.bindparam("v_now"),
            finished_at=sa.bindparam("v_now"),
            error_description="cancelled: an earlier stage was rejected")
)
_UPDATE_TXS = (
    sa.update(TX)
    .where(TX.c.uuid == sa.bindparam("b_uuid"))
    .values(state=sa.bindparam("v_state"), updated_at=sa.bindparam("v_now"),
            finished_at=sa.bindparam("v_finished_at"))
)


@dataclass(frozen=True)
class Completion:
    """One attempt's result for ``Tracker.complete_many``."""

    uuid: str
    platform: str
    stage: str
    result: ExecutionResult
    task_run_id: str | None = None


def apply_many(
    conn: Connection,
    completions: Sequence[Completion],
    owner: str,
    now: datetime,
    rng: random.Random,
    *,
    flow_run_id: str | None = None,
) -> list[TxStage | LeaseLost]:
    """Record a batch of results in the caller's database transaction, with a handful of
    statements whatever the batch size: the rows are locked (stages, then transactions, in
    uuid order: the global lock order), each result decided by ``states.decide``, and the
    stages, the next stages, the transactions and the events written with one statement
    each. A stage no longer claimed by ``owner`` is not written: its entry is a
    ``LeaseLost``."""
    uuids = [c.uuid for c in completions]
    if len(set(uuids)) != len(uuids):
        raise ValueError("complete_many takes one result per transaction")
    # Locked in the global order: every stage (by uuid), then every transaction.
    ordered = sorted(uuids)
    chunks = [{"b_uuids": ordered[i : i + CHUNK]} for i in range(0, len(ordered), CHUNK)]
    stages_of: dict[str, list[Row[Any]]] = {}
    for chunk in chunks:
        for row in conn.execute(_LOCK_STAGES_OF, chunk):
            stages_of.setdefault(row.uuid, []).append(row)
    txs: dict[str, Row[Any]] = {}
    for chunk in chunks:
        txs.update((r.uuid, r) for r in conn.execute(_LOCK_TXS_OF, chunk))
    targets = []
    for c in completions:
        if c.uuid not in txs:
            raise TransactionNotFound(f"no transaction {c.uuid!r}")
        targets.append(find_stage(stages_of.get(c.uuid, []), c.uuid, c.platform, c.stage).id)
    whole: dict[int, Row[Any]] = {}
    for i in range(0, len(targets), CHUNK):
        whole.update((r.id, r) for r in conn.execute(
            _STAGES_BY_ID, {"b_ids": targets[i : i + CHUNK]}))
    keys = next(iter(whole.values()))._fields
    out: list[TxStage | LeaseLost] = []
    stage_rows, unlock, cancel, tx_rows, events = [], [], [], [], []
    for c, target in zip(completions, targets, strict=True):
        tx, stages, row = txs[c.uuid], stages_of[c.uuid], whole[target]
        try:
            check_can_complete(row, owner, now)
        except LeaseLost as exc:
            out.append(exc)
            continue
        started = row.started_at is not None
        attempt = row.attempt if started else row.attempt + 1
        later = [s for s in stages if s.seq > row.seq]
        t = decide(StageFacts(attempt, row.attempts_allowed, is_last=not later),
                   TxState(tx.state), c.result, policy_of(row), now, rng)
        changes = {
            "state": t.stage_state, "attempt": attempt, "next_attempt_at": t.next_attempt_at,
            "lease_expires_at": None, "started_at": row.started_at if started else now,
            "error_code": c.result.error_code, "error_type": c.result.error_type,
            "error_description": c.result.description, "updated_at": now,
            "finished_at": now if t.finished else row.finished_at,
        }
        stage_rows.append({"b_id": row.id, **{f"v_{k}": v for k, v in changes.items()}})
        if t.unlock_next:
            unlock.append({"b_id": later[0].id, "v_now": now})
        if t.cancel_rest:
            cancel += [{"b_id": s.id, "v_now": now} for s in stages
                       if s.id != row.id and StageState(s.state) in RUNNABLE_STAGE_STATES]
        finished_at = (tx.finished_at or now) if t.tx_state in FINAL_TX_STATES else None
        tx_rows.append({"b_uuid": c.uuid, "v_state": t.tx_state, "v_now": now,
                        "v_finished_at": finished_at})
        events.append({
            "uuid": row.uuid, "process_code": row.process_code, "kind": EventKind.ATTEMPT,
            "platform": row.platform, "stage": row.stage, "attempt": attempt,
            "outcome": c.result.outcome, "error_code": c.result.error_code,
            "description": c.result.description, "traceback": c.result.traceback,
            "from_state": StageState(row.state).value, "to_state": t.stage_state.value,
            "tx_state": t.tx_state, "actor": owner, "flow_run_id": flow_run_id,
            "task_run_id": c.task_run_id, "started_at": changes["started_at"],
            "created_at": now,
        })
        out.append(from_row(TxStage, {**dict(zip(keys, row, strict=True)), **changes}))
    for statement, params in ((_UPDATE_STAGES, stage_rows), (_UNLOCK_STAGES, unlock),
                              (_CANCEL_STAGES, cancel), (_UPDATE_TXS, tx_rows),
                              (INSERT_EVENTS, events)):
        execute_many(conn, statement, params)
    return out
