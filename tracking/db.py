"""Engines and migrations.

``connect(url)`` returns a SQLAlchemy engine on the tracking database; it migrates only when
asked (``migrate=True``: ``tracking db upgrade``, the demo, the API's startup, tests), and the
flows check that the schema is current (``check_schema``) instead of changing it.

SQLite (the embedded default) is set up for several processes: WAL, a busy timeout and
``BEGIN IMMEDIATE`` for write transactions, so writers queue instead of failing; the writers
of one process queue on a lock of their own, and a background thread copies the WAL back
into the database file while they write (``_Checkpointer``). PostgreSQL
uses psycopg 3, each connection planning every statement with its own parameters.

Example:
    engine = connect("sqlite:///tracking.db", migrate=True)   # created and migrated
    engine = connect("postgresql://postgres@127.0.0.1:5432/tracking")
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine, make_url

from tracking.errors import TrackingError

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 60_000
SQLITE_CACHE_KIB = 65_536
SQLITE_WAL_CHECKPOINT_PAGES = 10_000
_READ_ONLY = "tracking_read_only"
_HOLDS_WRITER = "tracking_holds_writer"
log = logging.getLogger(__name__)


class _Checkpointer:
    """Copies a SQLite database's WAL back into its file from a background thread, so that
    its writers need not: SQLite's own checkpoint runs in the commit that crosses its
    threshold, two fsyncs included (70-100 ms every ~40 MiB of WAL on a small machine), and
    holds up that writer and every writer of the process queued behind it. The writers' own
    checkpoint stays as a backstop, for a WAL that grows faster than this thread copies it.

    The thread starts with a commit and ends after ``IDLE_SECONDS`` without one (the next
    commit starts it again), or when the engine is disposed (``stop``). Each checkpoint has a
    connection of its own, closed right after: between checkpoints the thread holds none,
    so the last connection to close is still one of the engine's, and SQLite then copies
    the rest of the WAL and removes it, as without this thread (a copy of the database
    file made after ``engine.dispose()`` has everything). ``writer`` is the process's writer
    lock: a commit wakes the thread holding it, and the thread decides to end holding it,
    so no commit is missed.
    """

    IDLE_SECONDS = 2.0
    PAUSE_SECONDS = 0.2  # between two checkpoints: the commits meanwhile share the next one

    def __init__(self, path: str, writer: threading.RLock) -> None:
        self._path, self._writer = path, writer
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._failed = False

    def committed(self) -> None:
        """A write transaction committed (called holding the writer lock)."""
        if self._failed:
            return
        if not self._wake.is_set():
            self._wake.set()
        # Not alive: it died of an unexpected error, or this is a forked child (threads of
        # the parent are not alive here).
        if self._thread is None or not self._thread.is_alive():
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(self._stop,), daemon=True,
                                            name=f"tracking-checkpoint {Path(self._path).name}")
            self._thread.start()

    def stop(self) -> None:
        """End the thread and wait for it (its checkpoint in progress ends first)."""
        with self._writer:
            thread, self._thread = self._thread, None
            self._stop.set()
            self._wake.set()  # it may be waiting for a commit
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    def _run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                if not self._wake.wait(self.IDLE_SECONDS) and self._ended():
                    return
                if stop.is_set():
                    return
                self._wake.clear()
                self._checkpoint()
                stop.wait(self.PAUSE_SECONDS)
        except sqlite3.Error as exc:  # the writers' own checkpoint takes over, for good
            log.warning("background checkpoints of %s stopped: %s", self._path, exc)
            self._failed = True

    def _checkpoint(self) -> None:
        # mode=rw: a database file removed meanwhile is not made again, empty.
        connection = sqlite3.connect(f"{Path(self._path).absolute().as_uri()}?mode=rw",
                                     uri=True, isolation_level=None)
        try:
            # The checkpoint syncs as the writers' transactions do.
            connection.execute("PRAGMA synchronous=NORMAL")
            # PASSIVE: as much as no reader or writer holds up, never waiting for one.
            connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            connection.close()

    def _ended(self) -> bool:
        """Idle: end, unless a commit came meanwhile."""
        with self._writer:
            if self._wake.is_set():
                return False
            if self._thread is threading.current_thread():
                self._thread = None
            return True


class _Writers:
    """A SQLite engine's writers in this process: the lock they queue on and, for a database
    file, the checkpointer that copies what they write back into it."""

    def __init__(self, path: str | None) -> None:
        self.lock = threading.RLock()
        self.checkpointer = _Checkpointer(path, self.lock) if path else None

    def committed(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.committed()

    def disposed(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.stop()


# Each SQLite engine's writers in this process (see _sqlite_engine).
_WRITERS: weakref.WeakKeyDictionary[Engine, _Writers] = weakref.WeakKeyDictionary()


def normalise_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs (psycopg2 is not a dependency)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def create_engine(url: str) -> Engine:
    """An engine configured for the tracking store, without running migrations."""
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(
            f"unsupported database {parsed.get_backend_name()!r}: use sqlite:/// or postgresql://"
        )
    return _postgresql_engine(url)


def _postgresql_engine(url: str) -> Engine:
    engine = sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        # psycopg prepares a statement run five times, and PostgreSQL may then plan it once
        # for any parameters: a batch's ``uuid IN (...500 values)`` got a plan made from the
        # statistics of an empty table (a scan of every stage, ~20x slower at 60k stages).
        # A plan per execution costs well under a millisecond for these statements.
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        dbapi_connection.execute("SET plan_cache_mode = force_custom_plan")
        dbapi_connection.autocommit = autocommit

    return engine


def _database_file(database: str | None) -> str | None:
    """The path of a SQLite database file (None: in memory, or named by a URI)."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return str(Path(database).expanduser())


