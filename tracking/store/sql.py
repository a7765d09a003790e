"""What the store's modules share: the tables, statements built once, locks and checks.

The hot paths' statements are built once at import: SQLAlchemy then reuses their compiled
form instead of rebuilding and re-hashing a statement on every call.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Row
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.visitors import InternalTraversal

from tracking.errors import TransactionNotFound
from tracking.models import EventKind, StageState, TxEvent, TxProcess, TxStage, TxState
from tracking.policy import RetryPolicy
from tracking.states import FINAL_TX_STATES, RUNNABLE_STAGE_STATES
from tracking.store.driver import Conn, Record, execute, execute_many, fetch


class _Values(sa.types.TypeDecorator[list[Any]]):
    """A list bound as one parameter: a JSON array on SQLite (read by ``json_each``), an
    array on PostgreSQL."""

    impl = sa.types.NullType
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        return json.dumps(list(value)) if dialect.name == "sqlite" else list(value)


class _AnyOf(sa.sql.expression.ColumnElement[bool]):
    """``column IN <the list bound to one parameter>`` (see ``any_of``)."""

    inherit_cache = True
    type = sa.Boolean()
    _is_implicitly_boolean = True  # a condition as it is (no "= 1" on SQLite)
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement),
                           ("values", InternalTraversal.dp_clauseelement)]

    def __init__(self, column: sa.ColumnElement[Any], name: str) -> None:
        self.column = column
        self.values = sa.bindparam(name, type_=_Values())


@compiles(_AnyOf, "sqlite")
def _any_of_sqlite(element: _AnyOf, compiler: Any, **kw: Any) -> str:
    column, values = compiler.process(element.column, **kw), compiler.process(element.values, **kw)
    return f"{column} IN (SELECT value FROM json_each({values}))"


@compiles(_AnyOf, "postgresql")
def _any_of_postgresql(element: _AnyOf, compiler: Any, **kw: Any) -> str:
    column, values = compiler.process(element.column, **kw), compiler.process(element.values, **kw)
    return f"{column} = ANY({values})"


def any_of(column: sa.ColumnElement[Any], name: str) -> sa.ColumnElement[bool]:
    """``column IN`` the list of values given as parameter ``name``, bound as ONE parameter
    (a JSON array on SQLite, an array on PostgreSQL): the statement compiles once whatever
    the list's length, where an expanding ``IN`` renders and converts a parameter per value
    on every call (the larger part of a batch statement's time in Python)."""
    return _AnyOf(column, name)


TX = TxProcess.__table__
STAGE = TxStage.__table__
EVENT = TxEvent.__table__
MAX_OWNER_LENGTH = 100
MAX_CLAIM = 10_000  # most stages one claim may reserve
CHUNK = 500  # ids per IN list
GROUP = 8  # fewest rows alike that execute_grouped writes with one IN statement

INSERT_EVENT = sa.insert(EVENT)
# For execute_many: no RETURNING of the new id on PostgreSQL.
INSERT_EVENTS = sa.insert(EVENT).inline()
LOCK_STAGES = (
    sa.select(STAGE)
    .where(STAGE.c.uuid == sa.bindparam("b_uuid"))
    .order_by(STAGE.c.seq)
    .with_for_update()
)
# What the writers read of a transaction they lock (not its payload: a JSON decode each).
LOCK_TX = (
    sa.select(TX.c.uuid, TX.c.process_code, TX.c.state, TX.c.finished_at)
    .where(TX.c.uuid == sa.bindparam("b_uuid"))
    .with_for_update()
)
# SET clauses come from the column names in the parameters of each call.
UPDATE_STAGE = sa.update(STAGE).where(STAGE.c.id == sa.bindparam("b_id"))
UPDATE_TX = sa.update(TX).where(TX.c.uuid == sa.bindparam("b_uuid"))
UPDATE_TXS = sa.update(TX).where(any_of(TX.c.uuid, "b_uuids"))
# A stage IN_PROGRESS is either reserved (no attempt started yet) or running an attempt.
RESERVED = sa.and_(STAGE.c.state == StageState.IN_PROGRESS, STAGE.c.started_at.is_(None))
# A stage that may run (PENDING or TERMINATED), as ORs: the driver takes no expanding IN.
RUNNABLE = sa.or_(*(STAGE.c.state == state for state in sorted(RUNNABLE_STAGE_STATES)))
# Parameters the claim and lease statements share (they are built once, with these bound).
PROCESS, PLATFORM, OWNER = (sa.bindparam(n) for n in ("b_process", "b_platform", "b_owner"))
NOW = sa.bindparam("b_now", type_=STAGE.c.updated_at.type)
# The other stages of a rejected transaction still to run (the earlier ones are done).
CANCEL_REST = (
    sa.update(STAGE)
    .where(STAGE.c.uuid == sa.bindparam("b_uuid"), STAGE.c.id != sa.bindparam("b_id"),
           RUNNABLE)
    .values(state=StageState.CANCELLED, next_attempt_at=None, updated_at=sa.bindparam("v_now"),
            finished_at=sa.bindparam("v_now"),
            error_description="cancelled: an earlier stage was rejected")
)


def execute_grouped(conn: Connection, one: Any, many: Any, key: str, names: Sequence[str],
                    groups: Mapping[tuple[Any, ...], Sequence[Any]]) -> None:
    """Write rows that share their values together. ``groups`` maps the values of
    ``names`` to the keys (ids, uuids) of the rows that take them: ``GROUP`` or more keys
    run as ``many`` (``WHERE <key column> IN`` the list ``<key>s``, one statement; a batch's
    results mostly share their state, timestamps and attempt), fewer as one ``execute_many``
    of ``one`` (``WHERE <key column> = :key``, a row each) for all such groups together.
    Either way every row is written; a set-based statement is cheaper per row (one plan,
    one execution), a few rows cheaper in the executemany."""
    alone = []
    for values, keys in groups.items():
        given = dict(zip(names, values, strict=True))
        if len(keys) < GROUP:
            alone += ({key: k, **given} for k in keys)
        else:
            conn.execute(many, {f"{key}s": keys, **given})
    execute_many(conn, one, alone)


def as_dicts(rows: Sequence[Row[Any]]) -> list[dict[str, Any]]:
    """Rows of one result as dicts (the keys read once: a third of ``dict(row._mapping)``'s
    time per row)."""
    if not rows:
        return []
    keys = rows[0]._fields
    return [dict(zip(keys, row, strict=True)) for row in rows]


def insert_for(dialect: sa.Dialect, table: sa.Table) -> Any:
    """An INSERT with the dialect's ON CONFLICT support (PostgreSQL or SQLite)."""
    return (postgresql.insert if dialect.name == "postgresql" else sqlite.insert)(table)


def lock(conn: Conn, uuid: str) -> tuple[list[Any], Any]:
    """Lock the transaction's stages, then the transaction (the global lock order, so
    concurrent workers and operators cannot deadlock); their rows as named tuples."""
    check_uuid(uuid)
    stages = fetch(conn, LOCK_STAGES, {"b_uuid": uuid})
    tx = fetch(conn, LOCK_TX, {"b_uuid": uuid})
    if not tx:
        raise TransactionNotFound(f"no transaction {uuid!r}")
    return stages, tx[0]


def set_tx_state(conn: Conn, tx: Record, state: TxState, now: datetime) -> None:
    """Move a locked transaction to ``state`` (its ``finished_at`` follows)."""
    execute(conn, UPDATE_TX, {"b_uuid": tx.uuid,
                              **tx_changes(tx.state, tx.finished_at, state, now)})


def tx_changes(state: TxState, finished_at: datetime | None, to: TxState, now: datetime
               ) -> dict[str, Any]:
    """The columns of ``UPDATE_TX`` that move a transaction from ``state`` (finished at
    ``finished_at``) to ``to``: only what changes (a state that stays is not written, so its
    indexes and counts stay untouched)."""
    values: dict[str, Any] = {"updated_at": now}
    if to != state:
        values["state"] = to
    if to in FINAL_TX_STATES and finished_at is None:
        values["finished_at"] = now
    elif to not in FINAL_TX_STATES and finished_at is not None:
        values["finished_at"] = None
    return values


def operator_event(
    conn: Connection,
    tx: Record,
    kind: EventKind,
    description: str,
    actor: str | None,
    now: datetime,
    to_state: TxState,
) -> None:
    """The audit event of an operator's action on a whole transaction."""
    conn.execute(
        INSERT_EVENT,
        {
            "uuid": tx.uuid,
            "process_code": tx.process_code,
            "kind": kind,
            "description": description,
            "from_state": TxState(tx.state).value,
            "to_state": to_state.value,
            "tx_state": to_state,
            "actor": actor,
            "created_at": now,
        },
    )


def policy_columns(policy: RetryPolicy) -> dict[str, Any]:
    """The stage columns that store the retry policy it runs under."""
    return {
        "retry_delay_seconds": policy.delay,
        "retry_backoff": policy.backoff,
        "retry_max_delay_seconds": policy.max_delay,
        "retry_jitter_seconds": policy.jitter,
    }


def policy_of(row: Any) -> RetryPolicy:
    """The retry policy a stage row runs under (its cap is ``attempts_allowed``)."""
    return retry_policy(row.retry_delay_seconds, row.retry_backoff, row.retry_max_delay_seconds,
                   row.retry_jitter_seconds)


def policy_in(stage: Mapping[str, Any]) -> RetryPolicy:
    """``policy_of`` for a stage read as a dict."""
    return retry_policy(stage["retry_delay_seconds"], stage["retry_backoff"],
                   stage["retry_max_delay_seconds"], stage["retry_jitter_seconds"])


@functools.lru_cache(maxsize=256)
def retry_policy(delay: float, backoff: float, max_delay: float | None, jitter: float
                 ) -> RetryPolicy:
    """The retry policy of a stage's four policy columns (a batch's stages share a few:
    each is checked and built once)."""
    return RetryPolicy(delay=delay, backoff=backoff, max_delay=max_delay, jitter=jitter)


def label(row: Any) -> str:
    return f"stage {row.platform}.{row.stage} of transaction {row.uuid}"


def check_uuid(uuid: Any) -> str:
    if not isinstance(uuid, str):
        raise TransactionNotFound(f"transaction uuid must be a string, got {uuid!r}")
    return uuid


def check_limit(limit: Any, maximum: int = MAX_CLAIM) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= maximum:
        raise ValueError(f"limit must be an int from 1 to {maximum}, got {limit!r}")
    return limit


def check_seconds(seconds: Any, name: str = "lease_seconds") -> float:
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        raise ValueError(f"{name} must be a number of seconds > 0, got {seconds!r}")
    return float(seconds)


def check_owner(owner: Any) -> str:
    if not isinstance(owner, str) or not owner or len(owner) > MAX_OWNER_LENGTH:
        raise ValueError(f"owner must be a non-empty string of at most {MAX_OWNER_LENGTH} chars")
    return owner
