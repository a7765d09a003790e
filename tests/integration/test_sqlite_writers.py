"""A SQLite engine's writers in one process: they queue on the process's writer lock, never on
SQLite's busy handler, and a background thread copies their WAL back into the database file
so that no writer's commit pays for the checkpoint."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

import tracking.sqlite
from tracking import connect
from tracking.connections import WRITERS, read_only, write_transaction


def _checkpoint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tracking-checkpoint")]


def _engine_with_table(path: Path) -> sa.Engine:
    engine = connect(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    return engine


def _wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_threads_of_one_process_never_meet_sqlites_busy_handler(tmp_path):
    """The writers of a process queue on its writer lock, released only once the driver's
    COMMIT is done. Before, SQLAlchemy's commit event released it before the COMMIT ran, so
    the next writer's BEGIN IMMEDIATE met a commit in progress: SQLite's busy handler slept
    (a third of four threads' transactions, 4x their throughput lost). Without a busy timeout
    any such meeting is an error."""
    engine = connect(f"sqlite:///{tmp_path}/writers.db")
    sa.event.listen(engine, "connect",
                    lambda dbapi_connection, _: dbapi_connection.execute("PRAGMA busy_timeout=0"))
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for _ in range(300):
                with engine.begin() as conn:
                    conn.exec_driver_sql("INSERT INTO t (v) VALUES ('x')")
        except BaseException as exc:  # "database is locked": met a commit in progress
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 1200
    engine.dispose()


def test_the_wal_is_copied_back_by_a_background_thread_not_by_the_writers(tmp_path, monkeypatch):
    """Before, SQLite's own checkpoint ran inside the commit that crossed its threshold (two
    fsyncs and the copy: 70-100 ms on a small machine) and held up that writer and every
    writer queued behind it. With the writers' own checkpoint out of reach, the database
    file still receives what they committed."""
    monkeypatch.setattr(tracking.sqlite, "SQLITE_WAL_CHECKPOINT_PAGES", 10_000_000)
    path = tmp_path / "wal.db"
    engine = _engine_with_table(path)
    size = path.stat().st_size
    for i in range(200):  # both ways of writing: engine.begin() and write_transaction
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO t (v) VALUES (?)", ("x" * 2000,))
        with write_transaction(engine) as conn:
            conn.connection.dbapi_connection.execute("INSERT INTO t (v) VALUES (?)",
                                                     (str(i) * 1000,))
    # 400 rows of ~2 KB: ~200 pages that only a checkpoint puts in the file.
    assert _wait_for(lambda: path.stat().st_size > size + 100 * 4096)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 400
    engine.dispose()


def test_the_checkpoint_thread_ends_when_idle_and_comes_back_with_a_commit(
        tmp_path, monkeypatch):
    monkeypatch.setattr(tracking.sqlite.Checkpointer, "IDLE_SECONDS", 0.2)
    engine = _engine_with_table(tmp_path / "idle.db")
    name = "tracking-checkpoint idle.db"
    assert any(t.name == name for t in _checkpoint_threads())
    assert _wait_for(lambda: not any(t.name == name for t in _checkpoint_threads()))
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t (v) VALUES ('again')")
    assert any(t.name == name for t in _checkpoint_threads())
    # Reads commit too, but write nothing: no thread for them.
    assert _wait_for(lambda: not any(t.name == name for t in _checkpoint_threads()))
    with read_only(engine) as conn:
        conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one()
    assert not any(t.name == name for t in _checkpoint_threads())
    engine.dispose()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_a_database_in_memory_has_no_checkpoint_thread(url):
    engine = connect(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE m (id INTEGER PRIMARY KEY)")
    assert not any(t.name.endswith(" :memory:") or t.name == "tracking-checkpoint "
                   for t in _checkpoint_threads())
    engine.dispose()


def test_a_disposed_engine_leaves_its_whole_database_in_the_file(tmp_path):
    """``engine.dispose()`` ends the checkpoint thread first: the engine's connections are
    then the last to close, and SQLite copies the rest of the WAL into the file and removes
    it, so a copy of the file alone has every commit (the test suite copies a migrated
    template file: with a thread that kept a connection open, the copy had no schema)."""
    path = tmp_path / "disposed.db"
    engine = _engine_with_table(path)
    for i in range(50):
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO t (v) VALUES (?)", (str(i),))
    started = time.monotonic()
    engine.dispose()
    assert time.monotonic() - started < 1.5  # not left waiting for the thread's idle end
    assert not any(t.name == "tracking-checkpoint disposed.db" for t in _checkpoint_threads())
    assert not Path(f"{path}-wal").exists()
    copy = tmp_path / "copy.db"
    copy.write_bytes(path.read_bytes())
    reader = connect(f"sqlite:///{copy}")
    with reader.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 50
    reader.dispose()


def test_a_database_file_removed_under_the_thread_is_not_made_again(tmp_path, caplog):
    path = tmp_path / "gone.db"
    engine = _engine_with_table(path)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    WRITERS[engine].checkpointer.committed()  # as a late commit would
    assert _wait_for(lambda: "background checkpoints" in caplog.text)
    assert not path.exists()
