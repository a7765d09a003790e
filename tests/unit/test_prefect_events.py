"""The Prefect events of business outcomes: names, resource labels, related resources,
payload and deterministic ids (no database, no server)."""

from __future__ import annotations

import uuid as uuid_lib
from datetime import UTC, datetime

import pytest

from tracking import prefect_events as pe
from tracking.store.outbox import OVERDUE, OutcomeEvent

UUID = "3f0c6a52-8e1b-4d6a-9a41-0c2b7e5d1f00"
WHEN = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)


def outcome(state: str = "EXHAUSTED", **changes) -> OutcomeEvent:
    values = dict(
        key=f"tx_event:{UUID}:42", audit_id=42, uuid=UUID, process_code="ORDER_CANCELLATION",
        business_key="FE-1001", state=state, occurred=WHEN, platform="SAP",
        stage="cancel_order", kind="ATTEMPT", attempt=4, outcome="SYSTEM_ERROR", error_code=-5,
        description="SAP RFC timeout", actor="run-1", flow_run_id=str(uuid_lib.UUID(int=1)),
        task_run_id=str(uuid_lib.UUID(int=2)),
    )
    return OutcomeEvent(**{**values, **changes})


@pytest.mark.parametrize(("state", "name"), [
    ("COMPLETED", "tracking.transaction.completed"),
    ("REJECTED", "tracking.transaction.rejected"),
    ("EXHAUSTED", "tracking.transaction.exhausted"),
    ("CANCELLED", "tracking.transaction.cancelled"),
    (OVERDUE, "tracking.transaction.overdue"),
])
def test_each_outcome_has_its_event_name(state, name):
    assert pe.event_name(outcome(state)) == name == pe.build_event(outcome(state)).event


def test_a_state_without_an_event_is_refused():
    with pytest.raises(ValueError, match="no event for state 'PENDING'"):
        pe.event_name(outcome("PENDING"))


def test_the_resource_is_the_transaction_with_its_labels():
    event = pe.build_event(outcome())
    assert dict(event.resource) == {
        "prefect.resource.id": f"tracking.transaction.{UUID}",
        "prefect.resource.name": "FE-1001",
        "tracking.process": "ORDER_CANCELLATION",
        "tracking.platform": "SAP",
        "tracking.stage": "cancel_order",
        "tracking.business-key": "FE-1001",
        "tracking.uuid": UUID,
        "tracking.state": "EXHAUSTED",
    }
    assert event.resource.id == f"tracking.transaction.{UUID}"


def test_an_operator_cancel_has_no_platform_label():
    labels = pe.resource(outcome("CANCELLED", platform=None, stage=None, kind="CANCELLED"))
    assert "tracking.platform" not in labels and "tracking.stage" not in labels
    assert labels["tracking.state"] == "CANCELLED"


def test_related_resources_are_the_process_and_the_runs():
    event = pe.build_event(outcome())
    assert [(r.role, r.id) for r in event.related] == [
        ("tracking-process", "tracking.process.ORDER_CANCELLATION"),
        ("flow-run", f"prefect.flow-run.{uuid_lib.UUID(int=1)}"),
        ("task-run", f"prefect.task-run.{uuid_lib.UUID(int=2)}"),
    ]
    bare = pe.build_event(outcome(flow_run_id=None, task_run_id=None))
    assert [r.role for r in bare.related] == ["tracking-process"]


def test_ids_are_derived_from_the_outcome_key_and_nothing_else():
    first = pe.build_event(outcome())
    again = pe.build_event(outcome(description="changed", occurred=datetime.now(UTC)))
    assert first.id == again.id == uuid_lib.uuid5(pe.EVENT_NAMESPACE, f"tx_event:{UUID}:42")
    other = pe.build_event(outcome(key=f"tx_event:{UUID}:43", audit_id=43))
    other_tx = pe.build_event(outcome(key="tx_event:another:42"))
    assert len({first.id, other.id, other_tx.id}) == 3
    assert first.id.version == 5


def test_payload_and_occurred():
    event = pe.build_event(outcome())
    assert event.occurred == WHEN
    assert event.payload == {
        "state": "EXHAUSTED", "audit_event_id": 42, "kind": "ATTEMPT", "attempt": 4,
        "outcome": "SYSTEM_ERROR", "error_code": -5, "description": "SAP RFC timeout",
        "actor": "run-1", "due_at": None,
    }
    long = pe.build_event(outcome(description="x" * 10_000)).payload["description"]
    assert len(long) == pe.MAX_DESCRIPTION and long.endswith("…")


def test_an_overdue_outcome_carries_its_due_time():
    due = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    event = pe.build_event(outcome(OVERDUE, key=f"overdue:{UUID}:{due.isoformat()}",
                                   audit_id=None, occurred=due, due_at=due, kind=None))
    assert event.payload["due_at"] == "2026-01-05T12:00:00+00:00"
    assert event.resource["tracking.state"] == "OVERDUE" and event.occurred == due


def test_the_events_are_valid_for_the_prefect_server():
    from prefect.server.events.schemas.events import Event as ServerEvent

    for state in pe.EVENT_NAMES:
        sent = pe.build_event(outcome(state)).model_dump(mode="json")
        received = ServerEvent.model_validate(sent)
        assert received.id == pe.event_id(outcome(state))
        assert received.resource["tracking.business-key"] == "FE-1001"


def test_posting_a_batch_is_one_request():
    class Client:
        def __init__(self):
            self.calls = []

        def request(self, method, path, **kwargs):
            self.calls.append((method, path, kwargs["json"]))

    client = Client()
    sender = pe.PrefectSender(client)  # type: ignore[arg-type]
    sender([outcome(), outcome("COMPLETED", key="tx_event:x:1")])
    sender([])
    ((method, path, body),) = client.calls
    assert (method, path, len(body)) == ("POST", "/events", 2)
    assert body[0]["event"] == "tracking.transaction.exhausted"
    assert body[1]["resource"]["tracking.state"] == "COMPLETED"
