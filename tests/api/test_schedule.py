"""The HTTP API of priority, defer, deadline and SLA: the intake fields, POST
/transactions/{uuid}/defer, GET /reports/overdue and /reports/sla, and the catalog's SLA and
session limits, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import pytest

from tests.api.helpers import P, assert_error
from tests.conftest import cancellation_process
from tracking import Platform, Process, Tracker
from tracking.models import EventKind

SLA = timedelta(hours=4)


@pytest.fixture
def tracker(engine, clock) -> Tracker:
    """CANCELLATION with a 4-hour SLA, kept 90 days, and two sessions at B."""
    base = cancellation_process()
    platforms = [Platform(p.code, order=p.order, stages=p.stages, retry=p.retry,
                          concurrency=2 if p.code == "B" else None) for p in base.platforms]
    process = Process(P, platforms=platforms, dedup=base.dedup, sla=SLA,
                      retention=timedelta(days=90))
    return Tracker(engine, processes=[process], clock=clock)


def submit(client, request_id: str, **schedule):
    return client.post("/transactions", json={"process": P, "payload": {"request_id": request_id},
                                              **schedule})


def test_intake_takes_the_schedule_next_to_the_payload(client, tracker, clock):
    r = submit(client, "FE-1", priority=5, not_before="2026-01-05T09:30:00",  # naive: UTC
               deadline="2026-01-05T11:00:00+01:00")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["payload"] == {"request_id": "FE-1"} and body["priority"] == 5
    assert body["not_before"] == "2026-01-05T09:30:00Z"
    assert body["deadline"] == "2026-01-05T10:00:00Z"
    assert body["due_at"] == "2026-01-05T10:00:00Z"  # earlier than created_at + 4 h
    tx = tracker.get_transaction(body["uuid"])
    assert tx.stages[0].next_attempt_at.isoformat() == "2026-01-05T09:30:00+00:00"
    plain = submit(client, "FE-2").json()
    assert (plain["priority"], plain["not_before"], plain["deadline"]) == (0, None, None)
    assert plain["due_at"] == "2026-01-05T13:00:00Z"  # created 09:00 + the SLA
    again = submit(client, "FE-1", priority=99)
    assert again.status_code == 200 and again.json()["priority"] == 5  # a duplicate


@pytest.mark.parametrize(("schedule", "where"), [
    ({"priority": "high"}, "priority"),
    ({"priority": 1.5}, "priority"),
    ({"priority": True}, "priority"),
    ({"priority": 2**31}, "priority"),
    ({"deadline": "next week"}, "deadline"),
    ({"deadline": 1767603600}, "deadline"),
    ({"not_before": "2026-01-06", "deadline": "2026-01-05"}, "is before not_before"),
])
def test_a_bad_schedule_is_422_naming_it(client, schedule, where):
    body = assert_error(submit(client, "FE-1", **schedule), 422, "VALIDATION_ERROR")
    assert where in body["error"]["message"]


def test_defer(client, tracker, clock):
    uuid = submit(client, "FE-1").json()["uuid"]
    r = client.post(f"/transactions/{uuid}/defer",
                    json={"until": "2026-01-06T08:00Z", "reason": "customer asks", "actor": "bo"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["not_before"] == "2026-01-06T08:00:00Z"
    assert body["stages"][0]["next_attempt_at"] == "2026-01-06T08:00:00Z"
    event = body["events"][-1]
    assert (event["kind"], event["actor"], event["platform"]) == (EventKind.DEFERRED, "bo", "A")
    assert "customer asks" in event["description"]
    default = client.post(f"/transactions/{uuid}/defer", json={"until": "2026-01-07T00:00"})
    assert default.json()["events"][-1]["actor"] == "api"


def test_defer_refusals(make_client, tracker, clock):
    client = make_client()
    uuid = submit(client, "FE-1").json()["uuid"]
    past = assert_error(client.post(f"/transactions/{uuid}/defer",
                                    json={"until": "2026-01-05T08:00Z"}), 422, "VALIDATION_ERROR")
    assert "until must be in the future" in past["error"]["message"]
    assert_error(client.post(f"/transactions/{uuid}/defer", json={}), 422, "VALIDATION_ERROR")
    assert_error(client.post(f"/transactions/{uuid}/defer", json={"until": 5}), 422,
                 "VALIDATION_ERROR")
    tracker.cancel(uuid, reason="gone")
    final = assert_error(client.post(f"/transactions/{uuid}/defer",
                                     json={"until": "2026-02-01T00:00Z"}), 409,
                         "INVALID_TRANSITION")
    assert "only waiting transactions" in final["error"]["message"]
    assert_error(client.post("/transactions/00000000-0000-0000-0000-000000000000/defer",
                             json={"until": "2026-02-01T00:00Z"}), 404, "TRANSACTION_NOT_FOUND")
    keyed = make_client(api_key="s3cret")
    assert_error(keyed.post(f"/transactions/{uuid}/defer", json={"until": "2026-02-01T00:00Z"}),
                 401, "UNAUTHORIZED")


def test_overdue_and_sla_reports(client, tracker, clock):
    late = submit(client, "late", priority=3).json()["uuid"]
    done = submit(client, "done").json()["uuid"]
    tracker.cancel(done, reason="handled")  # within the SLA
    clock.advance(5 * 3600)
    submit(client, "fresh")
    r = client.get("/reports/overdue", params={"process": P})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [i["uuid"] for i in body["items"]] == [late]
    item = body["items"][0]
    assert (item["priority"], item["platform"], item["stage"]) == (3, "A", "validate")
    assert item["overdue_seconds"] == 3600 and item["due_at"] == "2026-01-05T13:00:00Z"
    rows = list(csv.DictReader(io.StringIO(client.get("/reports/overdue?format=csv").text)))
    assert [row["uuid"] for row in rows] == [late]

    sla = client.get("/reports/sla", params={"from": "2026-01-05", "process": P}).json()
    assert sla["by_day"] == [{
        "process": P, "day": "2026-01-05", "sla_seconds": 14400.0, "transactions": 3,
        "finished": 1, "within_sla": 1, "late": 0, "open": 2, "overdue": 1, "attainment": 1.0,
    }]
    assert sla["by_process"][0]["overdue"] == 1 and sla["by_process"][0]["attainment"] == 1.0
    text = client.get("/reports/sla", params={"format": "csv", "from": "2026-01-05"}).text
    assert text.splitlines()[0].split(",")[:3] == ["process", "day", "sla_seconds"]
    assert_error(client.get("/reports/overdue?process=NOPE"), 422, "VALIDATION_ERROR")
    assert_error(client.get("/reports/sla?from=2026-02-01&to=2026-01-01"), 422,
                 "VALIDATION_ERROR")


def test_the_catalog_shows_sla_retention_and_sessions(client):
    (process,) = client.get("/processes").json()["processes"]
    assert process["sla_seconds"] == 4 * 3600 and process["retention_seconds"] == 90 * 86400
    assert [p["concurrency"] for p in process["platforms"]] == [None, 2, None]


def test_a_deferred_transaction_is_not_due_for_process(client, tracker, clock):
    uuid = submit(client, "FE-1").json()["uuid"]
    client.post(f"/transactions/{uuid}/defer", json={"until": "2026-01-06T08:00Z"})
    body = assert_error(client.post(f"/transactions/{uuid}/process"), 409, "ALREADY_PROCESSED")
    assert body["error"]["details"]["reason"] == "not_due"
    assert body["error"]["details"]["next_attempt_at"].startswith("2026-01-06T08:00:00")


def test_the_catalog_table_stores_sla_and_sessions(tracker):
    import sqlalchemy as sa

    with tracker.engine.connect() as conn:
        sla = conn.execute(sa.text(
            "SELECT sla_seconds FROM tx_catalog_process WHERE code = :c"), {"c": P}).scalar_one()
        sessions = dict(conn.execute(sa.text(
            "SELECT code, concurrency FROM tx_catalog_platform WHERE process_code = :c"),
            {"c": P}).all())
    assert sla == 4 * 3600 and sessions == {"A": None, "B": 2, "C": None}
