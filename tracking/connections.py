"""Transactions on the tracking database, and its driver used without SQLAlchemy's
statement machinery.

``write_transaction(engine)`` is a write transaction on the pooled connection's driver (the
one-item paths, ``tracking.store.driver``), ``read_only(engine)`` a read that never takes
SQLite's write lock. An engine whose database takes one writer at a time (SQLite,
``tracking.sqlite``) registers its writers in ``WRITERS``: a write transaction queues on
their lock, and tells them when it committed.

Example:
    with write_transaction(engine) as conn:
        driver.execute(conn, UPDATE_TX, {"b_uuid": uuid, "updated_at": now})
    with read_only(engine) as conn:
        conn.execute(query).all()
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

#: An execution option: the transaction only reads (no writer's lock, a plain BEGIN).
READ_ONLY = "tracking_read_only"


class Writers(Protocol):
    """The writers of an engine's database in this process, when it takes one at a time."""

    lock: threading.RLock

    def committed(self) -> None: ...


# Each such engine's writers in this process (registered by tracking.sqlite).
WRITERS: weakref.WeakKeyDictionary[Engine, Writers] = weakref.WeakKeyDictionary()


@contextmanager
def driver_cursor(conn: Connection | DriverConnection, statement: str, params: Any = None
                  ) -> Iterator[Any]:
    """The driver's own cursor on ``conn``'s connection, for ``statement`` run without
    SQLAlchemy's execution machinery (``tracking.store.driver``); the driver's errors leave
    as SQLAlchemy's (``driver_error``).

    Example:
        with driver_cursor(conn, sql, params) as cursor:
            cursor.execute(sql, params)
    """
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        yield cursor
    except conn.dialect.loaded_dbapi.Error as exc:
        raise driver_error(conn, exc, statement, params, cursor) from exc
    finally:
        close_cursor(conn, cursor)


def driver_sql(conn: Connection | DriverConnection, statement: str) -> None:
    with driver_cursor(conn, statement) as cursor:
        cursor.execute(statement)


def driver_error(conn: Connection | DriverConnection, exc: Exception, statement: str,
                 params: Any, cursor: Any) -> sa.exc.DBAPIError:
    """The driver's error ``exc`` as SQLAlchemy's (``sqlalchemy.exc.DBAPIError`` and its
    kinds), as ``Connection.execute`` raises it, the connection invalidated if it was lost:
    callers and outage handling see no difference."""
    lost = conn.dialect.is_disconnect(exc, conn.connection.dbapi_connection, cursor)
    if lost:
        conn.invalidate(exc)
    return sa.exc.DBAPIError.instance(statement, params, exc, conn.dialect.loaded_dbapi.Error,
                                      connection_invalidated=lost, dialect=conn.dialect)


def close_cursor(conn: Connection | DriverConnection, cursor: Any) -> None:
    try:
        cursor.close()
    except conn.dialect.loaded_dbapi.Error:
        pass  # a lost connection's cursor: the error being raised says what happened


class DriverConnection:
    """A pooled connection used through its driver only (``write_transaction``): what
    ``driver_cursor`` and ``tracking.store.driver`` need of a connection."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        self.connection = engine.raw_connection()

    def invalidate(self, exception: BaseException | None = None) -> None:
        self.connection.invalidate(exception)


def watched(target: Engine | Connection) -> bool:
    """Whether someone watches the statements of an engine (or of one of its connections):
    SQLAlchemy's cursor events (tests, tracing), its echo or its log at INFO."""
    events = target.dispatch  # a connection's listeners include its engine's
    return bool(events.before_cursor_execute or events.after_cursor_execute
                or target.engine.logger.isEnabledFor(logging.INFO))


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection | DriverConnection]:
    """A write transaction for work done only with ``tracking.store.driver``'s statements
    (the one-item paths): ``engine.begin()`` without its ``Connection``, whose events and
    bookkeeping cost ~60 µs, as much as a small write's own work. It takes the pool's
    connection, SQLite's writer lock and ``BEGIN IMMEDIATE``, then commits, or rolls back
    on any error; the driver's errors leave as SQLAlchemy's. An engine whose statements are
    watched (``watched``) gets ``engine.begin()``, so they see every one.

    Example:
        with write_transaction(engine) as conn:
            driver.execute(conn, UPDATE_TX, {"b_uuid": uuid, "updated_at": now})
    """
    if watched(engine):
        with engine.begin() as conn:
            yield conn
        return
    writers = WRITERS.get(engine)
    conn = DriverConnection(engine)
    if writers is not None:
        writers.lock.acquire()
    try:
        if writers is not None:
            driver_sql(conn, "BEGIN IMMEDIATE")  # as tracking.sqlite does, without a Connection
        yield conn
        with driver_cursor(conn, "COMMIT"):
            conn.connection.dbapi_connection.commit()
        if writers is not None:
            writers.committed()
    except BaseException:
        _rollback(conn)
        raise
    finally:
        if writers is not None:
            writers.lock.release()
        conn.connection.close()  # back to the pool (a lost one is discarded)


def _rollback(conn: DriverConnection) -> None:
    if not conn.connection.is_valid:
        return  # lost: the database rolled back when it went
    try:
        conn.connection.dbapi_connection.rollback()
    except conn.dialect.loaded_dbapi.Error as exc:
        conn.invalidate(exc)  # not usable again; the error being raised says why


@contextmanager
def read_only(engine: Engine) -> Iterator[Connection]:
    """A connection for reads that never takes SQLite's write lock."""
    with engine.connect() as conn:
        conn = conn.execution_options(**{READ_ONLY: True})
        with conn.begin():
            yield conn
