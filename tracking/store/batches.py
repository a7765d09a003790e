"""Many attempt results at once (``Tracker.complete_many``): one database transaction and a
handful of set-based statements whatever the batch size, each result decided by
``tracking.states.decide`` exactly as ``transitions.apply`` decides one.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from tracking.errors import LeaseLost
from tracking.models import EventKind, StageState, TxStage, TxState, from_row
from tracking.outcomes import ExecutionResult, Outcome
from tracking.states import StageFacts, Transition, decide
from tracking.store.driver import execute_many
from tracking.store.sql import (
    CANCEL_REST,
    INSERT_EVENTS,
    STAGE,
    TX,
    UPDATE_TX,
    UPDATE_TXS,
    any_of,
    execute_grouped,
    lock,
    retry_policy,
    tx_changes,
)
from tracking.store.transitions import find_stage, lease_lost

T = TypeVar("T")

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
# What deciding a result needs (``Tracker.complete_batch``, which answers in brief).
_DECIDED_FROM = ("id", "uuid", "process_code", "platform", "stage", "state", "attempt",
                 "attempts_allowed", "lease_owner", "started_at", "finished_at",
                 "retry_delay_seconds", "retry_backoff", "retry_max_delay_seconds",
                 "retry_jitter_seconds")


def _lock_recorded(columns: list[sa.Column[Any]]) -> sa.Select[Any]:
    return (
        sa.select(*columns, _NEXT_ID.label("next_id"))
        .where(any_of(STAGE.c.uuid, "b_uuids"),
               STAGE.c.platform == sa.bindparam("b_platform"),
               STAGE.c.stage == sa.bindparam("b_stage"))
        .order_by(STAGE.c.uuid)
        .with_for_update(of=STAGE)
    )


_LOCK_RECORDED = {
    False: _lock_recorded([c for c in STAGE.c if c.name not in _OVERWRITTEN]),
    True: _lock_recorded([STAGE.c[name] for name in _DECIDED_FROM]),
}
_LOCK_TXS_OF = (
    sa.select(TX.c.uuid, TX.c.state, TX.c.finished_at)
    .where(any_of(TX.c.uuid, "b_uuids"))
    .order_by(TX.c.uuid)
    .with_for_update()
)
_STAGE_COLUMNS = ("state", "attempt", "next_attempt_at", "lease_expires_at", "started_at",
                  "error_code", "error_type", "error_description", "updated_at", "finished_at")
_STATE_I, _ATTEMPT_I, _CODE_I, _DESCRIPTION_I = (
    _STAGE_COLUMNS.index(c) for c in ("state", "attempt", "error_code", "error_description"))
# Each write by id, and (``execute_grouped``) by a list of ids sharing its values.
_BY_ID = STAGE.c.id == sa.bindparam("b_id")
_BY_IDS = any_of(STAGE.c.id, "b_ids")
_SET_STAGE = {c: sa.bindparam(f"v_{c}") for c in _STAGE_COLUMNS}
_UPDATE_STAGES = sa.update(STAGE).where(_BY_ID).values(_SET_STAGE)
_UPDATE_STAGES_IN = sa.update(STAGE).where(_BY_IDS).values(_SET_STAGE)
_UNLOCK = {"next_attempt_at": sa.bindparam("v_now"), "updated_at": sa.bindparam("v_now")}
_PENDING = STAGE.c.state == StageState.PENDING
_UNLOCK_STAGES = sa.update(STAGE).where(_BY_ID, _PENDING).values(_UNLOCK)
_UNLOCK_STAGES_IN = sa.update(STAGE).where(_BY_IDS, _PENDING).values(_UNLOCK)

class Completion(NamedTuple):
    """One attempt's result for ``Tracker.complete_many`` (a named tuple: a batch makes
    hundreds)."""

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
    brief: bool = False,
) -> Recorded:
    """Record a batch of results in the caller's database transaction, with a handful of
    statements whatever the batch size: the stages recorded are locked and read (with the
    id of the stage after each), then their transactions, in uuid order (the global lock
    order); each result is decided by ``states.decide``; the stages, the next stages, the
    cancelled ones, the transactions and the events are written with a statement for each
    set of rows that share their values. A stage no longer claimed by ``owner`` is not
    written: its entry is a ``LeaseLost`` (``Recorded.stages()``). ``brief`` reads only what
    deciding needs, for an answer in brief (``Recorded.attempts()``)."""
    uuids = [c.uuid for c in completions]
    if len(set(uuids)) != len(uuids):
        raise ValueError("complete_many takes one result per transaction")
    recorded, txs = _lock(conn, completions, brief)
    keys = next(iter(recorded.values()))._fields[:-1]  # the stage's columns, not next_id
    # Read by position: a Row's attributes cost ~1 us each, and a batch reads thousands.
    at = {k: i for i, k in enumerate(keys)}
    id_i, state_i, owner_i, attempt_i, started_i, finished_i, allowed_i = (
        at[k] for k in ("id", "state", "lease_owner", "attempt", "started_at", "finished_at",
                        "attempts_allowed"))
    policy_of = operator.itemgetter(*(at[k] for k in (
        "retry_delay_seconds", "retry_backoff", "retry_max_delay_seconds",
        "retry_jitter_seconds")))
    process_i, platform_i, stage_i, next_i = (at["process_code"], at["platform"], at["stage"],
                                              len(keys))
    decisions = _Decisions(now, rng)
    out: list[tuple[Row[Any], tuple[Any, ...]] | LeaseLost] = []
    # Rows alike are written together: the values of a write -> the ids (uuids) it is for.
    stage_writes: dict[tuple[Any, ...], list[int]] = {}
    unlock, cancel, events = [], [], []
    tx_writes: dict[tuple[str, ...], dict[tuple[Any, ...], list[str]]] = {}
    for c in completions:
        row = recorded[c.uuid]
        if row[state_i] != StageState.IN_PROGRESS or row[owner_i] != owner:
            out.append(lease_lost(row, owner))
            continue
        result, target, next_id = c.result, row[id_i], row[next_i]
        started_at = row[started_i]
        attempt = row[attempt_i] if started_at is not None else row[attempt_i] + 1
        started_at = started_at or now
        tx_state, tx_finished = txs[c.uuid]
        outcome, error_type = result.outcome, result.error_type
        t = decisions.decide(policy_of(row), attempt, row[allowed_i], next_id is None,
                             tx_state, outcome, result)
        finished_at = now if t.finished else row[finished_i]
        values = (t.stage_state, attempt, t.next_attempt_at, None, started_at,
                  result.error_code, error_type, result.description, now, finished_at)
        stage_writes.setdefault(values, []).append(target)
        if t.unlock_next:
            unlock.append(next_id)
        if t.cancel_rest:
            cancel.append({"b_uuid": c.uuid, "b_id": target, "v_now": now})
        changes = decisions.tx_changes(tx_state, tx_finished, t.tx_state)
        tx_writes.setdefault(tuple(changes), {}).setdefault(tuple(changes.values()),
                                                            []).append(c.uuid)
        events.append({
            "uuid": c.uuid, "process_code": row[process_i], "kind": EventKind.ATTEMPT,
            "platform": row[platform_i], "stage": row[stage_i], "attempt": attempt,
            "outcome": outcome, "error_code": result.error_code,
            "description": result.description, "traceback": result.traceback,
            "from_state": row[state_i].value, "to_state": t.stage_state.value,
            "tx_state": t.tx_state, "actor": owner, "flow_run_id": flow_run_id,
            "task_run_id": c.task_run_id, "started_at": started_at, "created_at": now,
        })
        out.append((row, values))
    names = [f"v_{c}" for c in _STAGE_COLUMNS]
    execute_grouped(conn, _UPDATE_STAGES, _UPDATE_STAGES_IN, "b_id", names, stage_writes)
    execute_grouped(conn, _UNLOCK_STAGES, _UNLOCK_STAGES_IN, "b_id", ["v_now"],
                    {(now,): unlock} if unlock else {})
    execute_many(conn, CANCEL_REST, cancel)
    for columns, groups in tx_writes.items():
        execute_grouped(conn, UPDATE_TX, UPDATE_TXS, "b_uuid", list(columns), groups)
    execute_many(conn, INSERT_EVENTS, events)
    return Recorded(keys, out)


class RecordedAttempt(NamedTuple):
    """One attempt as ``Tracker.complete_batch`` recorded it: its stage's state, attempt and
    error after it (a named tuple: a resume run's batch makes hundreds, and tallies them)."""

    uuid: str
    platform: str
    stage: str
    state: StageState
    attempt: int
    error_code: int | None
    error_description: str | None


class Recorded(NamedTuple):
    """What ``apply_many`` wrote: each stage's row as read and the values written to it
    (or a ``LeaseLost``). ``stages()`` builds the recorded stages (from whole rows: not
    after ``apply_many(brief=True)``), ``attempts()`` says briefly what was recorded: after
    the commit, so that the writer's lock is not held meanwhile."""

    keys: tuple[str, ...]
    entries: list[tuple[Row[Any], tuple[Any, ...]] | LeaseLost]

    def attempts(self) -> list[RecordedAttempt | LeaseLost]:
        if not self.entries:
            return []
        uuid_i, platform_i, stage_i = (self.keys.index(k) for k in ("uuid", "platform", "stage"))
        return self._each(lambda row, values: RecordedAttempt(
            row[uuid_i], row[platform_i], row[stage_i], values[_STATE_I], values[_ATTEMPT_I],
            values[_CODE_I], values[_DESCRIPTION_I]))

    def stages(self) -> list[TxStage | LeaseLost]:
        def stage(row: Row[Any], values: tuple[Any, ...]) -> TxStage:
            columns = dict(zip(self.keys, row, strict=False))
            columns.update(zip(_STAGE_COLUMNS, values, strict=True))
            return from_row(TxStage, columns)

        return self._each(stage)

    def _each(self, build: Callable[[Row[Any], tuple[Any, ...]], T]) -> list[T | LeaseLost]:
        """``build(row, values)`` of each stage written; a ``LeaseLost`` as it is."""
        return [e if isinstance(e, LeaseLost) else build(*e) for e in self.entries]


class _Decisions:
    """``states.decide`` and ``sql.tx_changes`` for a batch: the results of a batch mostly
    share their inputs (the same outcome, attempt and policy), so each distinct decision is
    made once. A retry with jitter is drawn for each stage."""

    def __init__(self, now: datetime, rng: random.Random) -> None:
        self.now, self.rng = now, rng
        self._made: dict[tuple[Any, ...], Transition] = {}
        self._changes: dict[tuple[Any, ...], dict[str, Any]] = {}

    def decide(self, policy_values: tuple[Any, ...], attempt: int, allowed: int | None,
               is_last: bool, tx_state: TxState, outcome: Outcome, result: ExecutionResult
               ) -> Transition:
        policy = retry_policy(*policy_values)
        key = (attempt, allowed, is_last, tx_state, outcome, policy)
        t = self._made.get(key)
        if t is None:
            t = decide(StageFacts(attempt, allowed, is_last), tx_state, result, policy,
                       self.now, self.rng)
            if not (policy.jitter and t.next_attempt_at is not None):
                self._made[key] = t
        return t

    def tx_changes(self, state: TxState, finished_at: datetime | None, to: TxState
                   ) -> dict[str, Any]:
        key = (state, finished_at is None, to)
        changes = self._changes.get(key)
        if changes is None:
            changes = self._changes[key] = tx_changes(state, finished_at, to, self.now)
        return changes


def _lock(conn: Connection, completions: Sequence[Completion], brief: bool
          ) -> tuple[dict[str, Row[Any]], dict[str, tuple[TxState, datetime | None]]]:
    """Lock and read the recorded stages (by uuid), then their transactions' states, in
    the global lock order: the stages (by uuid; a transaction's in seq order: the recorded
    one, then the ones it unlocks or cancels), then the transactions."""
    by_name: dict[tuple[str, str | None], list[str]] = {}
    for c in completions:
        by_name.setdefault((c.platform, c.stage), []).append(c.uuid)
    recorded: dict[str, Row[Any]] = {}
    for (platform, stage), of in sorted(by_name.items(), key=lambda g: str(g[0])):
        _read_recorded(conn, platform, stage, sorted(of), recorded, brief)
    for c in completions:
        if c.uuid not in recorded:  # say what is wrong, or find a one-stage platform's stage
            stages, _ = lock(conn, c.uuid)
            row = find_stage(stages, c.uuid, c.platform, c.stage)
            _read_recorded(conn, row.platform, row.stage, [c.uuid], recorded, brief)
    found = conn.execute(_LOCK_TXS_OF, {"b_uuids": sorted(recorded)}).all()
    return recorded, {uuid: (state, finished_at) for uuid, state, finished_at in found}


def _read_recorded(conn: Connection, platform: str, stage: str | None, uuids: list[str],
                   into: dict[str, Row[Any]], brief: bool) -> None:
    """Lock and read the stages ``platform``/``stage`` of these transactions, by uuid."""
    params = {"b_uuids": uuids, "b_platform": platform, "b_stage": stage}
    into.update((r.uuid, r) for r in conn.execute(_LOCK_RECORDED[brief], params).all())
