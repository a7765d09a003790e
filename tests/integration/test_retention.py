"""Retention on both databases: the dry run, the purge (archive, chunks, audit), per-process
retention, and what a purge interrupted by an error leaves (nothing lost, nothing twice)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa

from tests.conftest import FakeClock, cancellation_process
from tracking import ExecutionResult, Tracker, TxState, connect
from tracking.app import App
from tracking.retention import Archive, read_archive
from tracking.settings import Settings
from tracking.store import retention as store_retention
from tracking.store.retention import PurgeStopped, Target

P = "CANCELLATION"
DAY = 86_400
STEPS = (("A", None), ("B", "process"), ("B", "confirm"), ("C", None))


def count(engine, table: str, where: str = "") -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT COUNT(*) FROM {table} {where}")).scalar_one()


def uuids_in_db(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT uuid FROM tx_process")).scalars())


def snapshot(tracker: Tracker, uuids) -> dict[str, tuple]:
    """What the database holds of each transaction: state, stages and event ids."""
    out = {}
    for u in uuids:
        tx = tracker.get_transaction(u)
        out[u] = (tx.state.value, tx.payload, [(s.platform, s.stage, s.state.value)
                                               for s in tx.stages], [e.id for e in tx.events])
    return out


def archived(record: dict) -> tuple:
    return (record["state"], record["payload"],
            [(s["platform"], s["stage"], s["state"]) for s in record["stages"]],
            [e["id"] for e in record["events"]])


class Items:
    """Transactions of every kind on the fake clock."""

    def __init__(self, tracker: Tracker, clock: FakeClock) -> None:
        self.tracker, self.clock, self.n = tracker, clock, 0

    def new(self) -> str:
        self.n += 1
        uuid, _ = self.tracker.start_or_resume(P, {"request_id": f"R{self.n}", "note": "x\ny"})
        return uuid

    def completed(self) -> str:
        uuid = self.new()
        for platform, stage in STEPS:
            self.tracker.complete_stage(uuid, platform, 0, stage=stage)
        return uuid

    def rejected(self) -> str:
        uuid = self.new()
        self.tracker.complete_stage(uuid, "A", ExecutionResult(10, "blocked"))
        return uuid

    def exhausted(self) -> str:
        uuid = self.new()
        self.tracker.complete_stage(uuid, "A", ExecutionResult(-1, "CRM down"))
        return uuid

    def cancelled(self) -> str:
        uuid = self.new()
        self.tracker.cancel(uuid, reason="withdrawn", actor="ops")
        return uuid

    def retrying(self) -> str:  # TERMINATED: waiting for its next attempt
        uuid = self.new()
        self.tracker.complete_stage(uuid, "A", 0)
        self.tracker.complete_stage(uuid, "B", ExecutionResult(-2, "timeout"), stage="process")
        return uuid

    def running(self) -> str:
        uuid = self.new()
        self.tracker.complete_stage(uuid, "A", 0)
        (stage,) = self.tracker.claim(P, "B", "process", owner="run-1", uuid=uuid)
        self.tracker.start_attempt(uuid, "B", "process", owner="run-1")
        return uuid

    def cancelled_while_running(self) -> str:
        """CANCELLED (final) but its stage's attempt is still running: not purgeable."""
        uuid = self.running()
        self.tracker.cancel(uuid, reason="withdrawn", actor="ops")
        return uuid


@pytest.fixture
def items(tracker, clock) -> Items:
    return Items(tracker, clock)


@pytest.fixture
def scene(items: Items, clock: FakeClock, tracker: Tracker):
    """Old finished items (purgeable), old waiting/running ones, and newer finished ones."""
    old = [items.completed(), items.rejected(), items.exhausted(), items.cancelled(),
           items.completed(), items.rejected(), items.completed()]
    waiting = [items.new(), items.retrying(), items.running(), items.cancelled_while_running()]
    clock.advance(80 * DAY)
    newer = [items.completed(), items.cancelled()]
    clock.advance(20 * DAY)  # now: old ones finished 100 days ago, newer ones 20 days ago
    target = Target(P, timedelta(days=90), clock.now - timedelta(days=90))
    return {"old": old, "waiting": waiting, "newer": newer, "target": target,
            "before": snapshot(tracker, old + waiting + newer)}


