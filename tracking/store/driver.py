"""Statements run on the database driver's own cursor: the paths that write one item at a
time (``start_or_resume``, ``start_attempt``, ``complete_stage``) and the rows of a batch.

Through ``Connection.execute`` a statement costs ~50 µs of Python before the database sees
it (an execution context, its events, a result object): more than SQLite takes to insert a
row, and most of a one-item write. Here a statement is compiled once per dialect and set of
parameter names; a call converts the values with the columns' own types, as SQLAlchemy
would, and hands them to the cursor. The driver's errors leave as SQLAlchemy's
(``tracking.connections.driver_error``), so callers and outage handling see no difference; an engine
whose statements are watched (cursor events, echo) gets them through SQLAlchemy as before.
``conn`` is a ``Connection`` or, for a path that runs nothing else, the connection of
``tracking.connections.write_transaction`` (no ``Connection`` at all).

A statement given here binds every value as one parameter: no expanding ``IN`` (use
``sql.any_of``), and an INSERT names every column that has a Python-side default.

Example:
    (tx,) = fetch(conn, LOCK_TX, {"b_uuid": uuid})         # named tuples, typed values
    changed = execute(conn, UPDATE_STAGE, {"b_id": 7, "updated_at": now})   # row count
    execute_many(conn, INSERT_EVENTS, events)
"""

from __future__ import annotations

import functools
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tracking.connections import DriverConnection, close_cursor, driver_error, watched

Processor = Callable[[Any], Any] | None
# A Connection, or a write_transaction's connection (only used when nobody watches).
Conn = Connection | DriverConnection
_FROM_ROW = object()  # a parameter each call gives (not a constant of the statement)


class Record(Protocol):
    """A row read by column name: ``fetch``'s named tuples and SQLAlchemy's ``Row`` alike."""

    def __getattr__(self, name: str) -> Any: ...

    def _asdict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Form:
    """A statement compiled for the driver: its SQL and, for each parameter in order, its
    name, the statement's own value for it (a constant) or ``_FROM_ROW``, and its type's bind
    processor; for a statement that returns rows, their named-tuple class and the types of
    its columns (their result processors depend on what the driver reports: see ``typed_rows``)."""

    sql: str
    positional: bool
    params: tuple[tuple[str, Any, Processor], ...]
    row: Any = None
    types: tuple[sa.types.TypeEngine[Any], ...] = ()
    # By the driver's column types: (column index, result processor) of each converted.
    results: dict[tuple[Any, ...], tuple[tuple[int, Any], ...]] = field(default_factory=dict)

    @functools.cached_property
    def processed(self) -> tuple[tuple[int, Any], ...]:
        """(index, bind processor) of each parameter that has one."""
        return tuple((i, p) for i, (_, _, p) in enumerate(self.params) if p is not None)


@functools.lru_cache(maxsize=256)
def form(statement: Any, dialect: sa.Dialect, keys: tuple[str, ...], many: bool = False) -> Form:
    """``statement`` compiled for ``dialect`` with parameters ``keys`` (the SET or VALUES
    columns of an UPDATE or INSERT come from them), once."""
    compiled = statement.compile(dialect=dialect, column_keys=list(keys), for_executemany=many)
    if compiled.insert_prefetch:
        missing = ", ".join(c.key for c in compiled.insert_prefetch)
        raise ValueError(f"every value must be given: no value for {missing} (a default)")
    if any(b.expanding for b in compiled.binds.values()):
        raise ValueError("a list bound with an expanding IN: use tracking.store.sql.any_of")
    names = compiled.positiontup if compiled.positional else list(compiled.bind_names.values())
    params = []
    for name in names:
        bind = compiled.binds[name]
        given = _FROM_ROW if bind.required or bind.key in keys else bind.value
        # The dialect's own form of the type, as SQLAlchemy converts (SQLite's DATETIME
        # stores microseconds always: timestamps compare as text there).
        params.append((name, given, bind.type.dialect_impl(dialect).bind_processor(dialect)))
    columns = list(getattr(statement, "selected_columns", None) or
                   getattr(statement, "exported_columns", None) or ())
    row = namedtuple("Row", [c.key for c in columns]) if columns else None  # type: ignore[misc]
    return Form(compiled.string, compiled.positional, tuple(params), row,
                tuple(c.type.dialect_impl(dialect) for c in columns))


