"""The report endpoints (one window rule, CSV) and their coalescing."""


from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from tests.api.helpers import (
    P,
    assert_error,
    fake_runner,
    seed,
    submit,
)
from tests.api_processes import orders

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
    seed(client, tracker, clock, 2)
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


def test_reports_name_any_process_in_the_catalog_as_in_the_cli(client, tracker):
    """The API accepted only its own TRACKING_PROCESSES in reports while the CLI accepted
    every process in the database's catalog: one rule now (``Reports.check_process``)."""
    from tracking import Platform, Process, Tracker

    Tracker(tracker.engine, processes=[Process("ELSEWHERE", platforms=[Platform("A", order=1)])])
    response = client.get("/reports/summary", params={"process": "ELSEWHERE"})
    assert response.status_code == 200, response.text
    assert response.json()["total"] == 0
    assert_error(client.get("/reports/summary", params={"process": "NOPE"}), 422,
                 "VALIDATION_ERROR")
