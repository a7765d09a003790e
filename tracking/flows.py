"""The Prefect flows: ``intake`` (take items in) and ``resume`` (the hourly run).

Run them like any Prefect flow::

    from tracking.flows import intake_flow, resume_flow
    intake_flow(process="ORDER_CANCELLATION", path="flows/data/cancellations.csv")
    summary = resume_flow(process="ORDER_CANCELLATION")          # one task run per stage
    summary = resume_flow(process="ORDER_CANCELLATION", granularity="batch")  # high volume

or on a schedule through the deployments in ``prefect.yaml`` (``deployments/serve.py``
serves the same ones from one local process). A flow is an entry point: it reads the
settings once, when it starts, and hands them down. Processes are found by code among
``TRACKING_PROCESSES``; the database is not migrated here (``tracking db upgrade``).

Items that fail are outcomes, not errors: the flow fails only when it cannot do its job (the
database is unreachable or behind the code's schema, a bug). A resume run ends by sending the
business outcomes not sent yet as Prefect events (``send_events``; a failure to send is logged,
never fails the run, and the next run sends them).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from tracking.artifacts import (
    Tally,
    artifact_key,
    publish_intake,
    publish_report,
    publish_summary,
    quiet_empty_tracebacks,
)
from tracking.catalog import Process, find_process, load_processes
from tracking.db import check_schema, connect, normalise_url
from tracking.decorator import Claim, concurrency_limit_name, tracked_task
from tracking.errors import DatabaseUnavailable
from tracking.items import read_items, take_in
from tracking.memory import rarer_young_collections
from tracking.pipeline import RESERVATION_SECONDS, Budget, Granularity, Heartbeat, Options, Pipeline
from tracking.prefect_events import send_outcome_events
from tracking.reports.counts import fold
from tracking.settings import Settings, database_url
from tracking.store import Tracker

PROGRESS_EVERY_SECONDS = 5.0
#: How long a run's end waits for another run that is sending the outcome events.
EVENTS_WAIT_SECONDS = 10.0


def deployment_name(code: str) -> str:
    """The name of a process's hourly deployment: ``resume/<code-in-lower-case>``."""
    return f"resume/{code.lower().replace('_', '-')}"


# -- the database of a flow -------------------------------------------------------


def database_url_for(database_secret: str | None, settings: Settings | None = None) -> str:
    """The tracking database a flow uses: the URL in the Prefect ``Secret`` block named
    ``database_secret``, else ``use_database``'s or ``TRACKING_DATABASE_URL``."""
    if database_secret:
        from prefect.blocks.system import Secret

        return str(Secret.load(database_secret).get())
    return database_url(settings)


def check_not_throwaway(url: sa.URL, cwd: Path | None = None) -> None:
    """Refuse a relative SQLite path in a deployment run whose working directory is a
    temporary one (a process worker's): the file would vanish with the directory, and the
    run would find nothing to do in an empty database."""
    from prefect.runtime import deployment

    database = url.database or ""
    if url.get_backend_name() != "sqlite" or not database or database.startswith("file:"):
        return
    if database == ":memory:" or Path(database).is_absolute() or deployment.id is None:
        return
    cwd = (cwd or Path.cwd()).resolve()
    if cwd.is_relative_to(Path(tempfile.gettempdir()).resolve()):
        raise ValueError(
            f"TRACKING_DATABASE_URL is the relative SQLite path {database!r}, which here is "
            f"{cwd / database}: inside the worker's temporary directory, deleted after the "
            "run. Set TRACKING_DATABASE_URL to PostgreSQL or an absolute SQLite path in the "
            "worker's environment, or pass database_secret."
        )


@contextmanager
def _tracker_for(
    process_code: str, database_secret: str | None, settings: Settings
) -> Iterator[Tracker]:
    """A tracker on the flow's database; a database failure inside the block becomes a
    ``DatabaseUnavailable`` that names the database (never its password)."""
    process = find_process(load_processes(settings.processes), process_code)
    url = sa.make_url(normalise_url(database_url_for(database_secret, settings)))
    check_not_throwaway(url)
    try:
        engine = connect(url.render_as_string(hide_password=False))
        check_schema(engine)
        try:
            yield Tracker(engine, processes=[process])
        finally:
            engine.dispose()
    except sa.exc.DBAPIError as exc:
        where = url.render_as_string(hide_password=True)
        detail = " ".join(str(exc.orig).split())[:300]
        raise DatabaseUnavailable(f"the tracking database {where} failed: {detail}") from exc


