"""Shared fixtures: a fresh tracking database per test, on SQLite and (when configured) PostgreSQL.

PostgreSQL tests read the server URL from ``TRACKING_TEST_POSTGRES_URL`` (for example
``postgresql://postgres@127.0.0.1:5432/test``); each test run creates its own database there
and drops it at the end. Without the variable those tests are skipped (CI sets it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tests.pg import fresh_database
from tracking import KeyFields, Platform, Process, RetryPolicy, Tracker, connect

POSTGRES_ENV = "TRACKING_TEST_POSTGRES_URL"


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


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A database of its own on the PostgreSQL server, for this test session."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set")
    with fresh_database(url) as database_url:
        yield database_url


def migrated(url: str) -> str:
    """The database at ``url``, migrated (as ``tracking db upgrade`` leaves it): flows and
    CLI commands check the schema, they do not change it."""
    connect(url, migrate=True).dispose()
    return url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return migrated(f"sqlite:///{tmp_path / 'tracking.db'}")


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A freshly migrated database: every table dropped after the test."""
    yield migrated(postgres_server_url)
    engine = sa.create_engine(postgres_server_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()


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
