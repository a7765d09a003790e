"""Serve the hourly resume deployment of every process from one local process.

For users without a work pool::

    python -m deployments.serve            # or: tracking serve

It creates one deployment per process in ``TRACKING_PROCESSES`` (named like the ones in
``prefect.yaml``: ``resume/<process-code>``), each on the cron ``0 * * * *`` (UTC), and runs
their flow runs until stopped with Ctrl-C. Open the Prefect UI to trigger one now.

Like the work-pool deployments, its flow runs send a heartbeat every ``HEARTBEAT_SECONDS``
and it creates (or updates) the automation that marks a run Crashed when its heartbeats stop
(``deployments.automations``), so a run killed with ``kill -9`` does not stay Running.
"""

from __future__ import annotations

from typing import Any

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from deployments.automations import HEARTBEAT_SECONDS, TRACKING_TAG, ensure_zombie_automation
from tracking.catalog import load_processes
from tracking.runner import deployment_name, resume_flow
from tracking.settings import get_settings

HOURLY = "0 * * * *"


def build_deployments(
    process_codes: list[str] | None = None, cron: str = HOURLY, **parameters: Any
) -> list[RunnerDeployment]:
    """One hourly resume deployment per process (all of TRACKING_PROCESSES by default)."""
    codes = process_codes or [p.code for p in load_processes(get_settings().processes)]
    deployments = []
    for code in codes:
        name = deployment_name(code).split("/", 1)[1]
        deployments.append(
            resume_flow.to_deployment(
                name=name,
                cron=cron,
                parameters={"process": code, **parameters},
                tags=[TRACKING_TAG, f"process:{code}"],
                description=f"Hourly resume of {code}",
            )
        )
    return deployments


def main() -> None:
    """Serve every process's hourly deployment until interrupted (the zombie automation
    created or updated first; the runs beat every ``HEARTBEAT_SECONDS``)."""
    deployments = build_deployments()
    ensure_zombie_automation()
    serve(*deployments, heartbeat_seconds=HEARTBEAT_SECONDS)


if __name__ == "__main__":
    main()
