"""The ``tracking`` console script: every subcommand, its output, files and exit codes.

Commands run in-process through ``tracking.cli.main`` (a few through ``python -m tracking``)
against a fresh database per test, on SQLite and PostgreSQL. ``run``, ``api``, ``serve`` and
``demo`` call code tested elsewhere: here a fake stands in and the test checks what the CLI
passes to it and how it handles the result.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import FakeClock
from tests.sample_processes import P, process
from tracking import ExecutionResult, Reports, Tracker, TxState, connect
from tracking.cli import BadInput, parse_time, window
from tracking.db import head_revision
from tracking.reports import as_dicts

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = "tests.sample_processes:process"


@pytest.fixture
def env(monkeypatch, db_url):
    monkeypatch.setenv("TRACKING_DATABASE_URL", db_url)
    monkeypatch.setenv("TRACKING_PROCESSES", SAMPLE)
    return db_url


@pytest.fixture
def tracker(env):
    """A tracker on the CLI's database, on the real clock (reports default to recent days)."""
    engine = connect(env, migrate=True)
    yield Tracker(engine, [process])
    engine.dispose()


def count_transactions(tracker) -> int:
    with tracker.engine.connect() as conn:
        return conn.execute(sa.text("SELECT COUNT(*) FROM tx_process")).scalar_one()


def exhausted(tracker, key: str) -> str:
    uuid, _ = tracker.start_or_resume(P, {"request_id": key})
    tracker.complete_stage(uuid, "A", ExecutionResult(-1, "CRM down"))
    return uuid


def completed(tracker, key: str) -> str:
    uuid, _ = tracker.start_or_resume(P, {"request_id": key})
    for platform, stage in (("A", None), ("B", "process"), ("B", "confirm"), ("C", None)):
        tracker.complete_stage(uuid, platform, 0, stage=stage)
    return uuid


# -- general -------------------------------------------------------------------------------


def test_help_lists_every_command(cli):
    result = cli("--help")
    assert result.code == 0
    for command in ("db", "processes", "intake", "run", "tx", "requeue", "report", "api",
                    "serve", "demo", "--database-url"):
        assert command in result.out
    report_help = cli("report", "--help")
    for command in ("summary", "stages", "errors", "aging", "throughput", "attempts",
                    "durations", "html"):
        assert command in report_help.out
    assert "naive values are UTC" in cli("report", "summary", "--help").out


def test_unknown_command_and_missing_arguments_are_bad_input(cli):
    result = cli("frobnicate")
    assert result.code == 2 and "frobnicate" in result.err
    assert cli("intake", P).code == 2
    assert cli("report", "summary", "--format", "xml").code == 2


def test_parse_time_accepts_dates_and_datetimes_naive_as_utc():
    assert parse_time("2026-01-31") == datetime(2026, 1, 31, tzinfo=UTC)
    assert parse_time("2026-01-31", end=True) == datetime(2026, 2, 1, tzinfo=UTC)
    assert parse_time("2026-01-31T08:30") == datetime(2026, 1, 31, 8, 30, tzinfo=UTC)
    assert parse_time("2026-01-31T08:30+02:00") == datetime(2026, 1, 31, 6, 30, tzinfo=UTC)
    assert parse_time("2026-01-31T08:30Z") == datetime(2026, 1, 31, 8, 30, tzinfo=UTC)
    with pytest.raises(BadInput, match="bad date 'tomorrow'"):
        parse_time("tomorrow")
    start, end = window(None, "2026-01-31", timedelta(days=7))
    assert (start, end) == (datetime(2026, 1, 25, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC))
    with pytest.raises(BadInput, match="is after"):
        window("2026-02-01", "2026-01-01")


# -- db and catalog ----------------------------------------------------------------------------


def test_db_upgrade_creates_tables_and_views(cli, env):
    result = cli("db", "upgrade")
    assert result.code == 0, result.err
    head = head_revision()
    assert f"revision {head}" in result.out
    engine = sa.create_engine(connect(env, migrate=False).url)
    assert "v_pending_aging" in sa.inspect(engine).get_view_names()
    engine.dispose()
    assert f"was {head}" in cli("db", "upgrade").out  # idempotent


