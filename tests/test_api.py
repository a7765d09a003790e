"""The HTTP API (tracking.api) through Starlette's TestClient, on SQLite and PostgreSQL.

The app gets the test's tracker (with its fake clock) and, for ``POST .../process``, a fake
runner that does what the resume flow does for one transaction: claim each stage in order
and record an attempt. One slow test at the end uses the real resume flow.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid as uuid_lib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from tests.api_processes import orders
from tracking import StageState, Tracker, TxState
from tracking.api import create_app
from tracking.api.logs import JsonFormatter, TextFormatter
from tracking.api.schemas import encode_cursor
from tracking.api.service import run_on_deployment
from tracking.db import create_engine
from tracking.models import EventKind, TxProcess
from tracking.settings import Settings

P = "CANCELLATION"
STAGES = [("A", "validate"), ("B", "process"), ("B", "confirm"), ("C", "main")]
ENVELOPE_KEYS = {"error", "request_id"}


def fake_runner(
    tracker: Tracker,
    outcomes: dict[tuple[str, str], int] | None = None,
    delay: float = 0.0,
    calls: list[tuple[str, str]] | None = None,
) -> Callable[[str, str], dict[str, Any]]:
    """What resume_flow(process, uuid=...) does, minus Prefect: claim and run each stage."""

    def run(process: str, uuid: str) -> dict[str, Any]:
        if calls is not None:
            calls.append((process, uuid))
        owner = f"fake-run-{uuid_lib.uuid4()}"
        ran = 0
        for planned in tracker.process(process).stage_plan():
            claimed = tracker.claim(
                process, planned.platform, planned.stage, owner=owner, uuid=uuid, limit=1
            )
            for stage in claimed:
                time.sleep(delay)
                code = (outcomes or {}).get((stage.platform, stage.stage), 0)
                tracker.complete_stage(uuid, stage.platform, code, stage=stage.stage, owner=owner)
                ran += 1
        return {"stages_run": ran, "flow_run_id": owner}

    return run


def assert_error(response, status: int, code: str) -> dict[str, Any]:
    """The response is an envelope with this status and code, and the request id matches."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == ENVELOPE_KEYS
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    return body


def settings_for(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": url,
        "processes": [],
        "api_key": None,
        "api_key_for_reads": False,
        "api_process_mode": "inline",
        "log_json": False,
        **overrides,
    }
    return Settings(**values)


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


def submit(client: TestClient, request_id: str = "FE-1", **payload: Any):
    return client.post(
        "/transactions",
        json={"process": P, "payload": {"request_id": request_id, **payload}, "source": "crm"},
    )


def tx_count(tracker: Tracker) -> int:
    with tracker.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(TxProcess)).scalar_one()


# -- health and catalog ---------------------------------------------------------------------


class _PrefectSettings:
    def __init__(self, url: str | None) -> None:
        self.api = type("Api", (), {"url": url})()


def test_health_reports_database_and_prefect_not_configured(client, monkeypatch):
    monkeypatch.setattr("prefect.settings.get_current_settings", lambda: _PrefectSettings(None))
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
        lambda: _PrefectSettings("http://127.0.0.1:9/api"),
    )
    started = time.monotonic()
    r = client.get("/health")
    assert time.monotonic() - started < 5
    assert r.status_code == 200
    assert r.json()["status"] == "degraded"
    assert r.json()["prefect"]["status"] == "unreachable"


def test_health_is_503_with_envelope_when_the_database_is_down(db_url, monkeypatch):
    monkeypatch.setattr("prefect.settings.get_current_settings", lambda: _PrefectSettings(None))
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


# -- reading one, listing ----------------------------------------------------------------------


def test_get_transaction_has_stages_and_events(client):
    uuid = submit(client).json()["uuid"]
    r = client.get(f"/transactions/{uuid}")
    assert r.status_code == 200
    body = r.json()
    assert body["uuid"] == uuid and body["state"] == "PENDING"
    assert [(s["platform"], s["stage"], s["state"]) for s in body["stages"]] == [
        (p, s, "PENDING") for p, s in STAGES
    ]
    assert [e["kind"] for e in body["events"]] == ["CREATED"]


@pytest.mark.parametrize("uuid", [str(uuid_lib.uuid4()), "not-a-uuid", "x" * 300, "%00"])
def test_unknown_transaction_is_404(client, uuid):
    for method, path in (
        ("GET", f"/transactions/{uuid}"),
        ("POST", f"/transactions/{uuid}/process"),
        ("POST", f"/transactions/{uuid}/cancel"),
        ("POST", f"/transactions/{uuid}/requeue"),
    ):
        assert_error(client.request(method, path), 404, "TRANSACTION_NOT_FOUND")


