"""Business outcomes as Prefect events: what they look like, and how a batch is sent.

Each transaction that ends (COMPLETED), is REJECTED (a business error), EXHAUSTED (its
attempts used up) or CANCELLED emits one Prefect event, so a Prefect automation can react to
an outcome (notify on exhausted items, run a clean-up deployment...):

=====================================  ==========================================
event                                  when
=====================================  ==========================================
``tracking.transaction.completed``     the last stage completed
``tracking.transaction.rejected``      a stage returned a business error
``tracking.transaction.exhausted``     a stage used up its attempts
``tracking.transaction.cancelled``     an operator cancelled it
``tracking.transaction.overdue``       it is still waiting past its due time (the
                                       earlier of its deadline and its process's
                                       SLA): once per due time
=====================================  ==========================================

The resource is the transaction: ``prefect.resource.id`` = ``tracking.transaction.<uuid>``,
``prefect.resource.name`` = its business key, and the labels ``tracking.process``,
``tracking.platform`` and ``tracking.stage`` (the stage that decided it, or for ``overdue``
the stage it waits at; absent for an operator's cancel), ``tracking.business-key``,
``tracking.uuid`` and ``tracking.state`` (the final state, or ``OVERDUE``).
Related resources: the process (role ``tracking-process``), and the flow run and task run
that recorded the outcome when known (roles ``flow-run``, ``task-run``: the Prefect UI
links them). The payload holds the attempt, error code, description (at most
``MAX_DESCRIPTION`` characters), audit event id and actor; for ``overdue`` the due time.

The events are read from the audit trail by ``tracking.store.outbox`` and sent in batches
with one ``POST /api/events`` each (no per-item API call, nothing on the hot path): at the
end of every resume flow run, by ``tracking events send``, or ``App.send_events``. An
event's ``id`` is ``uuid5(EVENT_NAMESPACE, <outcome key>)``: the same outcome sent twice
(after a crash between sending and moving the cursor) has the same id, and the Prefect
server stores it once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine

from tracking.models import utcnow
from tracking.store import outbox
from tracking.store.outbox import Delivery, OutcomeEvent

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events import Event

EVENT_PREFIX = "tracking.transaction"
COMPLETED_EVENT = f"{EVENT_PREFIX}.completed"
REJECTED_EVENT = f"{EVENT_PREFIX}.rejected"
EXHAUSTED_EVENT = f"{EVENT_PREFIX}.exhausted"
CANCELLED_EVENT = f"{EVENT_PREFIX}.cancelled"
#: A transaction waiting past its due time (``v_overdue``), sent once per due time.
OVERDUE_EVENT = f"{EVENT_PREFIX}.overdue"
EVENT_NAMES = {
    "COMPLETED": COMPLETED_EVENT,
    "REJECTED": REJECTED_EVENT,
    "EXHAUSTED": EXHAUSTED_EVENT,
    "CANCELLED": CANCELLED_EVENT,
    outbox.OVERDUE: OVERDUE_EVENT,
}
#: Event ids are uuid5 of this namespace and the outcome's key (never change it: the ids
#: of outcomes sent again would change with it).
EVENT_NAMESPACE = uuid.UUID("5d0f4f2e-8a1c-5b7e-9c33-7a1e0c6b2f10")
MAX_DESCRIPTION = 2000
PROCESS_ROLE = "tracking-process"


def event_name(outcome: OutcomeEvent) -> str:
    try:
        return EVENT_NAMES[outcome.state]
    except KeyError:
        raise ValueError(f"no event for state {outcome.state!r}") from None


def event_id(outcome: OutcomeEvent) -> uuid.UUID:
    """The event's id: the same for the same outcome, however often it is sent."""
    return uuid.uuid5(EVENT_NAMESPACE, outcome.key)


