"""Health, catalog and intake: POST /transactions (validated, deduplicated)."""


from __future__ import annotations

import json
import time
import uuid as uuid_lib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from tests.api.helpers import (
    P,
    PrefectSettings,
    assert_error,
    settings_for,
    submit,
    tx_count,
)
from tests.api_processes import orders
from tracking import Tracker
from tracking.api import create_app
from tracking.db import create_engine

# -- health and catalog ---------------------------------------------------------------------


def test_health_reports_database_and_prefect_not_configured(client, monkeypatch):
    monkeypatch.setattr("prefect.settings.get_current_settings", lambda: PrefectSettings(None))
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["version"]
    assert body["database"]["status"] == "ok"
    assert body["prefect"]["status"] == "not configured"
    uuid_lib.UUID(r.headers["x-request-id"], version=4)


def test_health_prefect_unreachable_is_degraded_not_an_error(client, monkeypatch):
    # A closed port: the check gives up fast and the service still answers 200.
    monkeypatch.setattr(
        "prefect.settings.get_current_settings",
        lambda: PrefectSettings("http://127.0.0.1:9/api"),
    )
    started = time.monotonic()
    r = client.get("/health")
    assert time.monotonic() - started < 5
    assert r.status_code == 200
    assert r.json()["status"] == "degraded"
    assert r.json()["prefect"]["status"] == "unreachable"


def test_health_is_503_with_envelope_when_the_database_is_down(db_url, monkeypatch):
    monkeypatch.setattr("prefect.settings.get_current_settings", lambda: PrefectSettings(None))
    down = Tracker(create_engine("postgresql://postgres@127.0.0.1:9/nothing"))
    with TestClient(create_app(settings_for(db_url), down), raise_server_exceptions=False) as c:
        r = c.get("/health")
    body = assert_error(r, 503, "DATABASE_UNAVAILABLE")
    assert body["error"]["details"]["database"]["status"] == "error"
    assert r.headers["retry-after"]


def test_processes_lists_the_catalog(tracker, make_client):
    tracker.register(orders)
    r = make_client().get("/processes")
    assert r.status_code == 200
    by_code = {p["code"]: p for p in r.json()["processes"]}
    cancellation = by_code[P]
    assert [(p["code"], p["order"], p["stages"]) for p in cancellation["platforms"]] == [
        ("A", 1, ["validate"]), ("B", 2, ["process", "confirm"]), ("C", 3, ["main"]),
    ]
    assert cancellation["platforms"][0]["retry"]["max_attempts"] == 1
    assert cancellation["dedup"] == {"strategy": "key_fields", "fields": ["request_id"]}
    assert by_code["ORDERS"]["dedup"]["strategy"] == "payload_hash"
    assert by_code["ORDERS"]["platforms"][0]["retry"]["delay"] == 60


def test_app_built_from_settings_registers_processes_in_the_database(sqlite_url):
    settings = settings_for(sqlite_url, processes=["tests.api_processes:processes"])
    with TestClient(create_app(settings)) as c:
        codes = {p["code"] for p in c.get("/processes").json()["processes"]}
        assert codes == {P, "ORDERS"}
        created = c.post("/transactions", json={"process": "ORDERS", "payload": {"n": 1}})
        assert created.status_code == 201
    engine = create_engine(sqlite_url)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT code FROM tx_catalog_process")).scalars().all()
    engine.dispose()
    assert set(stored) == {P, "ORDERS"}


# -- intake -----------------------------------------------------------------------------------


def test_create_then_duplicate_returns_the_same_transaction(client, tracker, api_logs):
    first = submit(client, name="x")
    assert first.status_code == 201
    body = first.json()
    assert body["process"] == P and body["state"] == "PENDING"
    assert body["business_key"] == "FE-1" and body["source"] == "crm"
    assert body["payload"] == {"request_id": "FE-1", "name": "x"}
    assert body["created_at"].endswith("Z") or body["created_at"].endswith("+00:00")

    again = submit(client, name="changed")  # same key field: a duplicate
    assert again.status_code == 200
    assert again.json() == body  # same shape, same uuid, nothing changed
    assert tx_count(tracker) == 1
    transitions = [r for r in api_logs if r.getMessage() == "transition"]
    assert [(t.uuid, t.old_state, t.new_state) for t in transitions] == [
        (body["uuid"], None, "PENDING")
    ]


def test_concurrent_duplicate_submissions_create_one_transaction(client, tracker):
    def post(_: int):
        return submit(client, "FE-RACE")

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(16)))
    assert sorted(r.status_code for r in responses) == [200] * 15 + [201]
    assert len({r.json()["uuid"] for r in responses}) == 1
    assert tx_count(tracker) == 1


