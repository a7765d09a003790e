"""``tracking purge`` (dry run, --yes with an archive, --history) and the retention shown by
``tracking processes``, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.retention_processes import processes
from tracking import ExecutionResult, Tracker, connect
from tracking.retention import read_archive
from tracking.store import retention as store_retention


@pytest.fixture
def env(monkeypatch, db_url):
    monkeypatch.setenv("TRACKING_DATABASE_URL", db_url)
    monkeypatch.setenv("TRACKING_PROCESSES", "tests.retention_processes:processes")
    return db_url


class Clock:
    def __init__(self, days_ago: float) -> None:
        self.now = datetime.now(UTC) - timedelta(days=days_ago)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def engine(env):
    engine = connect(env)
    yield engine
    engine.dispose()


def finish(engine, code: str, key: str, days_ago: float, error: int = 0) -> str:
    """A transaction of ``code`` that finished ``days_ago`` days ago."""
    tracker = Tracker(engine, processes, clock=Clock(days_ago))
    uuid, _ = tracker.start_or_resume(code, {"id": key})
    tracker.complete_stage(uuid, "A", ExecutionResult(error, "no") if error else 0)
    return uuid


def waiting(engine, code: str, key: str, days_ago: float) -> str:
    tracker = Tracker(engine, processes, clock=Clock(days_ago))
    return tracker.start_or_resume(code, {"id": key})[0]


def uuids(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT uuid FROM tx_process")).scalars())


@pytest.fixture
def scene(engine):
    return {
        "kept_old": [finish(engine, "KEPT", "k1", 40), finish(engine, "KEPT", "k2", 45, 10)],
        "kept_new": finish(engine, "KEPT", "k3", 10),
        "forever_old": finish(engine, "FOREVER", "f1", 100),
        "waiting_old": waiting(engine, "KEPT", "k4", 100),
    }


def test_help_and_processes_show_retention(cli):
    assert "purge" in cli("--help").out
    assert "--older-than" in cli("purge", "--help").out
    out = cli("processes").out
    assert "KEPT" in out and "kept: 30d after finishing" in out and "kept: forever" in out
    described = {p["code"]: p for p in json.loads(cli("processes", "--format", "json").out)}
    assert described["KEPT"]["retention_seconds"] == 30 * 86_400


def test_dry_run_by_each_process_retention_deletes_nothing(cli, engine, scene):
    before = uuids(engine)
    result = cli("purge")
    assert result.code == 0, result.err
    assert "KEPT" in result.out and "30d" in result.out
    assert "COMPLETED" in result.out and "REJECTED" in result.out
    assert "skipped, no retention (give --older-than): FOREVER" in result.out
    assert "dry run: nothing deleted; 2 transactions would be purged" in result.out
    assert uuids(engine) == before


def test_dry_run_with_older_than_covers_every_process(cli, engine, scene):
    result = cli("purge", "--older-than", "2w")
    assert result.code == 0, result.err
    assert "FOREVER" in result.out and "skipped" not in result.out
    assert "3 transactions would be purged" in result.out
    one = cli("purge", "--older-than", "90d", "--process", "FOREVER")
    assert "1 transaction would be purged" in one.out and "KEPT" not in one.out
    assert len(uuids(engine)) == 5


@pytest.fixture
def short_dir():
    """A directory with a short path: the history table folds a long one (pytest's own
    tmp_path under pytest-xdist) across lines of its cell, so a file name would not read
    whole."""
    with tempfile.TemporaryDirectory(prefix="purge-") as directory:
        yield Path(directory)


def test_purge_archives_deletes_and_records_it(cli, engine, scene, short_dir):
    path = short_dir / "purged.jsonl"
    result = cli("purge", "--yes", "--archive", path, "--chunk-size", "1")
    assert result.code == 0, result.err
    assert "KEPT: purged 2 transactions (2 stages, 4 events)" in result.out
    assert "skipped, no retention (give --older-than): FOREVER" in result.out
    assert f"archive {path} (jsonl): 2 records written" in result.out
    assert sorted(r["uuid"] for r in read_archive(path)) == sorted(scene["kept_old"])
    assert uuids(engine) == {scene["kept_new"], scene["forever_old"], scene["waiting_old"]}
    history = cli("purge", "--history")
    assert history.code == 0 and "KEPT" in history.out and "purged.jsonl" in history.out
    assert "cli:" in history.out

    csv_path = short_dir / "forever.csv"
    result = cli("purge", "--older-than", "90d", "--yes", "--archive", csv_path)
    assert result.code == 0, result.err
    assert "FOREVER: purged 1 transaction" in result.out
    assert [r["uuid"] for r in read_archive(csv_path)] == [scene["forever_old"]]
    assert cli("purge", "--history", "--process", "FOREVER").out.count("FOREVER") == 1


@pytest.mark.parametrize(("args", "message"), [
    (("--older-than", "90days"), "--older-than: bad duration '90days'"),
    (("--older-than", "0d"), "bad duration '0d': it must be longer than zero"),
    (("--yes",), "--yes needs --archive PATH"),
    (("--process", "NOPE"), "unknown process 'NOPE'"),
    (("--chunk-size", "0"), "--chunk-size must be from 1 to 5000"),
    (("--history", "--yes"), "--history only shows past purges"),
])
def test_bad_input_changes_nothing(cli, engine, scene, args, message):
    before = uuids(engine)
    result = cli("purge", *args)
    assert result.code == 2 and message in result.err, result
    assert uuids(engine) == before


def test_an_archive_that_is_not_one_is_refused(cli, engine, scene, tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("not json\n")
    result = cli("purge", "--older-than", "1d", "--yes", "--archive", path)
    assert result.code == 2 and "is not a tracking archive record" in result.err
    assert len(uuids(engine)) == 5


def test_a_purge_that_fails_says_what_it_did(cli, engine, scene, tmp_path, monkeypatch):
    real = store_retention._delete_chunk
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("lost the database")
        return real(*args, **kwargs)

    monkeypatch.setattr(store_retention, "_delete_chunk", fail_second)
    path = tmp_path / "purged.jsonl"
    result = cli("purge", "--yes", "--archive", path, "--chunk-size", "1")
    assert result.code == 1
    assert "KEPT: purged 1 transaction" in result.out
    assert "lost the database" in result.err and "run it again" in result.err
    monkeypatch.setattr(store_retention, "_delete_chunk", real)
    assert cli("purge", "--yes", "--archive", path).code == 0
    assert sorted(r["uuid"] for r in read_archive(path)) == sorted(scene["kept_old"])
    assert "not finished" in cli("purge", "--history").out  # the interrupted run