def _seed(client, tracker, clock, n: int, prefix: str = "L") -> list[str]:
    """n transactions, one second apart (newest last)."""
    uuids = []
    for i in range(n):
        uuids.append(submit(client, f"{prefix}-{i}").json()["uuid"])
        clock.advance(1)
    return uuids


def test_listing_is_newest_first_and_pages_with_a_stable_cursor(client, tracker, clock):
    uuids = _seed(client, tracker, clock, 7)
    first = client.get("/transactions", params={"limit": 3}).json()
    assert [t["uuid"] for t in first["items"]] == uuids[::-1][:3]
    assert first["next_cursor"]
    # Rows added between pages do not shift the next pages.
    _seed(client, tracker, clock, 2, prefix="LATE")
    second = client.get("/transactions", params={"limit": 3, "cursor": first["next_cursor"]})
    third = client.get("/transactions", params={"limit": 3, "cursor": second.json()["next_cursor"]})
    assert [t["uuid"] for t in second.json()["items"]] == uuids[::-1][3:6]
    assert [t["uuid"] for t in third.json()["items"]] == uuids[::-1][6:]
    assert third.json()["next_cursor"] is None


def test_listing_pages_through_rows_created_in_the_same_instant(client, tracker):
    # The fake clock stands still: every row has the same created_at; uuid breaks the tie.
    created = {submit(client, f"S-{i}").json()["uuid"] for i in range(5)}
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/transactions", params=params).json()
        seen += [t["uuid"] for t in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(created, reverse=True)


def test_listing_filters(client, tracker, clock, make_client):
    tracker.register(orders)
    a, b = _seed(client, tracker, clock, 2)
    start = clock.now
    clock.advance(10)
    c = client.post(
        "/transactions", json={"process": "ORDERS", "payload": {"n": 1}, "source": "shop"}
    ).json()["uuid"]
    client.post(f"/transactions/{a}/cancel")

    def uuids(**params: Any) -> list[str]:
        r = client.get("/transactions", params=params)
        assert r.status_code == 200, r.text
        return [t["uuid"] for t in r.json()["items"]]

    assert uuids(process=P) == [b, a]
    assert uuids(process="ORDERS") == [c]
    assert uuids(state="CANCELLED") == [a]
    assert uuids(source="shop") == [c]
    assert uuids(source="crm", state="PENDING") == [b]
    assert uuids(created_from=(start + timedelta(seconds=5)).isoformat()) == [c]
    assert uuids(created_to=start.isoformat()) == [b, a]


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 501},
        {"limit": "many"},
        {"state": "DONE"},
        {"process": "NOPE"},
        {"cursor": "garbage"},
        {"cursor": "eyJhIjoxfQ"},  # base64 of {"a":1}
        {"created_from": "yesterday"},
        {"created_from": "2026-01-06T00:00:00Z", "created_to": "2026-01-05T00:00:00Z"},
        {"created_to": "0001-01-01T00:00:00+05:00"},  # before year 1 in UTC
        {"source": "a\u0000b"},
    ],
)
def test_listing_rejects_invalid_filters_with_422(client, params):
    assert_error(client.get("/transactions", params=params), 422, "VALIDATION_ERROR")


def test_cursor_from_another_listing_position_still_works(client, tracker, clock):
    uuids = _seed(client, tracker, clock, 3)
    tx = tracker.get_transaction(uuids[1])
    page = client.get(
        "/transactions", params={"cursor": encode_cursor(tx.created_at, tx.uuid)}
    ).json()
    assert [t["uuid"] for t in page["items"]] == [uuids[0]]


# -- processing ---------------------------------------------------------------------------------


