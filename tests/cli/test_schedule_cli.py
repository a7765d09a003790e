"""The CLI of priority, defer, deadline and SLA: intake files with the reserved columns,
``tracking tx defer``, ``tracking report overdue|sla`` and ``tracking processes``, on SQLite
and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest

from tests.schedule_processes import P, process
from tracking import Tracker, connect
from tracking.models import EventKind


@pytest.fixture
def env(monkeypatch, db_url):
    monkeypatch.setenv("TRACKING_DATABASE_URL", db_url)
    monkeypatch.setenv("TRACKING_PROCESSES", "tests.schedule_processes:process")
    return db_url


@pytest.fixture
def tracker(env):
    engine = connect(env)
    yield Tracker(engine, [process])
    engine.dispose()


def test_intake_reads_the_reserved_columns(cli, tracker, tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("request_id,priority,not_before,deadline,name\n"
                    "FE-1,5,,2030-01-01T17:00Z,x\n"
                    "FE-2,,2030-01-01,,y\n", encoding="utf-8")
    r = cli("intake", P, path, "--format", "json")
    assert r.code == 0, r.err
    rows = {t.business_key: t for t in (tracker.get_transaction(u) for u in _uuids(tracker))}
    assert rows["FE-1"].payload == {"request_id": "FE-1", "name": "x"}
    assert rows["FE-1"].priority == 5
    assert rows["FE-1"].deadline == datetime(2030, 1, 1, 17, tzinfo=UTC)
    assert rows["FE-2"].priority == 0 and rows["FE-2"].not_before == datetime(2030, 1, 1,
                                                                                tzinfo=UTC)
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text(json.dumps({"request_id": "FE-3", "priority": 2}) + "\n", encoding="utf-8")
    assert cli("intake", P, jsonl).code == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("request_id,priority\nFE-4,1\nFE-5,urgent\n", encoding="utf-8")
    r = cli("intake", P, bad)
    assert r.code == 2 and "item 2: priority must be a whole number" in r.err
    assert "'urgent'" in r.err and len(_uuids(tracker)) == 3  # nothing of bad.csv written


def _uuids(tracker: Tracker) -> list[str]:
    from tracking import Reports

    return [t.uuid for t in Reports(tracker.engine).list_transactions(limit=100)]


def test_tx_defer(cli, tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    until = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    text = until.strftime("%Y-%m-%dT%H:%MZ")
    r = cli("tx", "defer", uuid, "--until", text, "--reason", "customer on holiday")
    assert r.code == 0, r.err
    assert f"{uuid}: deferred, now PENDING" in r.out
    tx = tracker.get_transaction(uuid)
    assert tx.stages[0].next_attempt_at == until.replace(second=0)
    assert tx.events[-1].kind == EventKind.DEFERRED and tx.events[-1].actor.startswith("cli")
    shown = cli("tx", "show", uuid)
    assert "not before" in shown.out and "DEFERRED" in shown.out


def test_tx_defer_refusals(cli, tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    done, _ = tracker.start_or_resume(P, {"request_id": "FE-2"})
    tracker.cancel(done, reason="gone")
    r = cli("tx", "defer", uuid, "--until", "next week")
    assert r.code == 2 and "until must be an ISO 8601 date-time" in r.err
    r = cli("tx", "defer", uuid, "--until", "2020-01-01")
    assert r.code == 2 and "until must be in the future" in r.err
    r = cli("tx", "defer", uuid, done, "--until", "2099-01-01")
    assert r.code == 1 and "only waiting transactions" in r.err and f"{uuid}: deferred" in r.out
    r = cli("tx", "defer", "00000000-0000-0000-0000-000000000000", "--until", "2099-01-01")
    assert r.code == 2 and "unknown transaction" in r.err


def test_report_overdue_and_sla(cli, tracker):
    # Created now with a deadline an hour ago: overdue at once; one done in time.
    past = datetime.now(UTC) - timedelta(hours=1)
    late, _ = tracker.start_or_resume(P, {"request_id": "late"}, deadline=past, priority=4)
    done, _ = tracker.start_or_resume(P, {"request_id": "done"})
    tracker.cancel(done, reason="handled")
    tracker.start_or_resume(P, {"request_id": "open"})
    r = cli("report", "overdue", "--format", "json")
    assert r.code == 0, r.err
    (item,) = json.loads(r.out)
    assert item["uuid"] == late and item["priority"] == 4 and item["platform"] == "A"
    table = cli("report", "overdue")
    assert "Overdue transactions" in table.out and "late" in table.out
    r = cli("report", "sla", "--format", "csv")
    (row,) = list(csv.DictReader(io.StringIO(r.out)))
    assert (row["transactions"], row["finished"], row["within_sla"], row["open"],
            row["overdue"], row["attainment"]) == ("3", "1", "1", "2", "1", "1.0")
    table = cli("report", "sla", "--process", P)
    assert "SLA attainment" in table.out and "100.0%" in table.out and "4h" in table.out
    assert cli("report", "overdue", "--process", "NOPE").code == 2


def test_processes_show_sla_retention_and_sessions(cli):
    r = cli("processes")
    assert r.code == 0, r.err
    assert "SLA: 4h" in r.out and "kept: 90d" in r.out and "Sessions" in r.out
    (described,) = json.loads(cli("processes", "--format", "json").out)
    assert described["sla_seconds"] == 4 * 3600
    assert [p["concurrency"] for p in described["platforms"]] == [None, 2, None]