def _sqlite_engine(url: str) -> Engine:
    path = _database_file(make_url(url).database)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        # Let SQLAlchemy emit BEGIN itself (pysqlite's implicit BEGIN is DEFERRED).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        # SQLite's default page cache is 2 MiB; index pages of a few 100k items need more.
        cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        # Checkpoint every ~40 MiB of WAL, not SQLite's 4 MiB: a page rewritten by many small
        # commits (an index's last page, a count) is copied back once per checkpoint, and
        # one-by-one intake takes ~25% less time.
        cursor.execute(f"PRAGMA wal_autocheckpoint={SQLITE_WAL_CHECKPOINT_PAGES}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    # Writers of this process queue on a Python lock: SQLite's busy handler, which is left to
    # arbitrate between processes, waits by sleeping (up to 100 ms a turn), so threads that
    # contend through it lose far more time than the writes themselves take.
    writers = _WRITERS[engine] = _Writers(path)
    writer = writers.lock

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A write transaction takes the write lock up front, so two writers never deadlock
        # upgrading a read lock; read-only work keeps WAL's concurrent readers.
        if conn.get_execution_options().get(_READ_ONLY, False):
            _driver_sql(conn, "BEGIN")
            return
        writer.acquire()
        conn.info[_HOLDS_WRITER] = True
        try:
            # On the driver's cursor: exec_driver_sql costs ~3x the BEGIN itself, on every
            # write transaction.
            _driver_sql(conn, "BEGIN IMMEDIATE")
        except BaseException:
            _release_writer(conn)
            raise

    def _release_writer(conn: Connection | Any) -> None:
        if conn.info.pop(_HOLDS_WRITER, False):
            writer.release()

    # Released once the driver's COMMIT is done: SQLAlchemy's commit event comes before it,
    # and a lock released there let the next writer's BEGIN IMMEDIATE meet the commit still
    # running (SQLite's busy handler: a sleep of 1 ms or more, in a third of the
    # transactions of four writing threads). A rollback releases it at its event, as
    # before: a lost connection rolls back without the driver.
    commit = engine.dialect.do_commit

    def _commit_then_release(dbapi_connection: Any) -> None:
        try:
            commit(dbapi_connection)
            if dbapi_connection.info.get(_HOLDS_WRITER):
                writers.committed()
        finally:
            _release_writer(dbapi_connection)

    engine.dialect.do_commit = _commit_then_release  # type: ignore[method-assign]
    sa.event.listen(engine, "rollback", _release_writer)
    sa.event.listen(engine, "engine_disposed", lambda _engine: writers.disposed())
    return engine


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


def _driver_sql(conn: Connection | DriverConnection, statement: str) -> None:
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


def watched(engine: Engine) -> bool:
    """Whether someone watches the engine's statements: SQLAlchemy's cursor events (tests,
    tracing), its echo or its log at INFO."""
    events = engine.dispatch
    return bool(events.before_cursor_execute or events.after_cursor_execute
                or engine.logger.isEnabledFor(logging.INFO))


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
    writers = _WRITERS.get(engine)
    conn = DriverConnection(engine)
    if writers is not None:
        writers.lock.acquire()
    try:
        if writers is not None:
            _driver_sql(conn, "BEGIN IMMEDIATE")  # as _on_begin, without a Connection
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
        conn = conn.execution_options(**{_READ_ONLY: True})
        with conn.begin():
            yield conn


def _alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(_alembic_config()).get_current_head() or ""


def current_revision(engine: Engine) -> str | None:
    with read_only(engine) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the migrations; safe when several processes do it at once."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Serialise concurrent upgrades; SQLite's BEGIN IMMEDIATE already does.
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7316001)")
        command.upgrade(_alembic_config(conn), revision)


def check_schema(engine: Engine) -> None:
    """Refuse a database whose schema is not the code's (a ``TrackingError`` that says how
    to fix it), rather than work on tables that may lack columns."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        where = engine.url.render_as_string(hide_password=True)
        raise TrackingError(
            f"the tracking database {where} is at schema revision {current or 'none (empty)'}"
            f", this code needs {head}: run `tracking db upgrade`"
        )


def connect(url: str, *, migrate: bool = False) -> Engine:
    """An engine on the tracking database.

    Args:
        url: a SQLAlchemy URL (an entry point takes it from its settings:
            ``Settings().database_url``, ``TRACKING_DATABASE_URL``).
        migrate: bring the schema up to date first (the database is created on first use
            for SQLite). Default: leave it alone.
    """
    engine = create_engine(url)
    if migrate and current_revision(engine) != head_revision():
        upgrade(engine)
    return engine