def test_process_runs_the_transaction_and_a_second_call_is_409(
    make_client, tracker, api_logs
):
    calls: list[tuple[str, str]] = []
    client = make_client(runner=fake_runner(tracker, calls=calls))
    uuid = submit(client).json()["uuid"]
    r = client.post(f"/transactions/{uuid}/process", headers={"X-Request-ID": "run-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["previous_state"], body["state"], body["stages_run"]) == (
        "PENDING", "COMPLETED", 4
    )
    assert body["flow_run_id"].startswith("fake-run-")
    assert [s["attempt"] for s in body["stages"]] == [1, 1, 1, 1]
    assert calls == [(P, uuid)]
    transition = [
        rec for rec in api_logs if rec.getMessage() == "transition" and rec.uuid == uuid
    ][-1]
    assert (transition.old_state, transition.new_state, transition.request_id) == (
        "PENDING", "COMPLETED", "run-1"
    )

    again = client.post(f"/transactions/{uuid}/process")
    body = assert_error(again, 409, "ALREADY_PROCESSED")
    assert body["error"]["details"]["state"] == "COMPLETED"
    assert body["error"]["details"]["reason"] == "final"
    assert calls == [(P, uuid)]  # the runner was not called again


def test_process_rejected_transaction_then_409_then_requeue(make_client, tracker):
    client = make_client(runner=fake_runner(tracker, outcomes={("B", "process"): 7}))
    uuid = submit(client).json()["uuid"]
    r = client.post(f"/transactions/{uuid}/process")
    assert r.json()["state"] == "REJECTED"
    assert [s["state"] for s in r.json()["stages"]] == [
        "COMPLETED", "REJECTED", "CANCELLED", "CANCELLED"
    ]
    assert_error(client.post(f"/transactions/{uuid}/process"), 409, "ALREADY_PROCESSED")

    requeued = client.post(f"/transactions/{uuid}/requeue", json={"reason": "fixed in CRM"})
    assert requeued.status_code == 200, requeued.text
    assert requeued.json()["state"] == "IN_PROGRESS"
    assert requeued.json()["events"][-1]["kind"] == "REQUEUED"
    assert requeued.json()["events"][-1]["description"] == "fixed in CRM"
    # Requeue of a transaction that is not stopped is a 409.
    assert_error(client.post(f"/transactions/{uuid}/requeue"), 409, "INVALID_TRANSITION")


def test_process_is_409_while_a_retry_is_not_due_or_a_stage_runs(
    make_client, tracker, clock
):
    tracker.register(orders)
    client = make_client(runner=fake_runner(tracker, outcomes={("ERP", "main"): -2}))
    uuid = client.post(
        "/transactions", json={"process": "ORDERS", "payload": {"n": 1}}
    ).json()["uuid"]
    assert client.post(f"/transactions/{uuid}/process").json()["state"] == "TERMINATED"
    details = assert_error(
        client.post(f"/transactions/{uuid}/process"), 409, "ALREADY_PROCESSED"
    )["error"]["details"]
    assert details["reason"] == "not_due" and details["next_attempt_at"]

    clock.advance(61)  # the retry is due: claimed and started by another worker
    (stage,) = tracker.claim("ORDERS", "ERP", owner="other-worker", uuid=uuid)
    tracker.start_attempt(uuid, "ERP", "main", owner="other-worker", lease_seconds=600)
    details = assert_error(
        client.post(f"/transactions/{uuid}/process"), 409, "ALREADY_PROCESSED"
    )["error"]["details"]
    assert details["reason"] == "running"

    clock.advance(3600)  # that worker died mid-attempt: its lease expired, the claim recovers it
    details = assert_error(
        client.post(f"/transactions/{uuid}/process"), 409, "ALREADY_PROCESSED"
    )["error"]["details"]
    assert details["reason"] == "not_due"  # it ran nothing: the lost attempt's retry waits
    tx = client.get(f"/transactions/{uuid}").json()
    erp = tx["stages"][0]
    assert (erp["state"], erp["attempt"]) == ("TERMINATED", 2)  # the lost attempt counts
    assert tx["events"][-1]["kind"] == "LEASE_EXPIRED"
    clock.advance(61)
    erp = client.post(f"/transactions/{uuid}/process").json()["stages"][0]
    assert (erp["state"], erp["attempt"]) == ("EXHAUSTED", 3)  # max_attempts=3
    assert_error(client.post(f"/transactions/{uuid}/process"), 409, "ALREADY_PROCESSED")


def test_concurrent_process_calls_never_run_an_attempt_twice(make_client, tracker):
    """8 calls at once: each 200 ran at least one stage; a call that ran nothing because
    another one held the stages is a 409 saying so (running, or final once it is done)."""
    client = make_client(runner=fake_runner(tracker, delay=0.05))
    uuid = submit(client).json()["uuid"]
    barrier = threading.Barrier(8)

    def call(_: int):
        barrier.wait()
        return client.post(f"/transactions/{uuid}/process")

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(8)))
    ok = [r for r in responses if r.status_code == 200]
    assert ok, [r.text for r in responses]
    for r in ok:
        assert r.json()["stages_run"] >= 1, r.text  # a 200 means this call ran something
    for r in responses:
        if r.status_code != 200:
            details = assert_error(r, 409, "ALREADY_PROCESSED")["error"]["details"]
            assert details["reason"] in ("running", "final"), details
    assert sum(r.json()["stages_run"] for r in ok) == 4  # every stage ran exactly once
    tx = tracker.get_transaction(uuid)
    assert tx.state == TxState.COMPLETED
    assert [s.attempt for s in tx.stages] == [1, 1, 1, 1]
    assert sum(e.kind == EventKind.ATTEMPT for e in tx.events) == 4