def test_db_upgrade_with_a_bad_url_or_revision(cli):
    result = cli("--database-url", "mysql://nobody:pw-42@nowhere/x", "db", "upgrade")
    assert result.code == 2 and "bad database URL" in result.err
    assert "pw-42" not in result.err + result.out  # never echo a password
    result = cli("--database-url", "mysql://nobody:pw-42@nowhere/x", "report", "summary")
    assert result.code == 2 and "bad database URL" in result.err and "pw-42" not in result.err
    result = cli("db", "upgrade", "9999")
    assert result.code == 2 and "unknown revision" in result.err


def test_only_db_upgrade_migrates(cli, tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    for args in (["report", "summary"], ["tx", "show", "x"], ["requeue", "--process", P]):
        result = cli("--database-url", url, *args)
        assert result.code == 1, args
        assert "run `tracking db upgrade`" in result.err and result.err.count("\n") == 1, args
    assert cli("--database-url", url, "db", "upgrade").code == 0
    assert cli("--database-url", url, "report", "summary").code == 0


def test_processes_shows_the_catalog(cli):
    result = cli("processes")
    assert result.code == 0
    for text in ("CANCELLATION", "key_fields (request_id)", "validate", "process, confirm",
                 "1 attempts", "2 attempts", "unlimited attempts"):
        assert text in result.out, text
    described = json.loads(cli("processes", "--format", "json").out)
    assert described == [process.describe()]


def test_bad_process_setting_is_bad_input(cli, monkeypatch):
    monkeypatch.setenv("TRACKING_PROCESSES", "no_such_module:process")
    result = cli("processes")
    assert result.code == 2
    assert result.err.startswith("tracking: error: TRACKING_PROCESSES=no_such_module:process")


# -- intake ----------------------------------------------------------------------------------


def write_csv(path: Path, keys: list[str]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["request_id", "customer"])
        writer.writerows([k, f"customer {k}"] for k in keys)
    return path


def test_intake_csv_counts_new_and_duplicates(cli, tracker, tmp_path):
    items = write_csv(tmp_path / "items.csv", ["R1", "R2", "R2", "R3"])
    result = cli("intake", P, items)
    assert result.code == 0, result.err
    assert "4 items" in result.out and "3 new" in result.out and "1 duplicate" in result.out
    again = cli("intake", P, items, "--format", "json", "--chunk-size", "1")
    assert json.loads(again.out) == {"process": P, "file": str(items), "total": 4, "new": 0,
                                     "duplicates": 4}
    assert count_transactions(tracker) == 3
    tx = Reports(tracker.engine).transactions_between(
        datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))[0]
    assert tx.source == "items.csv" and tx.payload["customer"].startswith("customer R")


def test_intake_json_lines(cli, tracker, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text('{"request_id": "J1", "amount": 10}\n\n{"request_id": "J2"}\n')
    result = cli("intake", P, items, "--source", "mailbox")
    assert result.code == 0 and "2 new" in result.out
    assert count_transactions(tracker) == 2


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ("request_id\nR1\n\nnot,a,row\n", "bad.csv", "wrong number of columns"),
        ('{"request_id": "J1"}\n{oops\n', "bad.jsonl", "line 2: invalid JSON"),
        ('{"request_id": "J1"}\n{"other": 1}\n', "gap.jsonl", "item 2: payload lacks dedup key"),
        ("whatever", "items.xlsx", "unsupported file type"),
    ],
)
def test_intake_of_a_bad_file_changes_nothing(cli, tracker, tmp_path, content, name, message):
    path = tmp_path / name
    path.write_text(content)
    result = cli("intake", P, path)
    assert result.code == 2
    assert message in result.err and result.err.count("\n") == 1
    assert count_transactions(tracker) == 0


def test_intake_of_blank_keys_is_bad_input(cli, tracker, tmp_path):
    # The reported file: empty request_id cells for three different customers.
    items = tmp_path / "blank.csv"
    items.write_text("request_id,customer\n,C1\n,C2\n  ,C3\n")
    result = cli("intake", P, items)
    assert result.code == 2
    assert "item 1:" in result.err and "'request_id'" in result.err and "blank" in result.err
    assert count_transactions(tracker) == 0


def test_intake_validates_the_whole_file_before_writing(cli, tracker, tmp_path):
    keys = [f"R{i}" for i in range(1, 1201)]
    keys[1149] = " "  # item 1150: in the third chunk of 500, after the first 1000 rows
    result = cli("intake", P, write_csv(tmp_path / "late.csv", keys))
    assert result.code == 2
    assert "item 1150:" in result.err and "'request_id'" in result.err
    assert count_transactions(tracker) == 0  # not even the earlier chunks


