"""The SQL views for BI tools agree with the Python reports, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Engine, make_url

from tests.conftest import FakeClock
from tests.sample_processes import P, build_scenario, process
from tracking import Reports, Tracker, connect
from tracking.db import _alembic_config, upgrade

HOURS = 8  # from 20:00 to 04:00 the next day: the scenario spans two UTC days
START = datetime(2026, 1, 5, 20, 0, tzinfo=UTC)
VIEWS = ["v_transaction_summary", "v_stage_summary", "v_error_summary", "v_pending_aging",
         "v_hourly_throughput", "v_attempt_duration"]
SQLITE_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$")


def _build(url: str) -> Engine:
    engine = connect(url, migrate=True)
    clock = FakeClock()
    clock.now = START
    build_scenario(Tracker(engine, [process], clock=clock), clock, hours=HOURS)
    return engine


@pytest.fixture(scope="module")
def sqlite_scenario(tmp_path_factory) -> Iterator[Engine]:
    """The sample scenario, built once for this module, in a SQLite file."""
    engine = _build(f"sqlite:///{tmp_path_factory.mktemp('views')}/views.db")
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def postgres_scenario(postgres_server_url) -> Iterator[Engine]:
    """The sample scenario, built once for this module, in a PostgreSQL database of its own."""
    server = make_url(postgres_server_url)
    name = f"tracking_views_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine = _build(server.set(database=name).render_as_string(hide_password=False))
    yield engine
    engine.dispose()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def scenario(request):
    """``(reports, start, end)`` of the scenario, once on SQLite and once on PostgreSQL."""
    engine = request.getfixturevalue(f"{request.param}_scenario")
    return Reports(engine), START, START + timedelta(hours=HOURS)


def view(engine, name: str) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(f"SELECT * FROM {name}"))]


def utc(value) -> datetime:
    """A view timestamp as an aware datetime (SQLite gives UTC text, PostgreSQL timestamptz)."""
    if isinstance(value, str):
        assert SQLITE_TIMESTAMP.match(value), value
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    assert value.tzinfo is not None
    return value.astimezone(UTC)


def day(value) -> str:
    return value.isoformat() if isinstance(value, date) else value


def test_views_exist_and_go_away_on_downgrade(engine):
    def views() -> set[str]:
        return set(VIEWS) & set(sa.inspect(engine).get_view_names())

    assert views() == set(VIEWS)
    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0001")
    assert views() == set()
    upgrade(engine)
    assert views() == set(VIEWS)


def test_transaction_summary_matches_the_report(scenario):
    reports, start, end = scenario
    rows = view(reports.engine, "v_transaction_summary")
    totals: dict = defaultdict(int)
    per_day: dict = defaultdict(int)
    for r in rows:
        totals[(r["process_code"], r["state"])] += r["transactions"]
        per_day[(day(r["created_day"]), r["state"])] += r["transactions"]
        assert utc(r["first_created_at"]) <= utc(r["last_created_at"])
    expected = {(x.process, x.state.value): x.count
                for x in reports.summary_by_process_and_state(start, end)}
    assert dict(totals) == expected
    second_day = datetime(2026, 1, 6, tzinfo=UTC)
    assert {d for d, _ in per_day} == {"2026-01-05", "2026-01-06"}
    assert {s: n for (d, s), n in per_day.items() if d == "2026-01-06"} == {
        x.state.value: x.count for x in reports.summary_by_state(second_day, end)}


def test_stage_summary_matches_the_report(scenario):
    reports, start, end = scenario
    totals: dict = defaultdict(int)
    attempts: dict = defaultdict(int)
    for r in view(reports.engine, "v_stage_summary"):
        totals[(r["platform"], r["stage"], r["state"])] += r["stages"]
        attempts[r["platform"]] += r["attempts"]
    expected = {(x.platform, x.stage, x.state.value): x.count
                for x in reports.stage_summary_by_platform_and_stage(start, end, P)}
    assert dict(totals) == expected
    by_platform: dict = defaultdict(int)
    for x in reports.attempts_distribution(start, end):
        by_platform[x.platform] += x.attempts * x.stages
    assert dict(attempts) == dict(by_platform)


def test_error_summary_matches_top_errors(scenario):
    reports, start, end = scenario
    merged: dict = {}
    for r in view(reports.engine, "v_error_summary"):
        key = (r["process_code"], r["platform"], r["outcome"], r["error_code"])
        count, last, description = merged.get(key, (0, None, None))
        seen = utc(r["last_seen"])
        merged[key] = (count + r["errors"], max(filter(None, [last, seen])),
                       max(filter(None, [description, r["description"]])))
    expected = {
        (e.process, e.platform, e.outcome.value, e.error_code): (e.count, e.last_seen,
                                                                   e.description)
        for e in reports.top_errors(start, end, limit=100)
    }
    assert merged == expected
    assert len(expected) >= 5


def test_pending_aging_matches_the_report(scenario):
    reports, _, _ = scenario
    now = datetime.now(UTC)
    rows = sorted(view(reports.engine, "v_pending_aging"),
                  key=lambda r: (utc(r["created_at"]), r["uuid"]))
    expected = reports.aging(now=now)
    assert len(rows) == len(expected) > 3
    for r, item in zip(rows, expected, strict=True):
        assert (r["uuid"], r["process_code"], r["business_key"], r["tx_state"]) == (
            item.uuid, item.process, item.business_key, item.state.value)
        assert (r["platform"], r["stage"], r["stage_state"], r["attempts"]) == (
            item.platform, item.stage, item.stage_state.value, item.attempts)
        assert (r["attempts_allowed"], r["error_code"], r["error_description"]) == (
            item.attempts_allowed, item.error_code, item.error_description)
        assert utc(r["created_at"]) == item.created_at
        next_at = r["next_attempt_at"]
        assert (utc(next_at) if next_at is not None else None) == item.next_attempt_at
        # the view ages against the database clock, the report against `now`
        assert abs(r["age_seconds"] - item.age_seconds) < 120


def test_hourly_throughput_matches_the_report(scenario):
    reports, start, end = scenario
    rows = {utc(r["hour"]): r for r in view(reports.engine, "v_hourly_throughput")}
    report = reports.throughput_by_hour(start, end + timedelta(hours=1))
    expected = {x.hour: x for x in report if x.finished}
    assert set(rows) == set(expected) and len(expected) >= HOURS - 1
    for hour, x in expected.items():
        r = rows[hour]
        assert (r["completed"], r["rejected"], r["exhausted"], r["cancelled"], r["finished"]) == (
            x.completed, x.rejected, x.exhausted, x.cancelled, x.finished)


def test_attempt_duration_matches_stage_durations(scenario):
    reports, start, end = scenario
    durations: dict = defaultdict(list)
    for r in view(reports.engine, "v_attempt_duration"):
        assert utc(r["started_at"]) <= utc(r["finished_at"])
        durations[r["platform"]].append(r["duration_seconds"])
    for x in reports.stage_durations(start, end + timedelta(hours=1)):
        values = durations[x.platform]
        assert len(values) == x.attempts
        assert round(sum(values) / len(values), 3) == pytest.approx(x.mean_seconds, abs=0.002)
        assert max(values) == pytest.approx(x.max_seconds, abs=0.001)
        rank = -(-95 * len(values) // 100)
        assert sorted(values)[rank - 1] == pytest.approx(x.p95_seconds, abs=0.001)


def _normalised(engine) -> dict[str, list[tuple]]:
    """Every view's rows with uuids, ids and wall-clock ages left out, in a stable order."""
    out = {}
    for name in VIEWS:
        rows = []
        for r in view(engine, name):
            values = []
            for column, value in sorted(r.items()):
                if column in ("uuid", "event_id", "age_seconds"):
                    continue
                if isinstance(value, datetime) or (
                    isinstance(value, str) and SQLITE_TIMESTAMP.match(value)
                ):
                    value = utc(value)
                elif isinstance(value, date):
                    value = value.isoformat()
                elif isinstance(value, float):
                    value = round(value, 2)
                values.append((column, value))
            rows.append(tuple(values))
        out[name] = sorted(rows, key=repr)
    return out


def test_views_give_the_same_results_on_sqlite_and_postgres(sqlite_scenario, postgres_scenario):
    sqlite_rows, postgres_rows = _normalised(sqlite_scenario), _normalised(postgres_scenario)
    for name in VIEWS:
        assert sqlite_rows[name] == postgres_rows[name], name
        assert sqlite_rows[name], name
