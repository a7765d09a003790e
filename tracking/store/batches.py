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

from tracking.errors import LeaseLost
from tracking.models import EventKind, StageState, TxStage, from_row
from tracking.outcomes import ExecutionResult
from tracking.states import RUNNABLE_STAGE_STATES, StageFacts, decide
from tracking.store.sql import (
    CHUNK,
    INSERT_EVENTS,
    STAGE,
    TX,
    UPDATE_TX,
    UPDATE_TXS,
    execute_grouped,
    execute_many,
    lock,
    policy_in,
    tx_changes,
)
from tracking.store.transitions import find_stage, lease_lost

# The stages recorded are locked and read by name, less the columns every result
# overwrites (fewer values to convert, which is most of a batch's time), with the id of
# the stage after each (an index probe): nothing else of a transaction needs reading.
_OVERWRITTEN = ("next_attempt_at", "lease_expires_at", "error_code", "error_type",
                "error_description", "updated_at")
_AFTER = STAGE.alias("after")
_NEXT_ID = (
    sa.select(_AFTER.c.id)
    .where(_AFTER.c.uuid == STAGE.c.uuid, _AFTER.c.seq > STAGE.c.seq)
    .order_by(_AFTER.c.seq)
    .limit(1)
    .scalar_subquery()
)
_LOCK_RECORDED = (
    sa.select(*(c for c in STAGE.c if c.name not in _OVERWRITTEN), _NEXT_ID.label("next_id"))
    .where(STAGE.c.uuid.in_(sa.bindparam("b_uuids", expanding=True)),
           STAGE.c.platform == sa.bindparam("b_platform"),
           STAGE.c.stage == sa.bindparam("b_stage"))
    .order_by(STAGE.c.uuid)
    .with_for_update(of=STAGE)
)
_LOCK_TXS_OF = (
    sa.select(TX.c.uuid, TX.c.state, TX.c.finished_at)
    .where(TX.c.uuid.in_(sa.bindparam("b_uuids", expanding=True)))
    .order_by(TX.c.uuid)
    .with_for_update()
)
_STAGE_COLUMNS = ("state", "attempt", "next_attempt_at", "lease_expires_at", "started_at",
                  "error_code", "error_type", "error_description", "updated_at", "finished_at")