def test_intake_unknown_process_or_missing_file(cli, tracker, tmp_path):
    items = write_csv(tmp_path / "items.csv", ["R1"])
    result = cli("intake", "NOPE", items)
    assert result.code == 2
    assert "unknown process 'NOPE' (TRACKING_PROCESSES has: CANCELLATION)" in result.err
    result = cli("intake", P, tmp_path / "missing.csv")
    assert result.code == 2 and "cannot read" in result.err
    assert cli("intake", P, items, "--chunk-size", "0").code == 2
    assert count_transactions(tracker) == 0


# -- run, api, serve, demo -------------------------------------------------------------------


SUMMARY = {
    "process": P, "flow_run_id": "run-1", "stages_run": 3, "recovered_leases": 0,
    "by_platform": {"A": {"COMPLETED": 2, "EXHAUSTED": 1}},
    "top_errors": [{"platform": "A", "error_code": -1, "description": "CRM down", "count": 1}],
    "stopped": "nothing left to run",
}


@pytest.fixture
def fake_resume(monkeypatch):
    import tracking.flows

    calls = []

    def resume_flow(**kwargs):
        from tracking.settings import database_url

        calls.append({**kwargs, "database seen by the flow": database_url()})
        return SUMMARY

    monkeypatch.setattr(tracking.flows, "resume_flow", resume_flow)
    return calls


def test_run_passes_its_options_to_the_resume_flow(cli, fake_resume):
    result = cli("run", P, "--granularity", "batch", "--batch-size", "50", "--concurrency", "2",
                 "--max-stages", "10")
    assert result.code == 0, result.err
    assert fake_resume == [{
        "process": P, "uuid": None, "granularity": "batch", "batch_size": 50,
        "concurrency": 2, "max_stages": 10, "max_seconds": None,
        "database seen by the flow": fake_resume[0]["database seen by the flow"],
    }]
    for text in ("stages_run", "EXHAUSTED", "CRM down", "nothing left to run"):
        assert text in result.out
    url = "postgresql://tracker:s3cret@127.0.0.1:1/tracking"
    as_json = cli("--database-url", url, "run", P, "--format", "json")
    assert json.loads(as_json.out) == SUMMARY
    # The URL (and its password) reaches the flow through the context, not its parameters.
    assert fake_resume[-1]["database seen by the flow"] == url
    assert not any("s3cret" in str(v) for k, v in fake_resume[-1].items()
                   if k != "database seen by the flow")
    assert fake_resume[-1]["granularity"] == "stage" and fake_resume[-1]["batch_size"] == 100


def test_run_refuses_bad_input_without_running(cli, fake_resume):
    assert cli("run", "NOPE").code == 2
    assert cli("run", P, "--batch-size", "0").code == 2
    assert cli("run", P, "--granularity", "row").code == 2
    assert cli("run", P, "--max-seconds", "-1").code == 2
    assert fake_resume == []


def test_run_failure_is_exit_code_1(cli, monkeypatch):
    import tracking.flows

    def broken(**kwargs):
        raise RuntimeError("database is down")

    monkeypatch.setattr(tracking.flows, "resume_flow", broken)
    result = cli("run", P)
    assert result.code == 1
    assert result.err.strip() == f"tracking: failed: the resume run of {P} failed: database is down"


def test_api_runs_uvicorn_with_host_port_and_database(cli, monkeypatch):
    import uvicorn

    calls = []

    def fake_run(app, **kwargs):
        calls.append((app, kwargs, os.environ.get("TRACKING_DATABASE_URL")))

    monkeypatch.setattr(uvicorn, "run", fake_run)
    before = os.environ["TRACKING_DATABASE_URL"]
    assert cli("api", "--host", "0.0.0.0", "--port", "9000").code == 0
    app, kwargs, seen = calls[-1]
    assert kwargs == {"host": "0.0.0.0", "port": 9000}
    assert app.state.settings.database_url == before  # an app built on the settings
    assert cli("--database-url", "sqlite:///api.db", "api").code == 0
    app, kwargs, seen = calls[-1]
    assert kwargs == {"host": "127.0.0.1", "port": 8000}
    assert app.state.settings.database_url == "sqlite:///api.db"
    assert seen == before and os.environ["TRACKING_DATABASE_URL"] == before  # env untouched
    assert cli("api", "--port", "70000").code == 2