def bind(f: Form, values: Mapping[str, Any]) -> Any:
    """The driver's parameters of one call: a tuple, or a dict for a dialect of named
    parameters (what both the driver and ``exec_driver_sql`` take)."""
    out = [values[name] if given is _FROM_ROW else given for name, given, _ in f.params]
    for i, process in f.processed:
        if out[i] is not None:
            out[i] = process(out[i])
    if f.positional:
        return tuple(out)
    return dict(zip((name for name, _, _ in f.params), out, strict=True))


def execute(conn: Conn, statement: Any, values: Mapping[str, Any]) -> int:
    """Run ``statement`` with ``values``; how many rows it changed."""
    f = form(statement, conn.dialect, tuple(values))
    return _run(conn, f.sql, bind(f, values), many=False, fetch=False)[0]


def fetch(conn: Conn, statement: Any, values: Mapping[str, Any]) -> list[Any]:
    """Run ``statement`` (a SELECT, or a write with RETURNING); its rows as named tuples,
    each value converted by its column's type."""
    f = form(statement, conn.dialect, tuple(values))
    _, description, raw = _run(conn, f.sql, bind(f, values), many=False, fetch=True)
    return typed_rows(f, conn.dialect, description, raw)


def _run(conn: Conn, sql: str, params: Any, *, many: bool, fetch: bool
         ) -> tuple[int, Any, list[Any]]:
    """The driver's row count, description and rows. When the engine's statements are
    watched (SQLAlchemy's cursor events, its echo or log at INFO: tests, tracing, debugging),
    through ``exec_driver_sql``: the watchers see every statement, at SQLAlchemy's cost."""
    if isinstance(conn, Connection) and watched(conn):
        result = conn.exec_driver_sql(sql, params)
        description = result.cursor.description if fetch else None
        return result.rowcount, description, list(result.fetchall()) if fetch else []
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        if many:
            cursor.executemany(sql, params)
            return cursor.rowcount, None, []
        cursor.execute(sql, params)
        if fetch:
            return cursor.rowcount, cursor.description, cursor.fetchall()
        return cursor.rowcount, None, []
    except conn.dialect.loaded_dbapi.Error as exc:
        raise driver_error(conn, exc, sql, params, cursor) from exc
    finally:
        close_cursor(conn, cursor)



def typed_rows(f: Form, dialect: sa.Dialect, description: Any, raw: list[Any]) -> list[Any]:
    """Driver rows as ``f``'s named tuples, converted (the processors are made once for each
    set of column types the driver reports: PostgreSQL's numeric ones depend on them)."""
    codes = tuple(d[1] for d in description or ())
    processors = f.results.get(codes)
    if processors is None:
        made = [t.result_processor(dialect, code) for t, code in zip(f.types, codes, strict=True)]
        processors = f.results[codes] = tuple((i, p) for i, p in enumerate(made) if p)
    if not processors:
        return [f.row._make(r) for r in raw]
    out = []
    for r in raw:
        values = list(r)
        for i, process in processors:
            if values[i] is not None:
                values[i] = process(values[i])
        out.append(f.row._make(values))
    return out


def execute_many(conn: Conn, statement: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """``conn.execute(statement, rows)`` for a batch, without SQLAlchemy's per-row parameter
    handling (most of a batch's time): each distinct value converted by its column's type
    once per call (a batch's rows share their timestamps and states). Every row gives the
    same keys; an INSERT gives every column that has a default."""
    if not rows:
        return
    f = form(statement, conn.dialect, tuple(rows[0]), many=True)
    if len(rows) == 1:  # one item's intake or record: no distinct values to share
        _run(conn, f.sql, [bind(f, rows[0])], many=True, fetch=False)
        return
    # A column at a time: each row's values in order, then each typed column converted.
    columns = [[row[name] for row in rows] if given is _FROM_ROW else [given] * len(rows)
               for name, given, _ in f.params]
    for values, (_, _, process) in zip(columns, f.params, strict=True):
        if process is not None:
            _convert(values, process)
    if f.positional:
        params: list[Any] = list(zip(*columns, strict=True))
    else:
        names = [name for name, _, _ in f.params]
        params = [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]
    _run(conn, f.sql, params, many=True, fetch=False)


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
