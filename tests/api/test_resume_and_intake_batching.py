"""The real resume flow behind the API, and the intake group commit."""


from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import (
    P,
    PrefectSettings,
    assert_error,
    settings_for,
    tx_count,
)
from tests.api_processes import orders
from tracking import StageState, Tracker
from tracking.api import create_app
from tracking.api.logs import JsonFormatter, TextFormatter

# -- the real resume flow -------------------------------------------------------------------


@pytest.mark.slow
def test_process_through_the_real_resume_flow(prefect_harness, monkeypatch, sqlite_url):
    """The default runner: tracking.flows.resume_flow scoped to the transaction."""
    from tests import flow_processes

    monkeypatch.setenv("TRACKING_PROCESSES", "tests.flow_processes:processes")
    monkeypatch.setenv("TRACKING_DATABASE_URL", sqlite_url)
    settings = settings_for(sqlite_url, processes=["tests.flow_processes:processes"])
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        made = [
            client.post("/transactions", json={"process": "BUSY", "payload": {"id": f"api-{i}"}})
            for i in range(2)
        ]
        uuid, other = (r.json()["uuid"] for r in made)
        before = dict(flow_processes.executions)

        with ThreadPoolExecutor(4) as pool:
            responses = list(
                pool.map(lambda _: client.post(f"/transactions/{uuid}/process"), range(4))
            )
        statuses = [r.status_code for r in responses]
        assert 200 in statuses and set(statuses) <= {200, 409}, [r.text for r in responses]
        for r in responses:  # a 200 ran something; the others say who did
            if r.status_code == 200:
                assert r.json()["stages_run"] >= 1, r.text
            else:
                assert r.json()["error"]["details"]["reason"] in ("running", "final"), r.text
        done = next(r.json() for r in responses if r.status_code == 200)
        assert done["flow_run_id"]
        final = client.get(f"/transactions/{uuid}").json()
        assert final["state"] == "COMPLETED"
        assert [s["attempt"] for s in final["stages"]] == [1, 1]
        assert [e["flow_run_id"] for e in final["events"] if e["kind"] == "ATTEMPT"]
        ran = {k: v - before.get(k, 0) for k, v in flow_processes.executions.items()}
        assert ran.get((uuid, "A.main")) == 1 and ran.get((uuid, "B.main")) == 1
        # Scoped to the one transaction: the other one was not touched.
        assert (other, "A.main") not in ran or ran[(other, "A.main")] == 0
        assert client.get(f"/transactions/{other}").json()["state"] == "PENDING"
        assert_error(client.post(f"/transactions/{uuid}/process"), 409, "ALREADY_PROCESSED")
        assert StageState.COMPLETED.value == final["stages"][0]["state"]




# -- group commit -----------------------------------------------------------------------------


def test_a_bad_payload_in_a_batch_fails_alone(tracker):
    import asyncio

    from tracking.api.errors import ApiError
    from tracking.api.intake import IntakeBatcher, _Item

    batcher = IntakeBatcher(tracker)

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        items = [
            _Item(P, {"request_id": "G-1"}, "x", loop.create_future()),
            # Not JSON (cannot come through HTTP): start_many refuses the whole batch...
            _Item(P, {"request_id": "G-2", "bad": {1, 2}}, "x", loop.create_future()),
            _Item(P, {"request_id": "G-1"}, "x", loop.create_future()),  # duplicate of #1
            _Item(P, {"request_id": "G-3"}, None, loop.create_future()),  # another source
        ]
        return await asyncio.to_thread(batcher._write, items)

    first, bad, dup, other = asyncio.run(scenario())
    # ...so it is retried item by item: only the bad one fails.
    assert isinstance(bad, ApiError) and bad.status == 422
    assert first[1] is True and dup == (first[0], False)
    assert other[1] is True and other[0].source is None
    assert tx_count(tracker) == 2


def test_process_of_a_process_this_api_does_not_know_is_409(make_client, engine, clock):
    # Written by another deployment whose process this API does not import.
    Tracker(engine, processes=[orders], clock=clock).start_or_resume("ORDERS", {"n": 1})
    client = make_client()
    (item,) = client.get("/transactions").json()["items"]
    assert client.get(f"/transactions/{item['uuid']}").status_code == 200
    r = client.post(f"/transactions/{item['uuid']}/process")
    assert assert_error(r, 409, "PROCESS_NOT_REGISTERED")["error"]["details"] == {
        "process": "ORDERS"
    }


def test_health_does_not_hang_on_a_database_that_does_not_answer(client, monkeypatch):
    monkeypatch.setattr("prefect.settings.get_current_settings", lambda: PrefectSettings(None))
    monkeypatch.setattr("tracking.api.routes.DB_HEALTH_TIMEOUT", 0.2)
    monkeypatch.setattr(client.app.state.service, "database_health", lambda: time.sleep(2))
    started = time.monotonic()
    body = assert_error(client.get("/health"), 503, "DATABASE_UNAVAILABLE")
    assert time.monotonic() - started < 1.5
    assert "no answer" in body["error"]["details"]["database"]["detail"]


def test_several_batch_writers_keep_dedup_exact(tracker):
    import asyncio

    from tracking.api.intake import IntakeBatcher

    batcher = IntakeBatcher(tracker, max_batch=4, writers=3)

    async def scenario() -> list[tuple[Any, bool]]:
        keys = [f"W-{i % 10}" for i in range(40)]  # each key submitted 4 times
        return await asyncio.gather(
            *(batcher.submit(P, {"request_id": key}, "x") for key in keys)
        )

    results = asyncio.run(scenario())
    assert sum(is_new for _, is_new in results) == 10
    by_key: dict[str, set[str]] = {}
    for row, _ in results:
        by_key.setdefault(row.business_key, set()).add(row.uuid)
    assert len(by_key) == 10 and all(len(u) == 1 for u in by_key.values())
    assert tx_count(tracker) == 10


def test_text_log_lines_cannot_be_split_by_the_client(client, api_logs):
    client.get("/transactions/abc%0A2026-01-01T00:00:00Z INFO forged%1b[31m")
    access = next(rec for rec in api_logs if rec.getMessage() == "request")
    line = TextFormatter().format(access)
    assert "\n" not in line and "\x1b" not in line
    assert "abc\\n2026-01-01T00:00:00Z INFO forged\\x1b[31m" in line
    assert json.loads(JsonFormatter().format(access))["path"].startswith("/transactions/abc\n")


def test_request_ids_of_forked_server_processes_never_repeat():
    """uvicorn --workers forks after import: ids from a PRNG state copied into each worker
    would repeat across workers."""
    import os

    from tracking.api.logs import new_request_id

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a forked worker
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert child != new_request_id()