# Each write by id, and (``execute_grouped``) by a list of ids sharing its values.
_BY_ID = STAGE.c.id == sa.bindparam("b_id")
_BY_IDS = STAGE.c.id.in_(sa.bindparam("b_ids", expanding=True))
_SET_STAGE = {c: sa.bindparam(f"v_{c}") for c in _STAGE_COLUMNS}
_UPDATE_STAGES = sa.update(STAGE).where(_BY_ID).values(_SET_STAGE)
_UPDATE_STAGES_IN = sa.update(STAGE).where(_BY_IDS).values(_SET_STAGE)
_UNLOCK = {"next_attempt_at": sa.bindparam("v_now"), "updated_at": sa.bindparam("v_now")}
_PENDING = STAGE.c.state == StageState.PENDING
_UNLOCK_STAGES = sa.update(STAGE).where(_BY_ID, _PENDING).values(_UNLOCK)
_UNLOCK_STAGES_IN = sa.update(STAGE).where(_BY_IDS, _PENDING).values(_UNLOCK)
# The other stages of a rejected transaction still to run (the earlier ones are done).
_CANCEL_REST = (
    sa.update(STAGE)
    .where(STAGE.c.uuid == sa.bindparam("b_uuid"), STAGE.c.id != sa.bindparam("b_id"),
           sa.or_(*(STAGE.c.state == s for s in sorted(RUNNABLE_STAGE_STATES))))
    .values(state=StageState.CANCELLED, next_attempt_at=None, updated_at=sa.bindparam("v_now"),
            finished_at=sa.bindparam("v_now"),
            error_description="cancelled: an earlier stage was rejected")
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
    statements whatever the batch size: the stages recorded are locked and read (with the
    id of the stage after each), then their transactions, in uuid order (the global lock
    order); each result is decided by ``states.decide``; the stages, the next stages, the
    cancelled ones, the transactions and the events are written with one statement each. A
    stage no longer claimed by ``owner`` is not written: its entry is a ``LeaseLost``."""
    uuids = [c.uuid for c in completions]
    if len(set(uuids)) != len(uuids):
        raise ValueError("complete_many takes one result per transaction")
    # Locked in the global order: the stages (by uuid; a transaction's in seq order: the
    # recorded one, then the ones it unlocks or cancels), then the transactions.
    by_name: dict[tuple[str, str | None], list[str]] = {}
    for c in completions:
        by_name.setdefault((c.platform, c.stage), []).append(c.uuid)
    recorded: dict[str, Row[Any]] = {}
    for (platform, stage), of in sorted(by_name.items(), key=lambda g: str(g[0])):
        _read_recorded(conn, platform, stage, sorted(of), recorded)
    for c in completions:
        if c.uuid not in recorded:  # say what is wrong, or find a one-stage platform's stage
            stages, _ = lock(conn, c.uuid)
            row = find_stage(stages, c.uuid, c.platform, c.stage)
            _read_recorded(conn, row.platform, row.stage, [c.uuid], recorded)
    txs: dict[str, Row[Any]] = {}
    ordered = sorted(uuids)
    for i in range(0, len(ordered), CHUNK):
        txs.update((r.uuid, r) for r in conn.execute(
            _LOCK_TXS_OF, {"b_uuids": ordered[i : i + CHUNK]}).all())
    keys = next(iter(recorded.values()))._fields[:-1]  # the stage's columns, not next_id
    out: list[TxStage | LeaseLost] = []
    stage_rows, unlock, cancel, events = [], [], [], []
    txs_by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}  # one UPDATE per SET
    for c in completions:
        tx, row = txs[c.uuid], recorded[c.uuid]
        stage = dict(zip(keys, row, strict=False))  # read once: a Row's attributes cost more
        # check_can_complete's rule with an owner, on the dict
        if stage["state"] != StageState.IN_PROGRESS or stage["lease_owner"] != owner:
            out.append(lease_lost(row, owner))
            continue
        result, target, next_id = c.result, stage["id"], row.next_id
        started_at = stage["started_at"]
        attempt = stage["attempt"] if started_at is not None else stage["attempt"] + 1
        started_at = started_at or now
        t = decide(StageFacts(attempt, stage["attempts_allowed"], is_last=next_id is None),
                   tx.state, result, policy_in(stage), now, rng)
        finished_at = now if t.finished else stage["finished_at"]
        stage_rows.append({
            "b_id": target, "v_state": t.stage_state, "v_attempt": attempt,
            "v_next_attempt_at": t.next_attempt_at, "v_lease_expires_at": None,
            "v_started_at": started_at, "v_error_code": result.error_code,
            "v_error_type": result.error_type, "v_error_description": result.description,
            "v_updated_at": now, "v_finished_at": finished_at,
        })
        if t.unlock_next:
            unlock.append({"b_id": next_id, "v_now": now})
        if t.cancel_rest:
            cancel.append({"b_uuid": c.uuid, "b_id": target, "v_now": now})
        changes = tx_changes(tx, t.tx_state, now)
        txs_by_columns.setdefault(tuple(changes), []).append({"b_uuid": c.uuid, **changes})
        events.append({
            "uuid": c.uuid, "process_code": stage["process_code"], "kind": EventKind.ATTEMPT,
            "platform": stage["platform"], "stage": stage["stage"], "attempt": attempt,
            "outcome": result.outcome, "error_code": result.error_code,
            "description": result.description, "traceback": result.traceback,
            "from_state": stage["state"].value, "to_state": t.stage_state.value,
            "tx_state": t.tx_state, "actor": owner, "flow_run_id": flow_run_id,
            "task_run_id": c.task_run_id, "started_at": started_at, "created_at": now,
        })
        stage.update(state=t.stage_state, attempt=attempt, next_attempt_at=t.next_attempt_at,
                     lease_expires_at=None, started_at=started_at, error_code=result.error_code,
                     error_type=result.error_type, error_description=result.description,
                     updated_at=now, finished_at=finished_at)
        out.append(from_row(TxStage, stage))
    execute_grouped(conn, _UPDATE_STAGES, _UPDATE_STAGES_IN, "b_id", stage_rows)
    execute_grouped(conn, _UNLOCK_STAGES, _UNLOCK_STAGES_IN, "b_id", unlock)
    execute_many(conn, _CANCEL_REST, cancel)
    for rows in txs_by_columns.values():
        execute_grouped(conn, UPDATE_TX, UPDATE_TXS, "b_uuid", rows)
    execute_many(conn, INSERT_EVENTS, events)
    return out


def _read_recorded(conn: Connection, platform: str, stage: str | None, uuids: list[str],
                   into: dict[str, Row[Any]]) -> None:
    """Lock and read the stages ``platform``/``stage`` of these transactions, by uuid."""
    for i in range(0, len(uuids), CHUNK):
        params = {"b_uuids": uuids[i : i + CHUNK], "b_platform": platform, "b_stage": stage}
        into.update((r.uuid, r) for r in conn.execute(_LOCK_RECORDED, params).all())