def test_serve_and_demo_call_their_main(cli, monkeypatch, env):
    import deployments.serve
    import flows.demo

    calls, urls = [], []
    monkeypatch.setattr(deployments.serve, "main", lambda: calls.append("serve"))
    monkeypatch.setattr(flows.demo, "main",
                        lambda database_url: urls.append(database_url) or calls.append("demo")
                        or 0)
    assert cli("serve").code == 0
    assert cli("demo").code == 0
    assert calls == ["serve", "demo"]
    assert cli("--database-url", "sqlite:///demo.db", "demo").code == 0
    assert urls == [env, "sqlite:///demo.db"]  # the demo is given its database
    monkeypatch.setattr(flows.demo, "main", lambda database_url: 1)
    assert cli("demo").code == 1

    # Served flow runs read TRACKING_DATABASE_URL: serve refuses --database-url.
    refused = cli("--database-url", "sqlite:///serve.db", "serve")
    assert refused.code == 2 and "TRACKING_DATABASE_URL" in refused.err
    assert calls == ["serve", "demo", "demo"]

    def broken():
        raise OSError("address already in use")

    monkeypatch.setattr(deployments.serve, "main", broken)
    result = cli("serve")
    assert result.code == 1 and "address already in use" in result.err


# -- transactions ----------------------------------------------------------------------------


def test_tx_show_prints_stages_and_audit_trail(cli, tracker):
    uuid = exhausted(tracker, "SHOW-1")
    result = cli("tx", "show", uuid)
    assert result.code == 0
    for text in (uuid, "SHOW-1", "EXHAUSTED", "validate", "confirm", "Audit trail", "CREATED",
                 "ATTEMPT", "SYSTEM_ERROR", "CRM down"):
        assert text in result.out, text
    data = json.loads(cli("tx", "show", uuid, "--format", "json").out)
    assert data["uuid"] == uuid and data["state"] == "EXHAUSTED"
    assert [s["platform"] for s in data["stages"]] == ["A", "B", "B", "C"]
    assert [e["kind"] for e in data["events"]] == ["CREATED", "ATTEMPT"]


def test_tx_show_unknown_uuid(cli, tracker):
    result = cli("tx", "show", "no-such-uuid")
    assert result.code == 2
    assert result.err == "tracking: error: no transaction 'no-such-uuid'\n"


def test_tx_cancel(cli, tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "C1"})
    result = cli("tx", "cancel", uuid, "--reason", "customer called")
    assert result.code == 0 and "cancelled, now CANCELLED" in result.out
    tx = tracker.get_transaction(uuid)
    assert tx.state == TxState.CANCELLED
    assert tx.events[-1].description == "customer called"
    assert tx.events[-1].actor.startswith("cli")
    again = cli("tx", "cancel", uuid, "--reason", "twice")
    assert again.code == 1 and "already CANCELLED" in again.err


def test_tx_cancel_needs_a_reason_and_known_uuids(cli, tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "C1"})
    assert cli("tx", "cancel", uuid).code == 2
    result = cli("tx", "cancel", uuid, "nope", "--reason", "x")
    assert result.code == 2 and "unknown transaction(s): nope" in result.err
    assert tracker.get_transaction(uuid).state == TxState.PENDING  # nothing changed


def test_tx_requeue_reports_each_uuid(cli, tracker):
    stopped = exhausted(tracker, "RQ-1")
    done = completed(tracker, "RQ-2")
    result = cli("tx", "requeue", stopped, done, "--reason", "CRM is back")
    assert result.code == 1
    assert f"{stopped}: requeued, now PENDING" in result.out
    assert f"{done}: transaction {done} is COMPLETED" in result.err
    assert "1 of 2 could not be requeued" in result.err
    tx = tracker.get_transaction(stopped)
    assert tx.state == TxState.PENDING and tx.events[-1].description == "CRM is back"
    assert cli("tx", "requeue").code == 2


# -- bulk requeue ----------------------------------------------------------------------------


def test_bulk_requeue_is_a_dry_run_without_yes(cli, tracker):
    uuids = [exhausted(tracker, f"X{i}") for i in range(3)]
    completed(tracker, "done")
    result = cli("requeue", "--process", P)
    assert result.code == 0
    assert "3 transaction(s) of CANCELLATION in EXHAUSTED" in result.out
    assert all(u in result.out for u in uuids)
    assert "dry run: nothing changed" in result.out
    assert Reports(tracker.engine).requeue_candidates(P) != []


