"""SQLite engines, set up for several threads and processes writing one database.

* WAL (readers never wait for the writer), a busy timeout, ``synchronous=NORMAL`` (a commit
  is durable once the WAL is, without an fsync per commit), a 64 MiB page cache, the WAL
  copied back every ~40 MiB, foreign keys on.
* A write transaction starts with ``BEGIN IMMEDIATE`` (it takes the write lock up front,
  so two writers never deadlock upgrading a read lock); reads start with a plain ``BEGIN``.
* The writers of one process queue on a lock of their own (``SQLiteWriters``), released once the
  driver's COMMIT is done.
* A background thread copies the WAL back into the database file while they write
  (``Checkpointer``).

Example:
    engine = sqlite_engine("sqlite:///tracking.db")   # tracking.db.create_engine picks it
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url

from tracking.connections import READ_ONLY, WRITERS, driver_sql

SQLITE_BUSY_TIMEOUT_MS = 60_000
SQLITE_CACHE_KIB = 65_536
SQLITE_WAL_CHECKPOINT_PAGES = 10_000
_HOLDS_WRITER = "tracking_holds_writer"
log = logging.getLogger(__name__)


class Checkpointer:
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


class SQLiteWriters:
    """A SQLite engine's writers in this process: the lock they queue on and, for a database
    file, the checkpointer that copies what they write back into it."""

    def __init__(self, path: str | None) -> None:
        self.lock = threading.RLock()
        self.checkpointer = Checkpointer(path, self.lock) if path else None

    def committed(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.committed()

    def disposed(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.stop()


def database_file(database: str | None) -> str | None:
    """The path of a SQLite database file (None: in memory, or named by a URI)."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return str(Path(database).expanduser())


def sqlite_engine(url: str) -> Engine:
    """An engine on the SQLite database ``url``, set up as this module says."""
    path = database_file(make_url(url).database)
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
    writers = WRITERS[engine] = SQLiteWriters(path)
    writer = writers.lock

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A write transaction takes the write lock up front, so two writers never deadlock
        # upgrading a read lock; read-only work keeps WAL's concurrent readers.
        if conn.get_execution_options().get(READ_ONLY, False):
            driver_sql(conn, "BEGIN")
            return
        writer.acquire()
        conn.info[_HOLDS_WRITER] = True
        try:
            # On the driver's cursor: exec_driver_sql costs ~3x the BEGIN itself, on every
            # write transaction.
            driver_sql(conn, "BEGIN IMMEDIATE")
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
