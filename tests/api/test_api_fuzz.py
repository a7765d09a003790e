"""Property-based fuzzing of the API from its OpenAPI schema (schemathesis + hypothesis).

For every operation, schemathesis generates valid requests (positive mode) and invalid ones
(negative mode: wrong types, missing fields, out-of-range values, odd strings); each is sent
to the app in-process. Properties checked on every response:

* never a 5xx;
* every 4xx has the error envelope, with the request id of the response header.

The number of examples per operation and mode is bounded (``FUZZ_EXAMPLES``, default 80) so
the test runs in well under a minute; the number of cases run is printed (``-s`` shows it).
"""

from __future__ import annotations

import os
import uuid as uuid_lib
from collections import Counter

import hypothesis
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.api_processes import processes
from tracking import Tracker, connect
from tracking.api import create_app
from tracking.settings import Settings

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "80"))


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'tracking.db'}"
    engine = connect(url, migrate=True)
    tracker = Tracker(engine, processes=processes)
    # A few real transactions, so the reports have rows to count.
    for i in range(3):
        tracker.start_or_resume("CANCELLATION", {"request_id": f"FUZZ-{i}"})

    def never_run(process: str, uuid: str) -> dict[str, int]:
        return {"stages_run": 0}

    settings_ = Settings(database_url=url, processes=[], api_key=None, api_max_body_bytes=10_000)
    app = create_app(settings_, tracker, process_runner=never_run)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    engine.dispose()


def _fuzz(strategy, label: str, cases: Counter[str], statuses: Counter[int]) -> None:
    """Run ``EXAMPLES`` generated requests of one operation and mode through the checks."""

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    def check(case) -> None:
        response = case.call()
        cases[label] += 1
        statuses[response.status_code] += 1
        where = f"{case.method} {case.formatted_path} -> {response.status_code}"
        assert response.status_code < 500, f"{where}: {response.text[:500]}"
        if 400 <= response.status_code < 500:
            body = response.json()
            assert set(body) == {"error", "request_id"}, where
            assert set(body["error"]) == {"code", "message", "details"}, where
            assert body["request_id"] == response.headers["x-request-id"][0], where

    try:
        check()
    except Unsatisfiable:
        pass  # no invalid request can be built for an operation without inputs


def test_no_5xx_and_every_4xx_has_the_envelope(api_schema):
    cases: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) == 15  # 14 paths, /transactions has GET and POST
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)
            _fuzz(strategy, f"{operation.label} [{mode.value}]", cases, statuses)

    total = sum(cases.values())
    print(f"\nschemathesis: {total} cases over {len(operations)} operations; "
          f"statuses {dict(sorted(statuses.items()))}")
    assert total >= len(operations) * EXAMPLES  # positive mode alone gives about that many
    assert not any(status >= 500 for status in statuses)


HEADER_BYTES = st.binary(min_size=0, max_size=200).filter(
    lambda b: b"\r" not in b and b"\n" not in b and b"\x00" not in b
)


def test_arbitrary_request_id_and_api_key_headers(tmp_path):
    """Any X-Request-ID / X-API-Key bytes: never a 5xx; the id is echoed only when safe."""
    url = f"sqlite:///{tmp_path / 'tracking.db'}"
    tracker = Tracker(connect(url, migrate=True), processes=processes)
    settings_ = Settings(database_url=url, processes=[], api_key="k3y")
    with TestClient(create_app(settings_, tracker), raise_server_exceptions=False) as client:

        @given(request_id=HEADER_BYTES, api_key=HEADER_BYTES)
        @settings(max_examples=150, deadline=None, database=None, derandomize=True)
        def check(request_id: bytes, api_key: bytes) -> None:
            r = client.post(
                "/transactions",
                json={"process": "ORDERS", "payload": {"n": 1}},
                headers=[(b"X-Request-ID", request_id), (b"X-API-Key", api_key)],
            )
            assert r.status_code in (200, 201, 401)
            echoed = r.headers["x-request-id"]
            if echoed != request_id.decode("latin-1"):
                uuid_lib.UUID(echoed, version=4)
            assert r.json().get("request_id", echoed) == echoed

        check()
    tracker.engine.dispose()
