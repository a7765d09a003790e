"""Intake: each item becomes a transaction with all its stages, unless it is a duplicate.

One database transaction per batch; ``UNIQUE(process_code, fingerprint)`` with ``ON CONFLICT
DO NOTHING`` makes concurrent submissions of the same item create one transaction. An item
is a payload, or a ``tracking.schedule.Item`` (a payload with its priority, not_before and
deadline); the schedule is written on the transaction and on each of its stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
import uuid_utils
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from tracking.catalog import Process
from tracking.connections import write_transaction
from tracking.models import EventKind, StageState, TxState
from tracking.payloads import validate_payload, validate_source
from tracking.schedule import Item, Schedule
from tracking.store.driver import Conn, execute_many, fetch
from tracking.store.sql import INSERT_EVENTS, STAGE, TX, any_of, policy_columns

_SELECT_FINGERPRINTS = sa.select(TX.c.fingerprint, TX.c.uuid).where(
    TX.c.process_code == sa.bindparam("b_process"),
    any_of(TX.c.fingerprint, "b_fingerprints"),
)
_INSERT_STAGES = sa.insert(STAGE).inline()  # for execute_many: no RETURNING
_INSERT_TRANSACTIONS = {
    dialect: insert(TX).on_conflict_do_nothing(index_elements=["process_code", "fingerprint"])
    for dialect, insert in (("postgresql", postgresql.insert), ("sqlite", sqlite.insert))
}
# The one-item path (start_or_resume) learns from RETURNING whether its row was new.
_INSERT_ONE_TRANSACTION = {
    dialect: insert.returning(TX.c.fingerprint) for dialect, insert in _INSERT_TRANSACTIONS.items()
}


def new_uuid() -> str:
    """A new transaction's uuid: a UUIDv7 (RFC 9562), so uuids sort by creation time.

    Every index that starts with the uuid (the transaction's key, its stages', its events')
    then takes new rows at its end, not on a random page each: a batch of intake writes a
    few pages instead of one per index and transaction, and the stages of transactions
    taken in together sit together when a run records them (random uuid4 keys made each
    intake commit write ~4x the pages on SQLite). Its other bits are random (or a counter:
    uuids made in the same millisecond sort in order too).
    """
    return str(uuid_utils.uuid7())


@dataclass(frozen=True)
class Intake:
    """What ``start_many`` did with one payload."""

    uuid: str
    is_new: bool


def prepare(
    process: Process, payloads: Sequence[Mapping[str, Any] | Item],
    default: Schedule = Schedule(),
) -> list[tuple[dict[str, Any], str, str, Schedule]]:
    """Each payload validated, with its fingerprint, business key and schedule (an
    ``Item``'s own, else ``default``); one bad item rejects the batch with an error naming
    its index."""
    prepared = []
    for index, payload in enumerate(payloads):
        try:
            schedule = default
            if isinstance(payload, Item):
                payload, schedule = payload.payload, payload.schedule()
            clean = validate_payload(payload)
            prepared.append((clean, process.dedup.fingerprint(clean),
                             process.dedup.business_key(clean), schedule))
        except ValueError as exc:
            prefix = f"payload #{index}: " if len(payloads) > 1 else ""
            raise ValueError(f"{prefix}{exc}") from None
    return prepared


def start_many(
    engine: Engine,
    process: Process,
    payloads: Sequence[Mapping[str, Any] | Item],
    source: str | None,
    now: datetime,
    default: Schedule = Schedule(),
) -> list[Intake]:
    """Create the transactions of ``payloads`` that do not exist yet (see ``Tracker``)."""
    source = validate_source(source)
    prepared = prepare(process, payloads, default)
    if not prepared:
        return []
    new_rows: dict[str, dict[str, Any]] = {}
    starts: dict[str, datetime] = {}  # by uuid: when the first stage is due
    for payload, fp, key, schedule in prepared:
        if fp not in new_rows:
            new_rows[fp] = {
                "uuid": new_uuid(),
                "process_code": process.code,
                "fingerprint": fp,
                "business_key": key[:200],
                "source": source,
                "payload": payload,
                "state": TxState.PENDING,
                "created_at": now,
                "updated_at": now,
                "priority": schedule.priority,
                "not_before": schedule.not_before,
                "deadline": schedule.deadline,
                "due_at": schedule.due_at(now, process.sla),
            }
            starts[new_rows[fp]["uuid"]] = schedule.start_at(now)
    with write_transaction(engine) as conn:
        rows = list(new_rows.values())
        if len(rows) == 1:
            insert = _INSERT_ONE_TRANSACTION[conn.dialect.name]
            created = {r.fingerprint for r in fetch(conn, insert, rows[0])}
            existing = _uuids_by_fingerprint(conn, process.code, [
                fp for fp in new_rows if fp not in created])
        else:
            # Many rows: one executemany that skips the fingerprints already taken, then one
            # read of every fingerprint's uuid: a row holding the uuid made here is new.
            execute_many(conn, _INSERT_TRANSACTIONS[conn.dialect.name], rows)
            existing = _uuids_by_fingerprint(conn, process.code, list(new_rows))
            created = {fp for fp, row in new_rows.items() if existing[fp] == row["uuid"]}
        if created:
            txs = [row for fp, row in new_rows.items() if fp in created]
            _insert_stages(conn, process, txs, starts, now)
    results = []
    for _, fp, _, _ in prepared:
        if fp in created:
            results.append(Intake(new_rows[fp]["uuid"], True))
            created.discard(fp)  # a repeat of the item later in the batch is a duplicate
            existing[fp] = new_rows[fp]["uuid"]
        else:
            results.append(Intake(existing[fp], False))
    return results


def _uuids_by_fingerprint(
    conn: Conn, process_code: str, fingerprints: list[str]
) -> dict[str, str]:
    if not fingerprints:
        return {}
    params = {"b_process": process_code, "b_fingerprints": fingerprints}
    return dict(fetch(conn, _SELECT_FINGERPRINTS, params))


def _insert_stages(
    conn: Conn, process: Process, txs: list[dict[str, Any]], starts: dict[str, datetime],
    now: datetime,
) -> None:
    plan = []
    for planned in process.stage_plan():
        policy = process.get_platform(planned.platform).retry
        plan.append(
            {
                "process_code": process.code,
                "platform": planned.platform,
                "stage": planned.stage,
                "seq": planned.seq,
                "platform_order": planned.platform_order,
                "state": StageState.PENDING,
                "attempt": 0,
                "attempts_allowed": policy.max_attempts,
                **policy_columns(policy),
                "next_attempt_at": None,
                "created_at": now,
                "updated_at": now,
            }
        )
    # Only the first stage is reachable (not before ``not_before``); the others wait for it.
    # Every stage carries its transaction's priority and due time (claims read them there).
    stage_rows = [
        {**stage, "uuid": tx["uuid"], "priority": tx["priority"], "due_at": tx["due_at"],
         "next_attempt_at": starts[tx["uuid"]] if stage["seq"] == 1 else None}
        for tx in txs for stage in plan
    ]
    event_rows = [
        {
            "uuid": tx["uuid"],
            "process_code": process.code,
            "kind": EventKind.CREATED,
            "tx_state": TxState.PENDING,
            "description": f"created from {tx['source']}" if tx["source"] else "created",
            "created_at": now,
        }
        for tx in txs
    ]
    execute_many(conn, _INSERT_STAGES, stage_rows)
    execute_many(conn, INSERT_EVENTS, event_rows)
