"""Serve the deployments of ``prefect.yaml`` from one local process (no work pool).

For users without a work pool::

    python -m deployments.serve            # or: tracking serve

``prefect.yaml`` is the one definition of the deployments: each entry of its ``deployments``
list is served here as ``prefect deploy`` registers it for the work pool, with its name,
entrypoint (the flow is imported from it: ``package.module.flow``, ``package.module:flow`` or
``path/to/file.py:flow``, a relative path being relative to prefect.yaml), description,
tags, parameters, schedules (or the older single ``schedule``), ``concurrency_limit``,
``paused``, ``version``, ``enforce_parameter_schema`` and ``triggers``. What only a worker
uses (``work_pool`` with its ``job_variables``, ``build``, ``push``, ``pull``) is not needed
here; any other key is refused rather than silently left out. Jinja templates
(``{{ ... }}``) are not resolved.

An entry for a process (a ``process`` parameter) is served when ``TRACKING_PROCESSES`` loads
that process. A loaded process without an entry is served as a copy of the first process
entry with its process put in (its ``process`` parameter, its ``process:<code>`` tag, its code
in the description) and named by ``deployment_name(code)`` of the flow's module, the name the
API's deployment mode runs: every process gets its hourly resume deployment, and adding one to
prefect.yaml (to tune it, or for the work pool) needs nothing here. The flows are imported
from the entrypoints, so nothing here names the module that defines them.

Like the work-pool deployments, the served flow runs send a heartbeat every
``HEARTBEAT_SECONDS`` and it creates (or updates) the automation that marks a run Crashed when
its heartbeats stop (``deployments.automations``), so a run killed with ``kill -9`` does not
stay Running. Runs until stopped with Ctrl-C; open the Prefect UI to trigger one now.
"""

from __future__ import annotations

import copy
import inspect
import logging
from pathlib import Path
from typing import Any

import yaml
from prefect import Flow, serve

# How `prefect deploy` turns a prefect.yaml schedule into a deployment schedule (private, but
# Prefect is pinned; using it keeps the two readings of prefect.yaml the same).
from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentTriggerTypes
from prefect.flows import load_flow_from_entrypoint
from prefect.types.entrypoint import EntrypointType
from pydantic import TypeAdapter

from deployments.automations import HEARTBEAT_SECONDS, ensure_zombie_automation
from tracking.app import configured_processes
from tracking.flows import ensure_concurrency_limits
from tracking.settings import Settings

PREFECT_YAML = "prefect.yaml"

SERVED_KEYS = frozenset({
    "name", "entrypoint", "description", "tags", "parameters", "schedules", "schedule",
    "concurrency_limit", "paused", "version", "enforce_parameter_schema", "triggers",
})
"""The keys of a prefect.yaml deployment that a served deployment takes."""

WORKER_KEYS = frozenset({"work_pool", "build", "push", "pull"})
"""The keys only a work pool's worker needs (a served run executes in this process's stead)."""

log = logging.getLogger(__name__)


def prefect_yaml_path() -> Path:
    """The checkout's prefect.yaml (beside the ``deployments`` package), else the one in the
    current directory (where ``prefect deploy`` reads it)."""
    beside = Path(__file__).resolve().parents[1] / PREFECT_YAML
    return beside if beside.is_file() else Path.cwd() / PREFECT_YAML


def read_prefect_yaml(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The ``deployments`` entries of prefect.yaml (``yaml.safe_load``), checked for keys
    serving would leave out; each entry's ``schedule`` becomes a one-item ``schedules``."""
    path = Path(path) if path is not None else prefect_yaml_path()
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no prefect.yaml, which defines the deployments") from None
    entries = config.get("deployments") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{path}: 'deployments' must be a list of mappings")
    checked = []
    for entry in entries:
        label = f"{path}: deployment {entry.get('name')!r}"
        unknown = set(entry) - SERVED_KEYS - WORKER_KEYS
        if unknown:
            raise ValueError(f"{label}: serving does not support {', '.join(sorted(unknown))}")
        if not entry.get("name") or not entry.get("entrypoint"):
            raise ValueError(f"{label}: needs a name and an entrypoint")
        entry = copy.deepcopy(entry)
        if "schedule" in entry:
            if entry.get("schedules"):
                raise ValueError(f"{label}: has both 'schedule' and 'schedules'")
            legacy = entry.pop("schedule")
            entry["schedules"] = [legacy] if legacy else []
        entry["parameters"] = entry.get("parameters") or {}
        checked.append(entry)
    return checked


def load_flow(entrypoint: str, base: Path | None = None) -> Flow[..., Any]:
    """Import the flow of a prefect.yaml entrypoint (a relative script path from ``base``)."""
    if ".py:" in entrypoint and base is not None:
        script, name = entrypoint.rsplit(":", 1)
        if not Path(script).is_absolute():
            entrypoint = f"{base / script}:{name}"
    return load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)