def test_process_call_that_runs_nothing_is_409(make_client, tracker, api_logs):
    """Runnable when checked, but by the time this call's flow claims, another run holds the
    stage (reason running) or has finished the transaction (reason final)."""

    def other_run_holds_it(process: str, uuid: str) -> dict[str, Any]:
        tracker.claim(process, "A", owner="other-run", uuid=uuid)
        return {"stages_run": 0, "flow_run_id": "this-run"}

    def other_run_finished_it(process: str, uuid: str) -> dict[str, Any]:
        fake_runner(tracker)(process, uuid)
        return {"stages_run": 0, "flow_run_id": "this-run"}

    client = make_client(runner=other_run_holds_it)
    uuid = submit(client, "FE-HELD").json()["uuid"]
    body = assert_error(client.post(f"/transactions/{uuid}/process"), 409, "ALREADY_PROCESSED")
    assert body["error"]["details"]["reason"] == "running"

    client = make_client(runner=other_run_finished_it)
    uuid = submit(client, "FE-DONE").json()["uuid"]
    body = assert_error(client.post(f"/transactions/{uuid}/process"), 409, "ALREADY_PROCESSED")
    assert body["error"]["details"]["reason"] == "final"
    assert body["error"]["details"]["state"] == "COMPLETED"
    # The transition belongs to the run that made it, not to this call.
    assert not [r for r in api_logs if r.getMessage() == "transition" and r.uuid == uuid
                and r.action == "process"]


def test_process_runner_failure_is_500_without_internals(make_client, tracker):
    def broken(process: str, uuid: str) -> None:
        raise RuntimeError("secret connection string postgres://u:p@db")

    client = make_client(runner=broken)
    uuid = submit(client).json()["uuid"]
    r = client.post(f"/transactions/{uuid}/process")
    assert_error(r, 500, "PROCESS_RUN_FAILED")
    assert "secret" not in r.text


def test_process_in_deployment_mode_returns_202_with_the_flow_run(make_client, tracker):
    handed: list[tuple[str, str]] = []

    def deployer(process: str, uuid: str) -> tuple[str, str]:
        handed.append((process, uuid))
        return "resume/cancellation", "0b6a5f0e-0000-4000-8000-000000000001"

    client = make_client(deployer=deployer, api_process_mode="deployment")
    uuid = submit(client).json()["uuid"]
    r = client.post(f"/transactions/{uuid}/process")
    assert r.status_code == 202, r.text
    assert r.json() == {
        "uuid": uuid, "process": P, "state": "PENDING", "deployment": "resume/cancellation",
        "flow_run_id": "0b6a5f0e-0000-4000-8000-000000000001",
    }
    assert handed == [(P, uuid)]
    client.post(f"/transactions/{uuid}/cancel")
    assert_error(client.post(f"/transactions/{uuid}/process"), 409, "ALREADY_PROCESSED")
    assert len(handed) == 1


def test_deployment_mode_when_prefect_fails_is_503(make_client, tracker):
    def deployer(process: str, uuid: str) -> tuple[str, str]:
        raise ConnectionError("Prefect API down")

    client = make_client(deployer=deployer, api_process_mode="deployment")
    uuid = submit(client).json()["uuid"]
    assert_error(client.post(f"/transactions/{uuid}/process"), 503, "PREFECT_UNAVAILABLE")


def test_default_deployment_runner_calls_run_deployment(monkeypatch):
    seen: dict[str, Any] = {}

    class FlowRun:
        id = uuid_lib.UUID("0b6a5f0e-0000-4000-8000-000000000002")

    def fake_run_deployment(**kwargs: Any) -> FlowRun:
        seen.update(kwargs)
        return FlowRun()

    monkeypatch.setattr("prefect.deployments.run_deployment", fake_run_deployment)
    name, flow_run_id = run_on_deployment("ORDER_CANCELLATION", "u-1")
    assert name == "resume/order-cancellation"
    assert flow_run_id == "0b6a5f0e-0000-4000-8000-000000000002"
    assert seen == {
        "name": "resume/order-cancellation",
        "parameters": {"process": "ORDER_CANCELLATION", "uuid": "u-1"},
        "timeout": 0,
    }