def test_the_dry_run_counts_per_state_and_deletes_nothing(tracker, scene, engine):
    rows = tracker.purge_preview([scene["target"]])
    assert {r.state: r.transactions for r in rows} == {
        TxState.COMPLETED: 3, TxState.REJECTED: 2, TxState.EXHAUSTED: 1, TxState.CANCELLED: 1}
    assert all(r.oldest_finished_at.tzinfo is not None for r in rows)
    assert max(r.newest_finished_at for r in rows) < scene["target"].cutoff
    assert snapshot(tracker, scene["before"]) == scene["before"]
    assert count(engine, "tx_purge") == 0


def test_purge_archives_exactly_the_old_finished_items_in_chunks(tracker, scene, engine,
                                                                 tmp_path):
    path = tmp_path / "archive.jsonl"
    seen = []
    with Archive(path) as archive:
        (totals,) = tracker.purge([scene["target"]], archive, chunk_size=2, actor="ops",
                                  archive_path=str(path), archive_format="jsonl",
                                  on_chunk=lambda code, n: seen.append(n))
    old, kept = scene["old"], scene["waiting"] + scene["newer"]
    records = list(read_archive(path))
    assert sorted(r["uuid"] for r in records) == sorted(old)
    assert {r["uuid"]: archived(r) for r in records} == {u: scene["before"][u] for u in old}
    assert all(r["finished_at"].endswith("+00:00") for r in records)
    assert seen == [2, 2, 2, 1]
    # gone with their stages and events; the rest untouched
    assert uuids_in_db(engine) == set(kept)
    assert snapshot(tracker, kept) == {u: scene["before"][u] for u in kept}
    stages = sum(len(scene["before"][u][2]) for u in old)
    events = sum(len(scene["before"][u][3]) for u in old)
    assert (totals.transactions, totals.stages, totals.events, totals.chunks) == (7, stages,
                                                                                   events, 4)
    assert count(engine, "tx_stage") == sum(len(scene["before"][u][2]) for u in kept)
    assert count(engine, "tx_purging") == 0
    (row,) = tracker.purge_history()
    assert (row.process_code, row.transactions, row.stages, row.events, row.chunks) == (
        P, 7, stages, events, 4)
    assert row.cutoff == scene["target"].cutoff and row.older_than_seconds == 90 * DAY
    assert row.archive_path == str(path) and row.archive_format == "jsonl"
    assert row.actor == "ops" and row.finished_at is not None
    assert row.oldest_finished_at <= row.newest_finished_at < row.cutoff
    # nothing more to purge: a second run finds nothing and writes no audit row
    with Archive(path) as archive:
        assert tracker.purge([scene["target"]], archive)[0].transactions == 0
    assert len(tracker.purge_history()) == 1


def test_csv_archive_round_trips(tracker, scene, tmp_path):
    path = tmp_path / "archive.csv"
    with Archive(path) as archive:
        tracker.purge([scene["target"]], archive, chunk_size=3)
    records = list(read_archive(path))
    assert {r["uuid"]: archived(r) for r in records} == {
        u: scene["before"][u] for u in scene["old"]}
    assert all(r["payload"]["note"] == "x\ny" and r["source"] is None for r in records)
    assert path.read_text().splitlines()[0].startswith("uuid,process_code,business_key")


def test_the_audit_trail_stays_append_only_outside_a_purge(tracker, scene, engine):
    for statement in ("DELETE FROM tx_event", "UPDATE tx_event SET description = 'x'"):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
            conn.execute(sa.text(statement))
    assert snapshot(tracker, scene["before"]) == scene["before"]