def build_deployments(
    process_codes: list[str] | None = None,
    cron: str | None = None,
    *,
    prefect_file: str | Path | None = None,
    **parameters: Any,
) -> list[RunnerDeployment]:
    """The deployments of prefect.yaml, ready to serve (see the module's docstring).

    Args:
        process_codes: the processes served (default: all of ``TRACKING_PROCESSES``).
        cron: replaces every deployment's schedules with this cron (UTC) when given.
        prefect_file: the prefect.yaml read (default: ``prefect_yaml_path()``).
        **parameters: flow parameters set on every deployment (over prefect.yaml's).
    """
    path = Path(prefect_file) if prefect_file is not None else prefect_yaml_path()
    entries = read_prefect_yaml(path)
    codes = process_codes or [p.code for p in configured_processes(Settings())]
    flows: dict[str, Flow[..., Any]] = {}

    def flow_of(entry: dict[str, Any]) -> Flow[..., Any]:
        if entry["entrypoint"] not in flows:
            flows[entry["entrypoint"]] = load_flow(entry["entrypoint"], path.parent)
        return flows[entry["entrypoint"]]

    chosen: list[dict[str, Any]] = []
    template: dict[str, Any] | None = None
    for entry in entries:
        process = entry["parameters"].get("process")
        if process is None:
            chosen.append(entry)
            continue
        template = template or entry
        if process in codes:
            chosen.append(entry)
        else:
            log.info("prefect.yaml deployment %r is for %s, which is not served here "
                     "(not in TRACKING_PROCESSES)", entry["name"], process)
    have = {e["parameters"].get("process") for e in chosen}
    for code in codes:
        if code in have:
            continue
        if template is None:
            raise ValueError(f"{path}: no deployment for process {code!r}, nor one of another "
                             "process to copy")
        chosen.append(_copy_for(template, code, flow_of(template)))

    deployments = [_to_deployment(e, flow_of(e), cron, parameters) for e in chosen]
    names = [f"{d.flow_name}/{d.name}" for d in deployments]
    if len(set(names)) < len(names):
        raise ValueError(f"{path}: two deployments share a name: {sorted(names)}")
    return deployments


def _copy_for(template: dict[str, Any], code: str, flow: Flow[..., Any]) -> dict[str, Any]:
    """``template`` (a process's entry) for process ``code``."""
    old = template["parameters"]["process"]
    naming = getattr(inspect.getmodule(flow.fn), "deployment_name", None)
    if naming is None:
        raise ValueError(f"{template['entrypoint']}: its module has no deployment_name(code) "
                         f"to name the deployment of {code!r}: add one for it to prefect.yaml")
    entry = copy.deepcopy(template)
    entry["name"] = naming(code).split("/", 1)[-1]
    entry["parameters"]["process"] = code
    for schedule in entry.get("schedules") or []:
        if "process" in (schedule.get("parameters") or {}):
            schedule["parameters"]["process"] = code
    entry["tags"] = [f"process:{code}" if tag == f"process:{old}" else tag
                     for tag in entry.get("tags") or []]
    if entry.get("description"):
        entry["description"] = entry["description"].replace(old, code)
    return entry


def _to_deployment(
    entry: dict[str, Any], flow: Flow[..., Any], cron: str | None, parameters: dict[str, Any]
) -> RunnerDeployment:
    options: dict[str, Any] = {
        key: entry[key] for key in ("description", "paused", "version", "enforce_parameter_schema")
        if entry.get(key) is not None
    }
    if cron is not None:
        options["cron"] = cron
    else:
        options["schedules"] = [
            DeploymentScheduleCreate(**_schedule_config_to_deployment_schedule(schedule))
            for schedule in entry.get("schedules") or []
        ]
    limit = entry.get("concurrency_limit")
    if limit is not None:
        options["concurrency_limit"] = (ConcurrencyLimitConfig(**limit)
                                        if isinstance(limit, dict) else limit)
    if entry.get("triggers"):
        adapter: TypeAdapter[Any] = TypeAdapter(DeploymentTriggerTypes)
        options["triggers"] = [
            adapter.validate_python({"name": f"{entry['name']}__automation_{i}", **trigger})
            for i, trigger in enumerate(entry["triggers"], start=1)
        ]
    is_script = ".py:" in entry["entrypoint"]
    return flow.to_deployment(
        name=entry["name"],
        parameters={**entry["parameters"], **parameters},
        tags=list(entry.get("tags") or []),
        entrypoint_type=EntrypointType.FILE_PATH if is_script else EntrypointType.MODULE_PATH,
        **options,
    )


def main() -> None:
    """Serve prefect.yaml's deployments until interrupted (the zombie automation and the
    platforms' concurrency limits created or updated first; the runs beat every
    ``HEARTBEAT_SECONDS``)."""
    deployments = build_deployments()
    ensure_zombie_automation()
    for process in configured_processes(Settings()):
        ensure_concurrency_limits(process)
    serve(*deployments, heartbeat_seconds=HEARTBEAT_SECONDS)


if __name__ == "__main__":
    main()