# -- intake -----------------------------------------------------------------------------


@flow(name="intake", flow_run_name="intake {process}")
def intake_flow(
    process: str,
    items: list[dict[str, Any]] | None = None,
    path: str | None = None,
    source: str | None = None,
    database_secret: str | None = None,
) -> dict[str, Any]:
    """Take items in: each becomes a transaction unless it is a duplicate.

    Give ``items`` or ``path`` (a CSV or JSON-lines file). Returns counts and the uuids.
    The database is ``TRACKING_DATABASE_URL`` or the Prefect ``Secret`` block named
    ``database_secret``.
    """
    logger = get_run_logger()
    if (items is None) == (path is None):
        raise ValueError("give exactly one of items= or path=")
    if items is None:
        items = read_items(path)  # type: ignore[arg-type]
        source = source or Path(path).name  # type: ignore[arg-type]
    with _tracker_for(process, database_secret, Settings()) as tracker:
        summary = take_in(tracker, process, items, source=source)
    logger.info("intake %s: %d items, %d new, %d duplicates", process, summary.total,
                summary.new, summary.duplicates)
    publish_intake(process, summary.total, summary.new, source)
    return summary.as_dict()


# -- resume -----------------------------------------------------------------------------


@flow(name="resume", flow_run_name="resume {process}")
def resume_flow(
    process: str,
    uuid: str | None = None,
    granularity: Granularity = "stage",
    batch_size: int = 100,
    concurrency: int = 8,
    max_stages: int | None = None,
    max_seconds: float | None = None,
    lease_seconds: int | None = None,
    database_secret: str | None = None,
) -> dict[str, Any]:
    """Run every runnable stage of ``process`` (or only of transaction ``uuid``).

    Args:
        granularity: ``"stage"`` (one task run per stage, every item visible in the UI) or
            ``"batch"`` (one task run per batch of stages: for high volumes).
        batch_size: most stages claimed at once (and per task run in batch granularity).
        concurrency: stages (or batches) run at the same time; the run reserves only what
            it can start now.
        max_stages / max_seconds: stop claiming after this many stages / seconds.
        lease_seconds: how long one attempt may take before it counts as lost (default
            ``TRACKING_LEASE_SECONDS``): keep it above the slowest platform call. Stages
            waiting in a batch are kept reserved by the run's heartbeat meanwhile.
        database_secret: name of a Prefect ``Secret`` block holding the database URL;
            default: ``TRACKING_DATABASE_URL`` (never pass a URL as a parameter: Prefect
            stores and shows parameters).
    """
    if granularity not in ("stage", "batch"):
        raise ValueError(f"granularity must be 'stage' or 'batch', got {granularity!r}")
    for name, value in (("batch_size", batch_size), ("concurrency", concurrency)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    logger = get_run_logger()
    quiet_empty_tracebacks()
    settings = Settings()  # read once, here at the entry point
    flow_run = FlowRunContext.get().flow_run  # type: ignore[union-attr]
    owner = str(flow_run.id)
    lease = lease_seconds or settings.lease_seconds
    options = Options(process, uuid, granularity, batch_size, concurrency)
    budget = Budget(max_stages, max_seconds)
    tally = Tally()
    stopped = "nothing left to run"
    with _tracker_for(process, database_secret, settings) as tracker:
        proc = tracker.process(process)
        steps = [(p, stage) for p in proc.platforms for stage in p.stages]
        tasks = {p.code: tracked_task(proc, p) for p in proc.platforms}
        _tag_flow_run(flow_run, proc)
        ensure_concurrency_limits(proc)
        recovered = tracker.recover_expired_leases(process, limit=100_000)
        progress = create_progress_artifact(
            0.0, key=artifact_key("resume-progress", process),
            description=f"Resume {process}: starting",
        )
        claim = Claim(tracker, owner, lease)
        reserve = min(float(lease), RESERVATION_SECONDS)
        try:
            with (
                rarer_young_collections(),
                Heartbeat(tracker, process, claim, reserve),
                ThreadPoolTaskRunner(max_workers=concurrency) as runner,
            ):
                pipeline = Pipeline(tracker, claim, runner, options, tally, reserve, tasks)
                next_progress = [time.monotonic() + PROGRESS_EVERY_SECONDS]

                def show_progress(fraction: float) -> None:  # an API call: not every round
                    if time.monotonic() >= next_progress[0]:
                        next_progress[0] = time.monotonic() + PROGRESS_EVERY_SECONDS
                        update_progress_artifact(
                            progress, 100.0 * fraction,
                            description=f"{tally.stages_run} stages run",
                        )

                stopped = pipeline.run(steps, budget, show_progress) or stopped
        finally:
            claim.stopping.set()
            _release_unstarted(tracker, process, owner, logger)
        update_progress_artifact(progress, 100.0, description=f"done: {stopped}")
        summary = {
            "process": process,
            "flow_run_id": owner,
            "stages_run": tally.stages_run,
            "recovered_leases": recovered,
            "by_platform": {p: dict(c) for p, c in tally.by_platform.items()},
            "top_errors": tally.top_errors(),
            "stopped": stopped,
        }
        publish_summary(process, summary, tally)
        fold_counts(tracker, logger)
        publish_report(process, tracker)
        if settings.send_events:
            summary["events"] = send_events(tracker, logger)
    logger.info("resume %s: %d stages run (%s)", process, tally.stages_run, stopped)
    return summary


def fold_counts(tracker: Tracker, logger: Any) -> None:
    """As a run ends: fold PostgreSQL's count deltas into the summary's hourly counts
    (``tracking.reports.counts``; nothing to do on SQLite). A failure is logged: the counts
    stay exact with the deltas, and the next run folds them."""
    try:
        fold(tracker.engine)
    except Exception as exc:
        logger.warning("could not fold the summary counts (the next run does): %s: %s",
                       type(exc).__name__, " ".join(str(exc).split())[:500])


def send_events(tracker: Tracker, logger: Any) -> dict[str, Any]:
    """As a run ends: send the business outcomes not sent yet (of every process) as Prefect
    events, in batches (``tracking.prefect_events``). A failure does not fail the run: it is
    logged, and the outcomes are sent by the next run (or ``tracking events send``)."""
    try:
        delivery = send_outcome_events(tracker.engine, wait_seconds=EVENTS_WAIT_SECONDS)
    except Exception as exc:
        logger.warning("could not send the outcome events (the next run sends them): %s: %s",
                       type(exc).__name__, " ".join(str(exc).split())[:500])
        sent = getattr(getattr(exc, "delivery", None), "sent", 0)
        return {"sent": sent, "error": type(exc).__name__}
    if delivery.busy:
        logger.info("another run is sending the outcome events")
    elif delivery.sent:
        logger.info("sent %d outcome events to Prefect (%d batches, %d overdue)",
                    delivery.sent, delivery.batches, delivery.overdue)
    return {"sent": delivery.sent, "batches": delivery.batches, "overdue": delivery.overdue,
            "busy": delivery.busy}


def _release_unstarted(tracker: Tracker, process: str, owner: str, logger: Any) -> None:
    """However the run ends (done, an error, SIGTERM, cancellation), give back what it
    reserved and never started, so no other run waits for its leases."""
    try:
        released = tracker.release(process, owner=owner)
    except Exception as exc:  # e.g. the database is down: the reservations expire instead
        logger.warning("could not release unstarted stages: %s: %s", type(exc).__name__, exc)
        return
    if released:
        logger.info("released %d reserved stages that did not start", released)


def ensure_concurrency_limits(process: Process) -> list[str]:
    """Create or update the Prefect global concurrency limit of each platform of ``process``
    that declares ``concurrency=N`` (each resume run does it as it starts, and so does
    ``deployments/serve.py``). Returns their names."""
    limited = [p for p in process.platforms if p.concurrency]
    if not limited:
        return []
    names = []
    with get_client(sync_client=True) as client:
        for p in limited:
            name = concurrency_limit_name(process.code, p.code)
            client.upsert_global_concurrency_limit_by_name(name, p.concurrency)  # type: ignore[arg-type]
            names.append(name)
    return names


def _tag_flow_run(flow_run: Any, process: Process) -> None:
    """Put the process and platform tags on this flow run (not on every task run)."""
    tags = {f"process:{process.code}", *(f"platform:{p.code}" for p in process.platforms)}
    if tags <= set(flow_run.tags):
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, tags=sorted(tags | set(flow_run.tags)))
    except Exception as exc:  # tags are for the UI: never a reason to fail the run
        get_run_logger().warning("could not tag the flow run: %s", type(exc).__name__)