def test_a_requeued_item_is_no_longer_purged(tracker, items, clock, tmp_path):
    uuid = items.exhausted()
    clock.advance(100 * DAY)
    tracker.requeue(uuid, actor="ops")
    target = Target(P, timedelta(days=90), clock.now - timedelta(days=90))
    assert tracker.purge_preview([target]) == []
    with Archive(tmp_path / "a.jsonl") as archive:
        assert tracker.purge([target], archive)[0].transactions == 0
    assert tracker.get_transaction(uuid).state == TxState.PENDING


def test_a_failed_chunk_loses_nothing_and_a_rerun_duplicates_nothing(
        tracker, scene, engine, tmp_path, monkeypatch):
    path = tmp_path / "archive.jsonl"
    real = store_retention._delete_chunk
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")  # after the chunk's archive is written
        return real(*args, **kwargs)

    monkeypatch.setattr(store_retention, "_delete_chunk", fail_second)
    with Archive(path) as archive, pytest.raises(PurgeStopped, match="disk full") as stopped:
        tracker.purge([scene["target"]], archive, chunk_size=3)
    assert [t.transactions for t in stopped.value.totals] == [3]
    in_archive = [r["uuid"] for r in read_archive(path)]
    in_db = uuids_in_db(engine)
    assert len(in_archive) == 6  # two chunks written, one deleted
    assert set(scene["old"]) - in_db <= set(in_archive)  # everything deleted is archived
    assert set(scene["old"]) - set(in_archive) <= in_db  # everything else is still there
    assert len(set(scene["old"]) - in_db) == 3
    (row,) = tracker.purge_history()
    assert (row.transactions, row.chunks, row.finished_at) == (3, 1, None)  # interrupted

    monkeypatch.setattr(store_retention, "_delete_chunk", real)
    with Archive(path) as archive:
        (totals,) = tracker.purge([scene["target"]], archive, chunk_size=3)
    assert totals.transactions == 4
    records = list(read_archive(path))
    assert sorted(r["uuid"] for r in records) == sorted(scene["old"])  # each one once
    assert {r["uuid"]: archived(r) for r in records} == {
        u: scene["before"][u] for u in scene["old"]}
    assert uuids_in_db(engine) == set(scene["waiting"] + scene["newer"])
    assert sum(r.transactions for r in tracker.purge_history()) == 7


def test_an_archive_that_cannot_be_written_stops_the_purge_before_deleting(
        tracker, scene, engine):
    def broken(records):
        raise OSError("no space left on device")

    with pytest.raises(PurgeStopped, match="no space left"):
        tracker.purge([scene["target"]], broken)
    assert snapshot(tracker, scene["before"]) == scene["before"]
    assert count(engine, "tx_purge") == 0


def test_a_torn_tail_is_cut_off_and_archived_again(tracker, scene, tmp_path):
    path = tmp_path / "archive.jsonl"
    with Archive(path) as archive:
        archive.write([{"uuid": "earlier", "stages": [], "events": []}])
    with path.open("ab") as f:
        f.write(b'{"uuid":"' + scene["old"][0].encode() + b'","state":"COMP')  # a crash
    with Archive(path) as archive:
        tracker.purge([scene["target"]], archive)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["uuid"] for line in lines][0] == "earlier"
    assert sorted(json.loads(line)["uuid"] for line in lines[1:]) == sorted(scene["old"])


