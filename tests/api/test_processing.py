"""Processing now (inline and on a deployment) and the operator actions."""


from __future__ import annotations

import threading
import uuid as uuid_lib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.api.helpers import (
    P,
    assert_error,
    fake_runner,
    submit,
)
from tests.api_processes import orders
from tracking import TxState
from tracking.api.service import run_on_deployment
from tracking.models import EventKind

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
