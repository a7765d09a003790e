"""Business outcomes reach a real Prefect server as events (the test harness's), a resume run
ends by sending them, and the README's automations are accepted by the server and notify
on an exhausted item.

The server writes events asynchronously (its event persister): the tests poll with a
timeout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import sqlalchemy as sa
from prefect.client.orchestration import get_client
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventRelatedFilter,
    EventResourceFilter,
)

import tracking.flows
from tests.conftest import cancellation_process
from tracking import ExecutionResult, Tracker, connect
from tracking.flows import intake_flow, resume_flow
from tracking.prefect_events import send_outcome_events
from tracking.store import outbox

ROOT = Path(__file__).resolve().parents[2]
P = "CANCELLATION"
pytestmark = pytest.mark.usefixtures("prefect_harness")


def read_events(wanted: int, timeout: float = 60, **filters) -> list:
    """The events of ``filters`` (a fresh EventFilter each time: its window ends at its
    creation), once at least ``wanted`` are stored, or what there is at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            page = client.read_events(EventFilter(**filters), limit=50)
        if len(page.events) >= wanted or time.monotonic() > deadline:
            return page.events
        time.sleep(0.5)


def _resource_ids(uuids) -> EventResourceFilter:
    return EventResourceFilter(id=[f"tracking.transaction.{u}" for u in uuids])


@pytest.fixture
def tracker(sqlite_url):
    engine = connect(sqlite_url)
    yield Tracker(engine, processes=[cancellation_process()])  # the real clock
    engine.dispose()


def _outcomes(tracker: Tracker) -> dict[str, str]:
    """One transaction per outcome (and one overdue), by uuid: the event each must emit."""
    made = {}
    new = iter(range(1000))

    def item(**schedule) -> str:
        return tracker.start_or_resume(P, {"request_id": f"E{next(new)}"}, **schedule)[0]

    uuid = item()
    for platform, stage in [("A", None), ("B", "process"), ("B", "confirm"), ("C", None)]:
        tracker.complete_stage(uuid, platform, 0, stage=stage)
    made[uuid] = "tracking.transaction.completed"
    uuid = item()
    tracker.complete_stage(uuid, "A", ExecutionResult(10, "customer blocked"))
    made[uuid] = "tracking.transaction.rejected"
    uuid = item()
    tracker.complete_stage(uuid, "A", ExecutionResult(-1, "CRM down"))  # A: one attempt
    made[uuid] = "tracking.transaction.exhausted"
    uuid = item()
    tracker.cancel(uuid, reason="withdrawn", actor="ops")
    made[uuid] = "tracking.transaction.cancelled"
    made[item(deadline=datetime.now(UTC) - timedelta(seconds=5))] = "tracking.transaction.overdue"
    return made


def test_outcome_events_reach_the_prefect_server_with_their_labels(tracker):
    made = _outcomes(tracker)
    delivery = send_outcome_events(tracker.engine, batch_size=2)
    assert (delivery.sent, delivery.batches, delivery.overdue) == (5, 3, 1)
    events = read_events(5, resource=_resource_ids(made),
                         event=EventNameFilter(prefix=["tracking.transaction."]))
    assert {e.resource.id.removeprefix("tracking.transaction."): e.event for e in events} == made
    for e in events:
        uuid = e.resource["tracking.uuid"]
        assert e.resource.id == f"tracking.transaction.{uuid}"
        assert e.resource["tracking.process"] == P
        assert re.fullmatch(r"E\d+", e.resource["tracking.business-key"])
        assert e.resource.name == e.resource["tracking.business-key"]
        assert e.resource_in_role["tracking-process"].id == f"tracking.process.{P}"
    by_event = {e.event: e for e in events}
    exhausted = by_event["tracking.transaction.exhausted"]
    assert exhausted.resource["tracking.platform"] == "A"
    assert exhausted.resource["tracking.state"] == "EXHAUSTED"
    assert exhausted.payload["description"] == "CRM down"
    assert by_event["tracking.transaction.completed"].resource["tracking.platform"] == "C"
    assert "tracking.platform" not in by_event["tracking.transaction.cancelled"].resource
    assert by_event["tracking.transaction.overdue"].resource["tracking.platform"] == "A"


def test_an_outcome_sent_twice_is_stored_once(tracker):
    made = _outcomes(tracker)
    send_outcome_events(tracker.engine)
    assert outbox.pending(tracker.engine) == []
    first = read_events(5, resource=_resource_ids(made))
    assert len(first) == 5
    with tracker.engine.begin() as conn:  # as if the cursor had not moved after sending
        conn.execute(sa.text("DELETE FROM tx_event_cursor"))
        conn.execute(sa.text("DELETE FROM tx_overdue_sent"))
    assert send_outcome_events(tracker.engine).sent == 5  # sent again, with the same ids
    marker = tracker.start_or_resume(P, {"request_id": "marker"})[0]
    tracker.cancel(marker, reason="marker", actor="test")
    assert send_outcome_events(tracker.engine).sent == 1
    read_events(1, resource=_resource_ids([marker]))  # sent after the repeats: they are in
    stored = read_events(7, timeout=3, resource=_resource_ids([*made, marker]))
    assert len(stored) == 6
    assert {e.id for e in stored if e.resource["tracking.uuid"] != marker} == {
        e.id for e in first}


@pytest.fixture
def sqlite_env(monkeypatch, sqlite_url: str) -> str:
    monkeypatch.setenv("TRACKING_PROCESSES", "tests.flow_processes:processes")
    monkeypatch.setenv("TRACKING_DATABASE_URL", sqlite_url)
    return sqlite_url


