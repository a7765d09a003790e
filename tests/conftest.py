"""Shared fixtures: a fresh tracking database per test, on SQLite and (when configured) PostgreSQL.

PostgreSQL tests read the server URL from ``TRACKING_TEST_POSTGRES_URL`` (for example
``postgresql://postgres@127.0.0.1:5432/test``); each test run creates its own database there
and drops it at the end. Without the variable those tests are skipped (CI sets it).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from tests.pg import fresh_database
from tracking import KeyFields, Platform, Process, RetryPolicy, Tracker, connect
from tracking.db import current_revision, head_revision

POSTGRES_ENV = "TRACKING_TEST_POSTGRES_URL"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups off the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """How ``make test`` shares the tests between its pytest-xdist workers (``--dist
    loadgroup``): the slow end-to-end tests run one after another in one worker (each
    starts servers and processes of its own, timed by leases and heartbeats: two at once on
    a small machine would starve each other), and the other tests of a module stay together
    (its module-scoped fixtures are made once)."""
    for item in items:
        slow = item.get_closest_marker("slow") is not None
        item.add_marker(pytest.mark.xdist_group("slow" if slow else item.nodeid.split("::")[0]))


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook, called on the controller
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """Refuse to run ungrouped: pytest-xdist marks a test's group in its node id (``@slow``),
    which pytest 9.2 ignores, and the tests would be shared out one by one without a word
    (pytest-xdist#1386; pyproject.toml keeps pytest below 9.2 for it)."""
    grouping = node.config.getvalue("dist") == "loadgroup"
    if grouping and any("@" not in nodeid for nodeid in ids):
        pytest.exit(
            "pytest-xdist --dist loadgroup does not group the tests with this pytest "
            f"({pytest.__version__}; pytest-xdist#1386): install pytest<9.2, or run with -n 0",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


class FakeClock:
    """A controllable UTC clock for the tracker (no sleeping in tests)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def cancellation_process() -> Process:
    """The process of the seed library's scenarios: A (1 try), B (2 stages, 2 tries), C."""
    return Process(
        "CANCELLATION",
        platforms=[
            Platform("A", order=1, stages=("validate",), retry=RetryPolicy(max_attempts=1)),
            Platform(
                "B", order=2, stages=("process", "confirm"), retry=RetryPolicy(max_attempts=2)
            ),
            Platform("C", order=3),
        ],
        dedup=KeyFields("request_id"),
    )


TABLES = ("tx_event, tx_stage, tx_process, tx_catalog_platform, tx_catalog_process, tx_purge, "
          "tx_purging, tx_event_cursor, tx_count, tx_count_delta")


def migrated(url: str) -> str:
    """The database at ``url``, migrated (as ``tracking db upgrade`` leaves it): flows and
    CLI commands check the schema, they do not change it."""
    connect(url, migrate=True).dispose()
    return url


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A database of its own on the PostgreSQL server, for this test session (migrated)."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set")
    with fresh_database(url) as database_url:
        yield migrated(database_url)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """A migrated SQLite file, made once: each test gets a copy (migrating per test costs
    more than the test)."""
    path = tmp_path_factory.mktemp("template") / "tracking.db"
    migrated(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(tmp_path, sqlite_template: Path) -> str:
    """A migrated SQLite file of this test's own."""
    shutil.copyfile(sqlite_template, tmp_path / "tracking.db")
    return f"sqlite:///{tmp_path / 'tracking.db'}"


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """The session's migrated database, emptied after the test (TRUNCATE fires no row
    trigger); rebuilt when a test left another schema revision (a downgrade test)."""
    yield postgres_server_url
    engine = connect(postgres_server_url)
    try:
        if current_revision(engine) == head_revision():
            with engine.begin() as conn:
                conn.exec_driver_sql(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
            return
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        engine.dispose()
    migrated(postgres_server_url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request) -> str:
    """Each test using it runs once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def env(monkeypatch, db_url: str) -> str:
    """Flows of ``tests.flow_processes`` on a fresh database (each test on both)."""
    monkeypatch.setenv("TRACKING_PROCESSES", "tests.flow_processes:processes")
    monkeypatch.setenv("TRACKING_DATABASE_URL", db_url)
    return db_url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = connect(db_url, migrate=True)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Prefect's test harness (a temporary Prefect server and database), once per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tracker(engine: Engine, clock: FakeClock) -> Tracker:
    return Tracker(engine, processes=[cancellation_process()], clock=clock)