def test_many_concurrent_creates_are_all_written(client, tracker):
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: submit(client, f"FE-{i}"), range(40)))
    assert [r.status_code for r in responses] == [201] * 40
    assert len({r.json()["uuid"] for r in responses}) == 40
    assert tx_count(tracker) == 40


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"process": "NOPE", "payload": {"request_id": "x"}}, "unknown process"),
        ({"process": P, "payload": {"other": 1}}, "request_id"),  # dedup key missing
        ({"process": P, "payload": {"request_id": ""}}, "request_id"),  # dedup key blank
        ({"process": P, "payload": {"request_id": " \t"}}, "request_id"),
        ({"process": P, "payload": [1, 2]}, "payload"),
        ({"process": P, "payload": "text"}, "payload"),
        ({"process": P, "payload": None}, "payload"),
        ({"process": P}, "payload"),
        ({"payload": {"request_id": "x"}}, "process"),
        ({"process": P, "payload": {"request_id": "x"}, "extra": 1}, "extra"),
        ({"process": P, "payload": {"request_id": "x"}, "source": "s" * 101}, "source"),
        ({"process": P, "payload": {"request_id": "x\u0000"}}, "NUL"),
        ({"process": "bad code!", "payload": {"request_id": "x"}}, "process"),
        ([1, 2, 3], "body"),
    ],
)
def test_invalid_submissions_are_422_and_change_nothing(client, tracker, body, fragment):
    r = client.post("/transactions", json=body)
    envelope = assert_error(r, 422, "VALIDATION_ERROR")
    assert fragment.lower() in json.dumps(envelope).lower()
    assert tx_count(tracker) == 0


def test_blank_dedup_keys_fail_alone_in_a_concurrent_batch(client, tracker):
    """Blank keys among concurrent submissions (written as one batch) are each a 422 that
    names the field; the good ones are created; an int key is a key like any other."""
    keys: list[Any] = ["FE-1", "", "FE-2", "   ", 3]
    with ThreadPoolExecutor(len(keys)) as pool:
        responses = list(pool.map(lambda k: submit(client, k), keys))
    assert [r.status_code for r in responses] == [201, 422, 201, 422, 201]
    for r in (responses[1], responses[3]):
        error = assert_error(r, 422, "VALIDATION_ERROR")["error"]
        assert "'request_id'" in error["message"] and "blank" in error["message"]
        assert error["details"] == {"field": "payload"}
    assert responses[4].json()["business_key"] == "3"
    assert tx_count(tracker) == 3


def test_deeply_nested_payload_is_422(client, tracker):
    payload: dict[str, Any] = {"request_id": "deep"}
    node = payload
    for _ in range(40):
        node["child"] = {}
        node = node["child"]
    r = client.post("/transactions", json={"process": P, "payload": payload})
    assert "nested deeper" in assert_error(r, 422, "VALIDATION_ERROR")["error"]["message"]
    assert tx_count(tracker) == 0


@pytest.mark.parametrize(
    "raw",
    [
        b'{"process": "CANCELLATION", "payload": {"request_id": ',  # truncated
        b"not json at all",
        b'{"process": "CANCELLATION", "payload": {"request_id": "x", "n": NaN}}',
        b'{"process": "CANCELLATION", "payload": {"request_id": "x", "n": Infinity}}',
        b"[" * 100_000,  # deeper than the JSON parser's recursion limit
        b'{"process": "CANCELLATION", "payload": {"request_id": "\\ud800"}}',  # lone surrogate
    ],
)
def test_malformed_json_is_4xx_never_500(client, tracker, raw):
    r = client.post("/transactions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert_error(r, r.status_code, "VALIDATION_ERROR" if r.status_code == 422 else "BAD_REQUEST")
    assert tx_count(tracker) == 0


def test_body_over_the_limit_is_413_by_header_and_by_bytes(make_client, tracker):
    client = make_client(api_max_body_bytes=2000)
    big = {"process": P, "payload": {"request_id": "x", "blob": "y" * 5000}}
    assert_error(client.post("/transactions", json=big), 413, "PAYLOAD_TOO_LARGE")
    # No Content-Length (chunked): the bytes received are counted.
    chunks = iter([json.dumps(big).encode()[i : i + 500] for i in range(0, 5100, 500)])
    r = client.post("/transactions", content=chunks, headers={"content-type": "application/json"})
    assert_error(r, 413, "PAYLOAD_TOO_LARGE")
    assert tx_count(tracker) == 0
    small = client.post("/transactions", json={"process": P, "payload": {"request_id": "ok"}})
    assert small.status_code == 201
