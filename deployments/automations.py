"""The Prefect automation that marks zombie tracking runs Crashed (created or updated by name).

A flow run killed with ``kill -9`` (or on a machine that died) never reports a final state
and would stay ``Running`` in the Prefect UI forever. Prefect's documented remedy
(https://docs.prefect.io/v3/advanced/detect-zombie-flows): flow runs emit a
``prefect.flow-run.heartbeat`` event every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds, and
a proactive automation sets a run ``Crashed`` when, after a heartbeat, neither another one nor
a final state arrives within ``ZOMBIE_AFTER_SECONDS``. The tracking store needs nothing of
this (the dead run's leases expire into recorded, retried attempts); it is for the UI.

The automation only watches flow runs tagged ``tracking`` (the deployments of prefect.yaml
and ``deployments.serve``), which beat every ``HEARTBEAT_SECONDS``: other flow runs on the
same server keep Prefect's default of 180 s and must not be judged by a 90 s window::

    tracking zombie-automation      # after `prefect deploy`, or: python -m deployments.automations
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Literal
from uuid import UUID

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.schemas.automations import AutomationCore

HEARTBEAT_SECONDS = 30
"""``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` of the deployments' runs (Prefect's minimum)."""

ZOMBIE_AFTER_SECONDS = 90
"""A run whose heartbeats stop for this long (three missed beats) is marked Crashed."""

TRACKING_TAG = "tracking"
"""The tag of the tracking deployments (and so of their flow runs)."""

ZOMBIE_AUTOMATION_NAME = "tracking: crash zombie flow runs"

FINAL_STATE_EVENTS = frozenset(
    f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")
)

Applied = Literal["created", "updated"]


def zombie_automation(within_seconds: int = ZOMBIE_AFTER_SECONDS) -> AutomationCore:
    """The automation: after a heartbeat of a ``tracking`` flow run, expect another one (or
    a final state) within ``within_seconds``; otherwise set the run Crashed."""
    if within_seconds <= HEARTBEAT_SECONDS:
        raise ValueError(
            f"within_seconds must exceed the heartbeat period ({HEARTBEAT_SECONDS} s), "
            f"got {within_seconds}"
        )
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return AutomationCore(
        name=ZOMBIE_AUTOMATION_NAME,
        description=(
            f"Marks a flow run tagged '{TRACKING_TAG}' Crashed when it sends no heartbeat "
            f"for {within_seconds} s (its process was killed or its machine died). "
            "Managed by `tracking zombie-automation`."
        ),
        enabled=True,
        trigger=EventTrigger(
            posture=Posture.Proactive,
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *FINAL_STATE_EVENTS},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification(
                {"prefect.resource.role": "tag",
                 "prefect.resource.id": f"prefect.tag.{TRACKING_TAG}"}
            ),
            for_each={"prefect.resource.id"},
            threshold=1,
            within=timedelta(seconds=within_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {within_seconds} s: the run's process is gone.",
            )
        ],
    )


def apply_automation(
    client: SyncPrefectClient, automation: AutomationCore
) -> tuple[UUID, Applied]:
    """Create ``automation``, or update the one of that name (the most recently updated;
    duplicates, as two concurrent first runs could leave, are deleted): exactly one remains."""
    existing = client.read_automations_by_name(automation.name)
    if not existing:
        return client.create_automation(automation), "created"
    keep, *duplicates = existing
    client.update_automation(keep.id, automation)
    for duplicate in duplicates:
        client.delete_automation(duplicate.id)
    return keep.id, "updated"


def ensure_zombie_automation() -> tuple[UUID, Applied]:
    """Create or update the zombie automation on the Prefect server of ``PREFECT_API_URL``."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return apply_automation(client, zombie_automation())


def main() -> None:
    """``python -m deployments.automations``: create or update the zombie automation."""
    automation_id, applied = ensure_zombie_automation()
    print(f"{applied} automation {ZOMBIE_AUTOMATION_NAME!r} ({automation_id})")


if __name__ == "__main__":
    main()