def resource(outcome: OutcomeEvent) -> dict[str, str]:
    """The event's resource: the transaction, labelled with what it is and what decided."""
    labels = {
        "prefect.resource.id": f"tracking.transaction.{outcome.uuid}",
        "prefect.resource.name": outcome.business_key,
        "tracking.process": outcome.process_code,
        "tracking.platform": outcome.platform,
        "tracking.stage": outcome.stage,
        "tracking.business-key": outcome.business_key,
        "tracking.uuid": outcome.uuid,
        "tracking.state": outcome.state,
    }
    return {k: v for k, v in labels.items() if v is not None}


def related(outcome: OutcomeEvent) -> list[dict[str, str]]:
    """The process, and the flow run and task run that recorded the outcome (when known)."""
    resources = [{
        "prefect.resource.id": f"tracking.process.{outcome.process_code}",
        "prefect.resource.role": PROCESS_ROLE,
        "prefect.resource.name": outcome.process_code,
    }]
    if outcome.flow_run_id:
        resources.append({"prefect.resource.id": f"prefect.flow-run.{outcome.flow_run_id}",
                          "prefect.resource.role": "flow-run"})
    if outcome.task_run_id:
        resources.append({"prefect.resource.id": f"prefect.task-run.{outcome.task_run_id}",
                          "prefect.resource.role": "task-run"})
    return resources


def payload(outcome: OutcomeEvent) -> dict[str, Any]:
    description = outcome.description
    if description is not None and len(description) > MAX_DESCRIPTION:
        description = description[: MAX_DESCRIPTION - 1] + "…"
    return {
        "state": outcome.state,
        "audit_event_id": outcome.audit_id,
        "kind": outcome.kind,
        "attempt": outcome.attempt,
        "outcome": outcome.outcome,
        "error_code": outcome.error_code,
        "description": description,
        "actor": outcome.actor,
        "due_at": None if outcome.due_at is None else outcome.due_at.isoformat(),
    }


def build_event(outcome: OutcomeEvent) -> Event:
    """The Prefect event of one outcome (``occurred``: when it was recorded)."""
    from prefect.events import Event

    return Event(
        id=event_id(outcome),
        occurred=outcome.occurred,
        event=event_name(outcome),
        resource=resource(outcome),
        related=related(outcome),
        payload=payload(outcome),
    )


def post_events(client: SyncPrefectClient, events: Sequence[Event]) -> None:
    """Send ``events`` with one ``POST /api/events``; raises unless the server took them."""
    if events:
        client.request("POST", "/events", json=[e.model_dump(mode="json") for e in events])


class PrefectSender:
    """An ``outbox.Sender`` posting each batch of outcomes to the Prefect API: to ``client``,
    or to the server of ``PREFECT_API_URL`` through a client opened at the first batch (none
    is opened when there is nothing to send) and closed by ``close``."""

    def __init__(self, client: SyncPrefectClient | None = None) -> None:
        self.client = client
        self._own: Any = None

    def __call__(self, outcomes: Sequence[OutcomeEvent]) -> None:
        events = [build_event(o) for o in outcomes]
        if not events:
            return
        if self.client is None:
            from prefect.client.orchestration import get_client

            self._own = get_client(sync_client=True)
            self.client = self._own.__enter__()
        post_events(self.client, events)

    def close(self) -> None:
        if self._own is not None:
            own, self._own, self.client = self._own, None, None
            own.__exit__(None, None, None)

    def __enter__(self) -> PrefectSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send_outcome_events(
    engine: Engine,
    *,
    batch_size: int = outbox.DEFAULT_BATCH,
    max_events: int | None = None,
    wait_seconds: float = 0.0,
    client: SyncPrefectClient | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> Delivery:
    """Send the Prefect events of every outcome not sent yet (``outbox.deliver``) to the
    server of ``PREFECT_API_URL`` (or ``client``). ``outbox.DeliveryFailed`` when sending
    failed: what was sent stays sent, the rest is sent by the next call."""
    with PrefectSender(client) as sender:
        return outbox.deliver(engine, sender, batch_size=batch_size, max_events=max_events,
                              wait_seconds=wait_seconds, clock=clock)