def test_per_process_retention_from_the_catalog(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKING_PROCESSES", "tests.retention_processes:processes")
    clock = FakeClock()
    engine = connect(db_url)
    try:
        app = App(Settings(database_url=db_url), engine)
        tracker = Tracker(engine, app.processes, clock=clock)
        Tracker(engine, [cancellation_process()])  # in the catalog, not configured here
        made = {}
        for code in ("KEPT", "FOREVER", "CANCELLATION"):
            for i, age in enumerate((40, 10)):
                clock.now = FakeClock().now - timedelta(days=age)
                t = tracker if code != "CANCELLATION" else Tracker(
                    engine, [cancellation_process()], clock=clock)
                key = "request_id" if code == "CANCELLATION" else "id"
                uuid, _ = t.start_or_resume(code, {key: f"{code}-{i}"})
                t.complete_stage(uuid, "A", ExecutionResult(10, "no"))
                made[code, age] = uuid
        now = FakeClock().now
        plan = app.purge_plan(now=now)
        assert [(t.process_code, t.older_than) for t in plan.targets] == [
            ("KEPT", timedelta(days=30))]
        assert sorted(plan.skipped) == ["CANCELLATION", "FOREVER"]
        assert [(p.process_code, p.transactions) for p in plan.preview] == [("KEPT", 1)]
        run = app.purge(archive=tmp_path / "kept.jsonl", now=now, actor="ops")
        assert [r["uuid"] for r in read_archive(run.archive)] == [made["KEPT", 40]]
        assert uuids_in_db(engine) == set(made.values()) - {made["KEPT", 40]}
        # --older-than covers every process of the catalog (or the one named)
        plan = app.purge_plan(older_than=timedelta(days=20), now=now)
        assert plan.skipped == [] and plan.transactions == 2
        plan = app.purge_plan(older_than=timedelta(days=5), process="FOREVER", now=now)
        assert [t.process_code for t in plan.targets] == ["FOREVER"] and plan.transactions == 2
        with pytest.raises(ValueError, match="unknown process 'NOPE'"):
            app.purge_plan(process="NOPE")
        with engine.connect() as conn:
            kept = dict(conn.execute(sa.text(
                "SELECT code, retention_seconds FROM tx_catalog_process")).all())
        assert kept == {"KEPT": 30 * DAY, "FOREVER": None, "CANCELLATION": None}
    finally:
        engine.dispose()


def test_migration_0005_down_and_up_again(tracker, items, engine):
    from alembic import command

    from tracking.db import _alembic_config, current_revision, head_revision, upgrade

    uuid = items.completed()
    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0004")
    assert "tx_purge" not in sa.inspect(engine).get_table_names()
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM tx_event"))  # the 0001 trigger, strict again
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        assert conn.execute(sa.text(
            "SELECT retention_seconds FROM tx_catalog_process")).scalars().all() == [None]
    assert tracker.get_transaction(uuid).state == TxState.COMPLETED


KILLED_PURGE = """
import os, signal, sys
from datetime import datetime, timedelta
from tracking import Tracker, connect
from tracking.retention import Archive
from tracking.store import retention
from tracking.store.retention import Target

url, path, cutoff = sys.argv[1], sys.argv[2], datetime.fromisoformat(sys.argv[3])
real, calls = retention._delete_chunk, []

def crash_on_second(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the second chunk is archived and fsynced, not yet deleted
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

retention._delete_chunk = crash_on_second
with Archive(path) as archive:
    Tracker(connect(url)).purge([Target("CANCELLATION", timedelta(days=90), cutoff)], archive,
                                chunk_size=3)
"""


def test_a_purge_killed_mid_chunk_loses_nothing_and_a_rerun_duplicates_nothing(
        tracker, scene, engine, db_url, tmp_path):
    import subprocess
    import sys

    path = tmp_path / "archive.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", KILLED_PURGE, db_url, str(path),
         scene["target"].cutoff.isoformat()],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == -9, done.stderr
    in_archive, in_db = [r["uuid"] for r in read_archive(path)], uuids_in_db(engine)
    assert len(in_archive) == 6 and len(set(scene["old"]) & in_db) == 4
    assert set(scene["old"]) - in_db <= set(in_archive)
    assert set(scene["old"]) - set(in_archive) <= in_db
    assert count(engine, "tx_purging") == 0  # rolled back with the killed chunk
    with Archive(path) as archive:
        assert tracker.purge([scene["target"]], archive, chunk_size=3)[0].transactions == 4
    records = list(read_archive(path))
    assert sorted(r["uuid"] for r in records) == sorted(scene["old"])
    assert {r["uuid"]: archived(r) for r in records} == {
        u: scene["before"][u] for u in scene["old"]}
    assert uuids_in_db(engine) == set(scene["waiting"] + scene["newer"])
