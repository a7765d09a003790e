"""Fixtures of the API tests: an app on each database, its client, its logs."""


from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import fake_runner, settings_for
from tracking import Tracker
from tracking.api import create_app


@pytest.fixture
def make_client(tracker: Tracker, db_url: str) -> Iterator[Callable[..., TestClient]]:
    """Build an app on the test's tracker and enter its TestClient (lifespan included)."""
    opened: list[TestClient] = []

    def make(
        runner: Callable[[str, str], Any] | None = None,
        deployer: Callable[[str, str], tuple[str, str]] | None = None,
        **overrides: Any,
    ) -> TestClient:
        app = create_app(
            settings_for(db_url, **overrides),
            tracker,
            process_runner=runner or fake_runner(tracker),
            deployment_runner=deployer,
        )
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


@pytest.fixture
def api_logs() -> Iterator[list[logging.LogRecord]]:
    """The records of the ``tracking.api`` logger (it does not propagate to the root)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    logger = logging.getLogger("tracking.api")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


