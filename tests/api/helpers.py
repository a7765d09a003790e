"""Helpers of the API tests."""


from __future__ import annotations

import time
import uuid as uuid_lib
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient

from tracking import Tracker
from tracking.models import TxProcess
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


def submit(client: TestClient, request_id: str = "FE-1", **payload: Any):
    return client.post(
        "/transactions",
        json={"process": P, "payload": {"request_id": request_id, **payload}, "source": "crm"},
    )


def tx_count(tracker: Tracker) -> int:
    with tracker.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(TxProcess)).scalar_one()


def seed(client, tracker, clock, n: int, prefix: str = "L") -> list[str]:
    """n transactions, one second apart (newest last)."""
    uuids = []
    for i in range(n):
        uuids.append(submit(client, f"{prefix}-{i}").json()["uuid"])
        clock.advance(1)
    return uuids


class PrefectSettings:
    def __init__(self, url: str | None) -> None:
        self.api = type("Api", (), {"url": url})()