def test_bulk_requeue_with_yes(cli, tracker):
    on_a = exhausted(tracker, "XA")
    on_b, _ = tracker.start_or_resume(P, {"request_id": "XB"})
    tracker.complete_stage(on_b, "A", 0)
    for _ in range(2):
        tracker.complete_stage(on_b, "B", -1, stage="process")
    result = cli("requeue", "--process", P, "--platform", "B", "--state", "exhausted", "--yes")
    assert result.code == 0, result.err
    assert f"{on_b}: requeued" in result.out and on_a not in result.out
    assert tracker.get_transaction(on_b).state == TxState.IN_PROGRESS
    assert tracker.get_transaction(on_a).state == TxState.EXHAUSTED
    nothing = cli("requeue", "--process", P, "--platform", "B")
    assert nothing.code == 0 and "nothing to requeue" in nothing.out


def test_bulk_requeue_bad_input(cli, tracker):
    uuid = exhausted(tracker, "X")
    for args, message in [
        (["--process", "NOPE"], "unknown process 'NOPE'"),
        (["--process", P, "--platform", "Z"], "unknown platform 'Z'"),
        (["--process", P, "--state", "COMPLETED"], "--state must be one of"),
        (["--process", P, "--limit", "0"], "--limit must be at least 1"),
    ]:
        result = cli("requeue", *args, "--yes")
        assert result.code == 2 and message in result.err, args
    assert cli("requeue").code == 2  # --process is required
    assert tracker.get_transaction(uuid).state == TxState.EXHAUSTED


# -- reports ---------------------------------------------------------------------------------


@pytest.fixture
def history(env):
    """A few transactions at fixed times (2026-01-05 09:00 UTC onwards)."""
    engine = connect(env, migrate=True)
    clock = FakeClock()
    tracker = Tracker(engine, [process], clock=clock)
    done, _ = tracker.start_or_resume(P, {"request_id": "H1"})
    for platform, stage in (("A", None), ("B", "process"), ("B", "confirm"), ("C", None)):
        clock.advance(30)
        tracker.complete_stage(done, platform, 0, stage=stage)
    rejected, _ = tracker.start_or_resume(P, {"request_id": "H2"})
    tracker.complete_stage(rejected, "A", ExecutionResult(7, "customer unknown"))
    waiting, _ = tracker.start_or_resume(P, {"request_id": "H3"})
    clock.advance(86400)  # the next day
    tracker.start_or_resume(P, {"request_id": "H4"})
    yield {"reports": Reports(engine), "done": done, "waiting": waiting}
    engine.dispose()


WINDOW = ["--from", "2026-01-05", "--to", "2026-01-05"]  # the whole of January 5th


def test_report_summary_formats(cli, history):
    table = cli("report", "summary", *WINDOW)
    assert table.code == 0
    assert "COMPLETED" in table.out and "REJECTED" in table.out and "PENDING" in table.out
    rows = list(csv.DictReader(io.StringIO(cli("report", "summary", *WINDOW, "--format",
                                               "csv").out)))
    assert {(r["process"], r["state"], r["count"]) for r in rows} == {
        (P, "COMPLETED", "1"), (P, "REJECTED", "1"), (P, "PENDING", "1")}
    data = json.loads(cli("report", "summary", *WINDOW, "--format", "json").out)
    start, end = datetime(2026, 1, 5, tzinfo=UTC), datetime(2026, 1, 6, tzinfo=UTC)
    assert data == as_dicts(history["reports"].summary_by_process_and_state(start, end))
    both_days = json.loads(cli("report", "summary", "--from", "2026-01-05", "--to",
                               "2026-01-06T23:59", "--format", "json").out)
    assert sum(r["count"] for r in both_days) == 4