def test_a_resume_run_ends_by_sending_its_outcomes(env):
    intake_flow(process="OUTCOMES", items=[{"id": b, "behaviour": b}
                                           for b in ("ok", "business", "system")])
    summary = resume_flow(process="OUTCOMES")
    assert summary["events"] == {"sent": 2, "batches": 1, "overdue": 0, "busy": False}
    flow_run = f"prefect.flow-run.{summary['flow_run_id']}"
    events = read_events(2, related=EventRelatedFilter(id=[flow_run]),
                         event=EventNameFilter(prefix=["tracking.transaction."]))
    assert sorted(e.event for e in events) == ["tracking.transaction.completed",
                                               "tracking.transaction.rejected"]
    for e in events:
        assert e.resource["tracking.process"] == "OUTCOMES"
        assert e.resource_in_role["flow-run"].id == flow_run
        assert e.resource_in_role["task-run"].id.startswith("prefect.task-run.")
    assert {e.resource["tracking.business-key"] for e in events} == {"ok", "business"}
    engine = connect(env)
    assert outbox.cursor_state(engine).pending == 0
    engine.dispose()


def test_a_failure_to_send_does_not_fail_the_run_and_the_next_run_sends(sqlite_env,
                                                                        monkeypatch):
    def down(*args, **kwargs):
        raise ConnectionError("Prefect API unreachable")

    monkeypatch.setattr(tracking.flows, "send_outcome_events", down)
    intake_flow(process="OUTCOMES", items=[{"id": "a", "behaviour": "ok"}])
    summary = resume_flow(process="OUTCOMES")  # returns normally
    assert summary["stages_run"] == 3
    assert summary["events"] == {"sent": 0, "error": "ConnectionError"}
    engine = connect(sqlite_env)
    assert outbox.cursor_state(engine).pending == 1
    monkeypatch.setattr(tracking.flows, "send_outcome_events", send_outcome_events)
    summary = resume_flow(process="OUTCOMES")  # nothing to run; sends what was left
    assert summary["stages_run"] == 0 and summary["events"]["sent"] == 1
    assert outbox.cursor_state(engine).pending == 0
    with engine.connect() as conn:
        uuid = conn.execute(sa.text("SELECT uuid FROM tx_process")).scalar_one()
    engine.dispose()
    (event,) = read_events(1, resource=_resource_ids([uuid]))
    assert event.event == "tracking.transaction.completed"


def test_tracking_events_send_and_status(tracker, capsys):
    from tracking.cli import main

    made = _outcomes(tracker)
    url = str(tracker.engine.url)
    assert main(["--database-url", url, "events", "send", "--dry-run", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["uuid"]: r["event"] for r in listed} == made
    assert main(["--database-url", url, "events", "status", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["pending"] == 4  # and one overdue
    assert main(["--database-url", url, "events", "send", "--batch-size", "3"]) == 0
    assert "sent 5 outcome events in 3 batches (1 overdue)" in capsys.readouterr().out
    assert len(read_events(5, resource=_resource_ids(made))) == 5
    assert main(["--database-url", url, "events", "send", "--batch-size", "0"]) == 2


# -- the README's automation ---------------------------------------------------------------


class Webhook:
    """A local HTTP server that keeps the JSON bodies posted to it."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body or b"null"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/tracking"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 90) -> list:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.5)
        return self.received

    def close(self) -> None:
        self.server.shutdown()


def readme_block(language: str) -> str:
    """The first ``language`` code block of the README's "Prefect events" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Prefect events\n", 1)[1].split("\n## ", 1)[0]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def automations():
    """Deletes the automations and blocks a test made."""
    yield
    with get_client(sync_client=True) as client:
        for automation in client.read_automations():
            if automation.name.startswith("tracking: notify"):
                client.delete_automation(automation.id)


def test_the_readme_automation_notifies_on_an_exhausted_item(tracker, automations):
    webhook = Webhook()
    try:
        code = readme_block("python").replace("https://hooks.example.com/tracking", webhook.url)
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (the README's example)
        automation = namespace["automation"]
        assert automation.id is not None
        with get_client(sync_client=True) as client:
            stored = client.read_automation(automation.id)
        assert stored.trigger.expect == {"tracking.transaction.exhausted"}
        time.sleep(2)  # the server's triggers service learns of the new automation
        done = tracker.start_or_resume(P, {"request_id": "fine"})[0]
        tracker.cancel(done, reason="not a notification", actor="test")
        uuid = tracker.start_or_resume(P, {"request_id": "FE-4711"})[0]
        tracker.complete_stage(uuid, "A", ExecutionResult(-1, "CRM down"))
        assert send_outcome_events(tracker.engine).sent == 2
        (message,) = webhook.wait(1)
        assert "FE-4711" in message["text"] and "CRM down" in message["text"]
        assert "CANCELLATION" in message["text"]
        time.sleep(3)
        assert len(webhook.received) == 1  # the cancelled one did not notify
    finally:
        webhook.close()


def test_the_readme_automation_file_is_accepted_by_prefect_automation_create(
    tracker, automations, tmp_path
):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL

    block_id = CustomWebhookNotificationBlock(
        name="tracking-alerts", url="http://127.0.0.1:9/none",
        json_data={"text": "{{subject}}: {{body}}"},
    ).save("tracking-alerts-yaml", overwrite=True)
    text = readme_block("yaml").replace("<block-document-id>", str(block_id))
    path = tmp_path / "notify-exhausted.yaml"
    path.write_text(text)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    done = subprocess.run([sys.executable, "-m", "prefect", "automation", "create",
                           "--from-file", str(path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    with get_client(sync_client=True) as client:
        (stored,) = client.read_automations_by_name("tracking: notify on exhausted items")
    assert stored.trigger.expect == {"tracking.transaction.exhausted"}
    assert stored.trigger.for_each == {"prefect.resource.id"}
    assert str(stored.actions[0].block_document_id) == str(block_id)
