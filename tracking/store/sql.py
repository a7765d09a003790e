"""What the store's modules share: the tables, statements built once, locks and checks.

The hot paths' statements are built once at import: SQLAlchemy then reuses their compiled
form instead of rebuilding and re-hashing a statement on every call.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Row

from tracking.errors import TransactionNotFound
from tracking.models import EventKind, StageState, TxEvent, TxProcess, TxStage, TxState
from tracking.policy import RetryPolicy
from tracking.states import FINAL_TX_STATES

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
LOCK_TX = sa.select(TX).where(TX.c.uuid == sa.bindparam("b_uuid")).with_for_update()
# SET clauses come from the column names in the parameters of each call.
UPDATE_STAGE = sa.update(STAGE).where(STAGE.c.id == sa.bindparam("b_id"))
UPDATE_TX = sa.update(TX).where(TX.c.uuid == sa.bindparam("b_uuid"))
UPDATE_TXS = sa.update(TX).where(TX.c.uuid.in_(sa.bindparam("b_uuids", expanding=True)))
# A stage IN_PROGRESS is either reserved (no attempt started yet) or running an attempt.
RESERVED = sa.and_(STAGE.c.state == StageState.IN_PROGRESS, STAGE.c.started_at.is_(None))


_FROM_ROW = object()  # a parameter each row gives (not a constant of the statement)


@dataclass(frozen=True)
class _DriverForm:
    """A statement compiled for executemany: its SQL and, for each parameter in order, its
    name, the statement's own value for it (a constant of its WHERE clause) or ``_FROM_ROW``,
    and its type's bind processor."""

    sql: str
    positional: bool
    params: tuple[tuple[str, Any, Callable[[Any], Any] | None], ...]


@functools.lru_cache(maxsize=128)
def _driver_form(statement: Any, dialect: sa.Dialect, keys: tuple[str, ...]) -> _DriverForm:
    compiled = statement.compile(dialect=dialect, column_keys=list(keys), for_executemany=True)
    if compiled.insert_prefetch or any(b.expanding for b in compiled.binds.values()):
        raise ValueError("execute_many: every value must be given, and no expanding IN")
    names = compiled.positiontup if compiled.positional else list(compiled.bind_names.values())
    params = []
    for name in names:
        bind = compiled.binds[name]
        given = _FROM_ROW if bind.required or bind.key in keys else bind.value
        # The dialect's own form of the type, as SQLAlchemy converts (SQLite's DATETIME
        # stores microseconds always: timestamps compare as text there).
        params.append((name, given, bind.type.dialect_impl(dialect).bind_processor(dialect)))
    return _DriverForm(compiled.string, compiled.positional, tuple(params))


def execute_many(conn: Connection, statement: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """``conn.execute(statement, rows)`` for a batch, without SQLAlchemy's per-row parameter
    handling (most of a batch's time): the statement is compiled once per dialect, and each
    distinct value converted by its column's type once per call (a batch's rows share their
    timestamps and states). Every row gives the same keys; an INSERT gives every column
    that has a default (else ``ValueError``)."""
    if not rows:
        return
    form = _driver_form(statement, conn.dialect, tuple(rows[0]))
    # A column at a time: each row's values in order, then each typed column converted.
    columns = [[row[name] for row in rows] if given is _FROM_ROW else [given] * len(rows)
               for name, given, _ in form.params]
    for values, (_, _, process) in zip(columns, form.params, strict=True):
        if process is not None:
            _convert(values, process)
    if form.positional:
        params: list[Any] = list(zip(*columns, strict=True))
    else:
        names = [name for name, _, _ in form.params]
        params = [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]
    conn.exec_driver_sql(form.sql, params)


def execute_grouped(conn: Connection, one: Any, many: Any, key: str,
                    rows: Sequence[Mapping[str, Any]]) -> None:
    """Run ``one`` (``WHERE <key column> = :key``) for each row, as few statements as the
    rows' values allow: ``GROUP`` or more rows that give the same values but ``key`` (a
    batch's results mostly do: the same state, timestamps and attempt) run as ``many``
    (``WHERE <key column> IN :<key>s``), one statement per ``CHUNK``; the rest as one
    ``execute_many`` of ``one``. Either way every row is written; a set-based statement is
    cheaper per row (one plan, one execution), a few rows cheaper in the executemany. Every
    row gives the same keys, and hashable values."""
    if not rows:
        return
    names = [k for k in rows[0] if k != key]
    values_of = operator.itemgetter(*names)
    groups: dict[Any, list[Any]] = {}
    for row in rows:
        groups.setdefault(values_of(row), []).append(row[key])
    alone = []
    for values, keys in groups.items():
        given = dict(zip(names, values if len(names) > 1 else (values,), strict=True))
        if len(keys) < GROUP:
            alone += ({key: k, **given} for k in keys)
            continue
        for i in range(0, len(keys), CHUNK):
            conn.execute(many, {f"{key}s": keys[i : i + CHUNK], **given})
    execute_many(conn, one, alone)


def _convert(values: list[Any], process: Callable[[Any], Any]) -> None:
    """Convert a column's values in place, each distinct one once (NULL stays NULL)."""
    done: dict[Any, Any] = {}
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            values[i] = done[v]
        except KeyError:
            values[i] = done[v] = process(v)
        except TypeError:  # unhashable (a JSON value): converted each time
            values[i] = process(v)


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


def lock(conn: Connection, uuid: str) -> tuple[list[Row[Any]], Row[Any]]:
    """Lock the transaction's stages, then the transaction (the global lock order, so
    concurrent workers and operators cannot deadlock)."""
    check_uuid(uuid)
    stages = conn.execute(LOCK_STAGES, {"b_uuid": uuid}).all()
    tx = conn.execute(LOCK_TX, {"b_uuid": uuid}).one_or_none()
    if tx is None:
        raise TransactionNotFound(f"no transaction {uuid!r}")
    return stages, tx


def set_tx_state(conn: Connection, tx: Row[Any], state: TxState, now: datetime) -> None:
    """Move a locked transaction to ``state`` (its ``finished_at`` follows)."""
    conn.execute(UPDATE_TX, {"b_uuid": tx.uuid, **tx_changes(tx, state, now)})


def tx_changes(tx: Row[Any], state: TxState, now: datetime) -> dict[str, Any]:
    """The columns of ``UPDATE_TX`` that move a transaction to ``state``: only what changes
    (a state that stays is not written, so its indexes and counts stay untouched)."""
    values: dict[str, Any] = {"updated_at": now}
    if state != tx.state:
        values["state"] = state
    if state in FINAL_TX_STATES and tx.finished_at is None:
        values["finished_at"] = now
    elif state not in FINAL_TX_STATES and tx.finished_at is not None:
        values["finished_at"] = None
    return values


def operator_event(
    conn: Connection,
    tx: Row[Any],
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
    return _policy(row.retry_delay_seconds, row.retry_backoff, row.retry_max_delay_seconds,
                   row.retry_jitter_seconds)


def policy_in(stage: Mapping[str, Any]) -> RetryPolicy:
    """``policy_of`` for a stage read as a dict."""
    return _policy(stage["retry_delay_seconds"], stage["retry_backoff"],
                   stage["retry_max_delay_seconds"], stage["retry_jitter_seconds"])


@functools.lru_cache(maxsize=256)
def _policy(delay: float, backoff: float, max_delay: float, jitter: float) -> RetryPolicy:
    # A batch's stages share a few policies: each is checked and built once.
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