@pytest.mark.parametrize(
    ("report", "method", "kwargs"),
    [
        ("stages", "stage_summary_by_platform_and_stage", {}),
        ("errors", "top_errors", {"limit": 10}),
        ("throughput", "throughput_by_hour", {}),
        ("attempts", "attempts_distribution", {}),
        ("durations", "stage_durations", {}),
    ],
)
def test_windowed_reports_match_the_reports_api(cli, history, report, method, kwargs):
    start, end = datetime(2026, 1, 5, tzinfo=UTC), datetime(2026, 1, 6, tzinfo=UTC)
    expected = as_dicts(getattr(history["reports"], method)(start, end, **kwargs))
    result = cli("report", report, *WINDOW, "--format", "json")
    assert result.code == 0, result.err
    assert json.loads(result.out) == expected
    assert expected  # the scenario has something for every report
    table = cli("report", report, *WINDOW)
    assert table.code == 0 and "2026-01-05 00:00 to 2026-01-06 00:00 UTC" in table.out
    csv_rows = list(csv.DictReader(io.StringIO(
        cli("report", report, *WINDOW, "--format", "csv").out)))
    assert len(csv_rows) == len(expected) and list(csv_rows[0]) == list(expected[0])


def test_report_errors_and_throughput_tables(cli, history):
    errors = cli("report", "errors", *WINDOW)
    assert "customer unknown" in errors.out and "BUSINESS_ERROR" in errors.out
    throughput = cli("report", "throughput", "--from", "2026-01-05T08:00", "--to",
                     "2026-01-05T11:00")
    assert throughput.code == 0
    assert throughput.out.count("│ 2026-01-05") == 3  # 08:00, 09:00 and 10:00
    assert "█" in throughput.out


def test_report_aging(cli, history):
    result = cli("report", "aging", "--format", "json")
    assert result.code == 0
    rows = json.loads(result.out)
    assert [r["business_key"] for r in rows] == ["H3", "H4"]
    assert rows[0]["platform"] == "A" and rows[0]["age_seconds"] > 86400
    table = cli("report", "aging", "--process", P, "--limit", "1")
    assert "H3" in table.out and "H4" not in table.out and history["waiting"] in table.out
    assert json.loads(cli("report", "aging", *WINDOW, "--format", "json").out)[0][
        "business_key"] == "H3"
    assert len(json.loads(cli("report", "aging", "--from", "2026-01-06", "--format",
                              "json").out)) == 1


def test_reports_refuse_bad_input(cli, history):
    for args, message in [
        (["summary", "--from", "yesterday"], "bad date 'yesterday'"),
        (["stages", "--from", "2026-02-01", "--to", "2026-01-01"], "is after --to"),
        (["errors", "--process", "NOPE"], "unknown process 'NOPE' (registered: CANCELLATION)"),
        (["aging", "--to", "13/01/2026"], "bad date '13/01/2026'"),
        (["errors", "--limit", "0"], "--limit must be at least 1"),
    ]:
        result = cli("report", *args)
        assert result.code == 2, args
        assert result.err == f"tracking: error: {message}\n" or message in result.err, args


def test_report_with_nothing_in_the_window(cli, history):
    result = cli("report", "summary", "--from", "2020-01-01", "--to", "2020-01-02")
    assert result.code == 0 and "(none)" in result.out
    empty_csv = cli("report", "errors", "--from", "2020-01-01", "--to", "2020-01-02",
                    "--format", "csv").out
    assert empty_csv.splitlines() == ["process,platform,outcome,error_code,count,last_seen,"
                                      "description"]


def test_report_html_writes_a_self_contained_page(cli, history, tmp_path):
    out = tmp_path / "report.html"
    result = cli("report", "html", "--out", out, *WINDOW, "--title", "Ops <daily>")
    assert result.code == 0 and f"wrote {out}" in result.out
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    assert "Ops &lt;daily&gt;" in page and "customer unknown" in page
    assert "http://" not in page and "https://" not in page
    bad = cli("report", "html", "--out", tmp_path / "missing-dir" / "r.html")
    assert bad.code == 2 and "cannot write" in bad.err


# -- as a program ----------------------------------------------------------------------------


def run_program(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracking", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_python_dash_m_tracking(env, tmp_path):
    environ = {**os.environ, "TRACKING_DATABASE_URL": env, "TRACKING_PROCESSES": SAMPLE}
    items = write_csv(tmp_path / "items.csv", ["P1", "P2"])
    intake = run_program("intake", P, str(items), "--format", "json", env=environ)
    assert intake.returncode == 0, intake.stderr
    assert json.loads(intake.stdout)["new"] == 2
    summary = run_program("report", "summary", "--format", "csv", env=environ)
    assert summary.returncode == 0 and f"{P},PENDING,2" in summary.stdout
    bad = run_program("report", "summary", "--from", "nope", env=environ)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("tracking: error: bad date 'nope'")