# -- operator actions -------------------------------------------------------------------------


def test_cancel_records_reason_and_actor_and_is_409_when_final(client, api_logs):
    uuid = submit(client).json()["uuid"]
    r = client.post(f"/transactions/{uuid}/cancel", json={"reason": "customer called",
                                                          "actor": "alice"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "CANCELLED"
    assert {s["state"] for s in body["stages"]} == {"CANCELLED"}
    event = body["events"][-1]
    assert (event["kind"], event["description"], event["actor"]) == (
        "CANCELLED", "customer called", "alice"
    )
    assert any(
        rec.getMessage() == "transition" and rec.uuid == uuid
        and (rec.old_state, rec.new_state) == ("PENDING", "CANCELLED")
        for rec in api_logs
    )
    assert_error(client.post(f"/transactions/{uuid}/cancel"), 409, "INVALID_TRANSITION")


@pytest.mark.parametrize(
    "body", [{"reason": ""}, {"reason": "   "}, {"actor": "a" * 101}, {"oops": 1}, [1]]
)
def test_cancel_with_invalid_body_is_422(client, body):
    uuid = submit(client).json()["uuid"]
    assert_error(client.post(f"/transactions/{uuid}/cancel", json=body), 422, "VALIDATION_ERROR")
    assert client.get(f"/transactions/{uuid}").json()["state"] == "PENDING"


# -- reports ----------------------------------------------------------------------------------


@pytest.fixture
def reported(make_client, tracker, clock):
    """Four CANCELLATION transactions (completed, rejected, pending x2) and one ORDERS."""
    tracker.register(orders)
    client = make_client(
        runner=fake_runner(tracker, outcomes={("A", "validate"): 3, ("ERP", "main"): -9})
    )
    ok = submit(client, "R-ok").json()["uuid"]
    bad = submit(client, "R-bad").json()["uuid"]
    submit(client, "R-1")
    submit(client, "R-2")
    order = client.post("/transactions", json={"process": "ORDERS", "payload": {"n": 1}})
    fine = fake_runner(tracker)
    fine(P, ok)
    client.post(f"/transactions/{bad}/process")
    client.post(f"/transactions/{order.json()['uuid']}/process")
    return client


def test_summary_counts_by_state_and_by_process(reported):
    r = reported.get("/reports/summary")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == 5
    assert {k: v for k, v in body["by_state"].items() if v} == {
        "PENDING": 2, "COMPLETED": 1, "REJECTED": 1, "TERMINATED": 1
    }
    by_process = {p["process"]: p for p in body["by_process"]}
    assert by_process[P]["total"] == 4 and by_process["ORDERS"]["total"] == 1
    assert by_process["ORDERS"]["by_state"]["TERMINATED"] == 1

    only = reported.get("/reports/summary", params={"process": P, "state": "PENDING"}).json()
    assert only["total"] == 2 and [p["process"] for p in only["by_process"]] == [P]


def test_summary_window(reported, clock):
    now = clock.now
    before = {"from": (now - timedelta(days=2)).isoformat(),
              "to": (now - timedelta(days=1)).isoformat()}
    assert reported.get("/reports/summary", params=before).json()["total"] == 0
    around = {"from": (now - timedelta(seconds=1)).isoformat(),
              "to": (now + timedelta(seconds=1)).isoformat()}
    body = reported.get("/reports/summary", params=around).json()
    assert body["total"] == 5
    assert body["window"]["start"].startswith((now - timedelta(seconds=1)).strftime("%Y-%m-%d"))


def test_summary_as_csv(reported):
    for r in (
        reported.get("/reports/summary", params={"format": "csv"}),
        reported.get("/reports/summary", headers={"Accept": "text/csv"}),
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/csv")
        lines = r.text.strip().splitlines()
        assert lines[0] == "process,state,count"
        assert f"{P},PENDING,2" in lines and "ORDERS,TERMINATED,1" in lines


def test_stage_report(reported):
    body = reported.get("/reports/stages", params={"process": P}).json()
    by_stage = {(r["platform"], r["stage"], r["state"]): r["count"] for r in body["by_stage"]}
    assert by_stage[("A", "validate", "COMPLETED")] == 1
    assert by_stage[("A", "validate", "REJECTED")] == 1
    assert by_stage[("A", "validate", "PENDING")] == 2
    assert by_stage[("B", "confirm", "CANCELLED")] == 1
    by_platform = {(r["platform"], r["state"]): r["count"] for r in body["by_platform"]}
    assert by_platform[("B", "CANCELLED")] == 2 and by_platform[("B", "PENDING")] == 4
    csv_text = reported.get("/reports/stages", params={"format": "csv"}).text
    assert csv_text.splitlines()[0] == "platform,stage,state,count"


def test_error_report(reported):
    body = reported.get("/reports/errors").json()
    errors = {(e["process"], e["platform"], e["error_code"]): e for e in body["errors"]}
    assert errors[(P, "A", 3)]["outcome"] == "BUSINESS_ERROR"
    assert errors[(P, "A", 3)]["count"] == 1
    assert errors[("ORDERS", "ERP", -9)]["outcome"] == "SYSTEM_ERROR"
    assert reported.get("/reports/errors", params={"limit": 1}).json()["errors"].__len__() == 1
    csv_lines = reported.get("/reports/errors", params={"format": "csv"}).text.splitlines()
    assert csv_lines[0].startswith("process,platform,outcome,error_code,count")
    assert len(csv_lines) == 3


@pytest.mark.parametrize("path", ["/reports/summary", "/reports/stages", "/reports/errors"])
@pytest.mark.parametrize(
    "params",
    [
        {"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
        {"to": "soon"},
        {"to": "0001-01-03T00:00:00Z"},  # 7 days before is before year 1
        {"from": "9999-12-31T23:00:00-05:00"},  # after year 9999 in UTC
        {"process": "NOPE"},
        {"format": "xml"},
    ],
)
def test_reports_reject_invalid_filters(client, path, params):
    assert_error(client.get(path, params=params), 422, "VALIDATION_ERROR")


def test_naive_datetimes_are_utc_in_the_api_as_in_the_cli(client, tracker, clock):
    """One window rule for every front end (the API refused naive values, the CLI took them
    as UTC; the API's default window was 30 days, the CLI's 7)."""
    _seed(client, tracker, clock, 2)
    aware = client.get("/reports/summary", params={"from": "2026-01-01T00:00:00Z"}).json()
    naive = client.get("/reports/summary", params={"from": "2026-01-01T00:00:00"}).json()
    assert naive == aware and naive["window"]["start"].startswith("2026-01-01T00:00:00")
    listed = client.get("/transactions", params={"created_from": "2026-01-05T09:00:00"})
    assert listed.status_code == 200
    default = client.get("/reports/summary", params={"to": "2026-01-31T00:00:00Z"}).json()
    assert default["window"]["start"].startswith("2026-01-24T00:00:00")


def test_summary_rejects_unknown_state(client):
    assert_error(client.get("/reports/summary", params={"state": "DONE"}), 422,
                 "VALIDATION_ERROR")


# -- envelope, request id, logs --------------------------------------------------------------


def test_unknown_route_and_wrong_method_have_the_envelope(client):
    assert_error(client.get("/nothing/here"), 404, "NOT_FOUND")
    assert_error(client.delete("/transactions"), 405, "METHOD_NOT_ALLOWED")


def test_unexpected_exception_is_500_envelope_with_request_id(client, monkeypatch, api_logs):

    def explode(uuid: str) -> None:
        raise RuntimeError("internal detail /etc/secret")

    monkeypatch.setattr(client.app.state.service, "get", explode)
    r = client.get(f"/transactions/{uuid_lib.uuid4()}", headers={"X-Request-ID": "boom-1"})
    body = assert_error(r, 500, "INTERNAL_ERROR")
    assert body["request_id"] == "boom-1" and r.headers["x-request-id"] == "boom-1"
    assert "secret" not in r.text
    logged = [rec for rec in api_logs if rec.request_id == "boom-1"]
    assert any(rec.exc_info for rec in logged)  # the traceback is in the log
    assert any(rec.getMessage() == "request" and rec.status == 500 for rec in logged)


def test_request_id_is_echoed_when_safe_and_replaced_otherwise(client):
    r = client.get("/processes", headers={"X-Request-ID": "abc-123_x.y"})
    assert r.headers["x-request-id"] == "abc-123_x.y"
    for unsafe in ("a" * 129, "with space", "new\\nline", "é"):
        r = client.get("/processes", headers={"X-Request-ID": unsafe.encode("utf-8")})
        assert r.headers["x-request-id"] != unsafe
        uuid_lib.UUID(r.headers["x-request-id"], version=4)
    # On errors too, in the header and the body.
    r = client.get("/nope", headers={"X-Request-ID": "err-1"})
    assert r.headers["x-request-id"] == "err-1" and r.json()["request_id"] == "err-1"


def test_every_log_line_of_a_request_carries_its_id(client, api_logs):
    submit(client)
    r = client.post("/transactions", json={"process": P, "payload": {"request_id": "L"}},
                    headers={"X-Request-ID": "req-42"})
    assert r.status_code == 201
    mine = [rec for rec in api_logs if getattr(rec, "request_id", None) == "req-42"]
    assert {rec.getMessage() for rec in mine} == {"transition", "request"}
    access = next(rec for rec in mine if rec.getMessage() == "request")
    assert (access.method, access.path, access.status) == ("POST", "/transactions", 201)
    assert access.duration_ms >= 0
    text = TextFormatter().format(access)
    assert "request_id=req-42 request method=POST path=/transactions status=201" in text
    line = json.loads(JsonFormatter().format(access))
    assert line["request_id"] == "req-42" and line["status"] == 201
    assert line["message"] == "request" and "duration_ms" in line and "ts" in line


def test_json_logs_setting_switches_the_format(make_client):
    make_client(log_json=True)
    from tracking.api import logs

    assert logs._listener is not None
    assert all(isinstance(h.formatter, JsonFormatter) for h in logs._listener.handlers)
    make_client(log_json=False)
    assert all(isinstance(h.formatter, TextFormatter) for h in logs._listener.handlers)


# -- auth -------------------------------------------------------------------------------------


def test_writes_need_the_api_key_when_one_is_set(make_client, tracker):
    client = make_client(api_key="s3cret")
    body = {"process": P, "payload": {"request_id": "K"}}
    assert_error(client.post("/transactions", json=body), 401, "UNAUTHORIZED")
    assert_error(
        client.post("/transactions", json=body, headers={"X-API-Key": "wrong"}),
        401, "UNAUTHORIZED",
    )
    assert_error(
        client.post("/transactions", json=body, headers={"X-API-Key": "s3crét".encode()}),
        401, "UNAUTHORIZED",
    )
    assert tx_count(tracker) == 0
    ok = client.post("/transactions", json=body, headers={"X-API-Key": "s3cret"})
    assert ok.status_code == 201
    uuid = ok.json()["uuid"]
    assert_error(client.post(f"/transactions/{uuid}/cancel"), 401, "UNAUTHORIZED")
    assert client.get(f"/transactions/{uuid}").status_code == 200  # reads stay open
    assert client.get("/reports/summary").status_code == 200


def test_reads_need_the_key_when_configured(make_client):
    client = make_client(api_key="s3cret", api_key_for_reads=True)
    assert_error(client.get("/transactions"), 401, "UNAUTHORIZED")
    assert_error(client.get("/reports/summary"), 401, "UNAUTHORIZED")
    assert client.get("/transactions", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200  # probes and docs stay open
    assert client.get("/openapi.json").status_code == 200


def test_openapi_marks_the_operations_that_need_the_key(make_client):
    spec = make_client(api_key="s3cret").get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"
    assert spec["paths"]["/transactions"]["post"]["security"] == [{"ApiKey": []}]
    assert "security" not in spec["paths"]["/transactions"]["get"]
    assert "security" not in spec["paths"]["/health"]["get"]


def _secured(spec: dict[str, Any]) -> dict[str, bool]:
    """``"METHOD path" -> whether the operation declares the ApiKey scheme``."""
    return {
        f"{method.upper()} {path}": operation.get("security") == [{"ApiKey": []}]
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
    }


def test_openapi_declares_the_api_key_header_scheme_on_the_writes(make_client):
    """The scheme is FastAPI's APIKeyHeader: on every write; on reads only when they need it."""
    spec = make_client(api_key="s3cret").get("/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["ApiKey"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "X-API-Key")
    secured = _secured(spec)
    assert len(secured) == 11
    assert {op for op, needs in secured.items() if needs} == {
        "POST /transactions", "POST /transactions/{uuid}/process",
        "POST /transactions/{uuid}/cancel", "POST /transactions/{uuid}/requeue",
    }

    spec = make_client(api_key="s3cret", api_key_for_reads=True).get("/openapi.json").json()
    assert {op for op, needs in _secured(spec).items() if not needs} == {"GET /health"}

    spec = make_client().get("/openapi.json").json()  # no key: nothing to declare
    assert "securitySchemes" not in spec.get("components", {})
    assert not any(_secured(spec).values())


def test_the_key_is_checked_before_the_body_is_validated(make_client, tracker):
    client = make_client(api_key="s3cret")
    missing = assert_error(client.post("/transactions", json={"payload": 1}), 401, "UNAUTHORIZED")
    assert missing["error"]["message"] == "X-API-Key header required"
    wrong = client.post("/transactions", json={"process": "NOPE", "payload": {}},
                        headers={"X-API-Key": "s3cre"})
    assert assert_error(wrong, 401, "UNAUTHORIZED")["error"]["message"] == (
        "missing or wrong X-API-Key header"
    )
    assert wrong.headers["www-authenticate"] == "ApiKey"
    assert_error(client.post("/transactions/nope/requeue", json={"reason": 1}), 401,
                 "UNAUTHORIZED")
    assert tx_count(tracker) == 0


def test_settings_read_at_startup_decide_which_routes_need_the_key(
    tracker, db_url, monkeypatch
):
    """create_app() without settings (uvicorn tracking.api:app) wires the key at startup,
    and again at a later startup whose settings change it."""
    monkeypatch.setenv("TRACKING_DATABASE_URL", db_url)
    monkeypatch.setenv("TRACKING_API_KEY", "s3cret")
    monkeypatch.setenv("TRACKING_API_KEY_FOR_READS", "false")
    app = create_app(tracker=tracker, process_runner=fake_runner(tracker))
    body = {"process": P, "payload": {"request_id": "AT-START"}}
    with TestClient(app, raise_server_exceptions=False) as client:
        assert_error(client.post("/transactions", json=body), 401, "UNAUTHORIZED")
        assert client.get("/transactions").status_code == 200
        assert not _secured(client.get("/openapi.json").json())["GET /transactions"]
    monkeypatch.setenv("TRACKING_API_KEY_FOR_READS", "true")
    with TestClient(app, raise_server_exceptions=False) as client:
        assert_error(client.get("/transactions"), 401, "UNAUTHORIZED")
        assert client.get("/health").status_code == 200
        assert _secured(client.get("/openapi.json").json())["GET /transactions"]
        ok = client.post("/transactions", json=body, headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 201
    assert tx_count(tracker) == 1


def test_openapi_lists_every_endpoint_and_the_process_codes(client):
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/health", "/processes", "/transactions", "/transactions/{uuid}",
        "/transactions/{uuid}/process", "/transactions/{uuid}/cancel",
        "/transactions/{uuid}/requeue", "/reports/summary", "/reports/stages",
        "/reports/errors",
    }
    process = spec["components"]["schemas"]["TransactionIn"]["properties"]["process"]
    assert process["examples"] == [P]


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


# -- report coalescing ----------------------------------------------------------------------


def test_coalescer_shares_runs_but_never_serves_a_result_older_than_the_request():
    import asyncio

    from tracking.api.coalesce import Coalescer

    coalescer = Coalescer()
    runs: list[int] = []
    release = threading.Event()

    def query() -> int:
        runs.append(len(runs) + 1)
        number = len(runs)
        if number == 1:
            release.wait(5)  # the first run is slow: the others arrive while it runs
        return number

    async def scenario() -> list[int]:
        first = asyncio.create_task(coalescer.run("k", query))
        await asyncio.sleep(0.05)  # the first run has started
        late = [asyncio.create_task(coalescer.run("k", query)) for _ in range(5)]
        other = asyncio.create_task(coalescer.run("other", lambda: 99))
        await asyncio.sleep(0.05)
        release.set()
        return [await first, *[await t for t in late], await other]

    results = asyncio.run(scenario())
    # The late callers arrived while run 1 was going: they share run 2, started after it.
    assert results == [1, 2, 2, 2, 2, 2, 99]
    assert runs == [1, 2]


def test_coalescer_hands_errors_to_every_waiter():
    import asyncio

    from tracking.api.coalesce import Coalescer

    coalescer = Coalescer()

    def fail() -> None:
        time.sleep(0.05)
        raise ValueError("bad window")

    async def scenario() -> list[BaseException | None]:
        tasks = [asyncio.create_task(coalescer.run("k", fail)) for _ in range(3)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    assert all(isinstance(e, ValueError) for e in asyncio.run(scenario()))
    assert asyncio.run(coalescer.run("k", lambda: "fresh")) == "fresh"  # the slot was freed


def test_concurrent_summaries_are_all_correct(client, tracker):
    for i in range(5):
        submit(client, f"C-{i}")
    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda _: client.get("/reports/summary").json(), range(16)))
    assert {b["total"] for b in bodies} == {5}
    submit(client, "C-new")  # committed before the next request: it must be counted
    assert client.get("/reports/summary").json()["total"] == 6


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
    monkeypatch.setattr("prefect.settings.get_current_settings", lambda: _PrefectSettings(None))
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
