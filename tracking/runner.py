"""The Prefect flows: ``intake`` (take items in) and ``resume`` (the hourly run).

Run them like any Prefect flow::

    from tracking.runner import intake_flow, resume_flow
    intake_flow(process="ORDER_CANCELLATION", path="flows/data/cancellations.csv")
    summary = resume_flow(process="ORDER_CANCELLATION")          # one task run per stage
    summary = resume_flow(process="ORDER_CANCELLATION", granularity="batch")  # high volume

or on a schedule through the deployments in ``prefect.yaml`` / ``deployments/serve.py``.
Processes are found by code among ``TRACKING_PROCESSES`` (see ``resolve_process``).

The resume flow claims runnable stages platform by platform, in order, so one run can take a
transaction from A to B to C. Items that fail are outcomes, not errors: the flow fails only
when it cannot do its job (the database is unreachable, a bug).
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from tracking.catalog import Platform, Process, load_processes
from tracking.db import connect, normalise_url
from tracking.decorator import Claim, TxContext, record_unfinished
from tracking.errors import DatabaseUnavailable, UnknownProcessError
from tracking.models import StageState, TxStage
from tracking.reports import Reports, summary_markdown
from tracking.settings import database_url, get_settings
from tracking.store import MAX_CLAIM, Tracker

INTAKE_CHUNK = 1000
REPORT_WINDOW = timedelta(days=7)
PROGRESS_EVERY_SECONDS = 5.0
# A stage reserved but not started outlives a dead run this long at most (the live run's
# heartbeat renews it every third of that).
RESERVATION_SECONDS = 60.0
Granularity = Literal["stage", "batch"]


# -- finding processes and items --------------------------------------------------------


def resolve_process(code: str) -> Process:
    """The process with this code among ``TRACKING_PROCESSES``."""
    processes = {p.code: p for p in load_processes(get_settings().processes)}
    if code not in processes:
        known = ", ".join(sorted(processes)) or "none"
        raise UnknownProcessError(f"unknown process {code!r} (TRACKING_PROCESSES has: {known})")
    return processes[code]


def deployment_name(code: str) -> str:
    """The name of a process's hourly deployment: ``resume/<code-in-lower-case>``."""
    return f"resume/{code.lower().replace('_', '-')}"


def read_items(path: str | Path) -> list[dict[str, Any]]:
    """Items from a CSV file (header row) or a JSON-lines file (one object per line).

    ``.json`` files may also hold one list of objects. Raises ``ValueError`` naming the file
    and line for anything unreadable.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_items(path, text)
    if suffix == ".json" and text.lstrip().startswith("["):
        items = _json(path, text, 1)
        if not all(isinstance(i, dict) for i in items):
            raise ValueError(f"{path}: the JSON list must hold objects only")
        return items
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _jsonl_items(path, text)
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .csv, .jsonl or .json)")


def _csv_items(path: Path, text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or any(not (f or "").strip() for f in reader.fieldnames):
        raise ValueError(f"{path}: the first line must be a header with a name for every column")
    items = []
    for row in reader:
        if None in row or any(v is None for v in row.values()):
            raise ValueError(f"{path}, line {reader.line_num}: wrong number of columns")
        items.append({k.strip(): v for k, v in row.items()})
    return items


def _json(path: Path, text: str, line: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"{path}, line {line + exc.lineno - 1}"
        raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None


def _jsonl_items(path: Path, text: str) -> list[dict[str, Any]]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        item = _json(path, line, number)
        if not isinstance(item, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object")
        items.append(item)
    return items


def database_url_for(database_secret: str | None) -> str:
    """The tracking database a flow uses: the URL in the Prefect ``Secret`` block named
    ``database_secret``, else ``use_database``'s or ``TRACKING_DATABASE_URL``."""
    if database_secret:
        from prefect.blocks.system import Secret

        return str(Secret.load(database_secret).get())
    return database_url()


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
def _tracker_for(process_code: str, database_secret: str | None) -> Iterator[Tracker]:
    """A tracker on the flow's database; a database failure inside the block becomes a
    ``DatabaseUnavailable`` that names the database (never its password)."""
    process = resolve_process(process_code)
    url = sa.make_url(normalise_url(database_url_for(database_secret)))
    check_not_throwaway(url)
    try:
        engine = connect(url.render_as_string(hide_password=False))
        try:
            yield Tracker(engine, processes=[process])
        finally:
            engine.dispose()
    except sa.exc.DBAPIError as exc:
        where = url.render_as_string(hide_password=True)
        detail = " ".join(str(exc.orig).split())[:300]
        raise DatabaseUnavailable(f"the tracking database {where} failed: {detail}") from exc


def _artifact_key(prefix: str, process: str) -> str:
    return f"{prefix}-{process.lower().replace('_', '-').replace('.', '-')}"


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
    new = 0
    uuids: list[str] = []
    with _tracker_for(process, database_secret) as tracker:
        for start in range(0, len(items), INTAKE_CHUNK):
            chunk = items[start : start + INTAKE_CHUNK]
            results = tracker.start_many(process, chunk, source=source)
            new += sum(r.is_new for r in results)
            uuids.extend(r.uuid for r in results)
    summary = {
        "process": process,
        "total": len(items),
        "new": new,
        "duplicates": len(items) - new,
        "uuids": uuids,
    }
    logger.info("intake %s: %d items, %d new, %d duplicates", process, len(items), new,
                len(items) - new)
    create_table_artifact(
        [{"process": process, "items": len(items), "new": new, "duplicates": len(items) - new}],
        key=_artifact_key("intake", process),
        description=f"Intake of {process}" + (f" from {source}" if source else ""),
    )
    return summary


# -- resume -----------------------------------------------------------------------------


@task(name="platform-batch", cache_policy=NO_CACHE, persist_result=False,
      task_run_name="{label}")
def run_batch(label: str, platform_task: Any, contexts: list[TxContext]) -> int:
    """Run a batch of claimed stages of one platform stage in one task run (each still
    tracked in SQL)."""
    for tx in contexts:
        platform_task.fn(tx)
    return len(contexts)


class _Tally:
    """Counts of what a resume run did, per platform and outcome, and its top errors."""

    def __init__(self) -> None:
        self.by_platform: dict[str, Counter[str]] = defaultdict(Counter)
        self.errors: Counter[tuple[str, int, str]] = Counter()
        self.stages_run = 0

    def add(self, stage: TxStage) -> None:
        self.stages_run += 1
        self.by_platform[stage.platform][StageState(stage.state).value] += 1
        if stage.error_code:
            key = (stage.platform, stage.error_code, (stage.error_description or "")[:200])
            self.errors[key] += 1

    def top_errors(self, n: int = 10) -> list[dict[str, Any]]:
        return [
            {"platform": p, "error_code": c, "description": d, "count": k}
            for (p, c, d), k in self.errors.most_common(n)
        ]

    def table(self) -> list[dict[str, Any]]:
        return [
            {"platform": platform, "outcome": outcome, "stages": count}
            for platform, counts in self.by_platform.items()
            for outcome, count in sorted(counts.items())
        ]


class _NoEmptyTraceback(logging.Filter):
    """Prefect logs a failed task run with ``exc_info=True`` even when it failed by returning
    a state (our ``SystemError``), which prints a stray ``NoneType: None``; drop that."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


def _quiet_empty_tracebacks() -> None:
    logger = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, _NoEmptyTraceback) for f in logger.filters):
        logger.addFilter(_NoEmptyTraceback())


def _steps(process: Process) -> list[tuple[Platform, str]]:
    steps = []
    for platform in process.platforms:
        if platform.task is None:
            raise ValueError(
                f"platform {platform.code!r} of {process.code!r} has no function: define it "
                f"with @process.platform(...)"
            )
        steps.extend((platform, stage) for stage in platform.stages)
    return steps


@dataclass(frozen=True)
class _Options:
    """What a resume run was asked to do (its flow parameters, checked)."""

    process: str
    uuid: str | None
    granularity: Granularity
    batch_size: int
    concurrency: int


class _Budget:
    """The run's limits: ``max_stages`` claimed, ``max_seconds`` of claiming."""

    def __init__(self, max_stages: int | None, max_seconds: float | None) -> None:
        self.max_stages, self.max_seconds = max_stages, max_seconds
        self.deadline = time.monotonic() + max_seconds if max_seconds else None

    def room(self, claimed: int) -> int:
        """How many stages the run may still claim (at most one claim's worth)."""
        left = MAX_CLAIM if self.max_stages is None else self.max_stages - claimed
        return min(left, MAX_CLAIM)

    def exceeded(self, claimed: int) -> str | None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return f"time limit of {self.max_seconds}s reached"
        if self.max_stages is not None and claimed >= self.max_stages:
            return f"limit of {self.max_stages} stages reached"
        return None


class _Heartbeat:
    """Keeps a live run's reservations from expiring: renews them every third of their
    lease, in a background thread, so a slow batch never lets another run take over stages
    this run still holds (a dead run stops renewing, and its reservations come back)."""

    def __init__(self, tracker: Tracker, process: str, owner: str, seconds: float) -> None:
        self._renew = lambda: tracker.renew_reservations(process, owner=owner, seconds=seconds)
        self._every = seconds / 3
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat-{owner}",
                                        daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._renew()
            except Exception as exc:  # the database may be back at the next beat
                logging.getLogger("tracking.runner").warning(
                    "could not renew reservations: %s: %s", type(exc).__name__, exc
                )

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class _Job:
    """One task run in flight: the claimed stages it runs and its future."""

    def __init__(self, contexts: list[TxContext], future: PrefectFuture[Any]) -> None:
        self.contexts = contexts
        self.future = future

    def ending(self) -> str:
        """How the task run ended, for a stage it left unrecorded."""
        try:
            state = self.future.wrapped_future.result()  # type: ignore[attr-defined]
        except BaseException as exc:  # a Prefect failure around the task run
            return f"{type(exc).__name__}: {exc}"[:500]
        return f"{getattr(state, 'name', state)}: {getattr(state, 'message', '')}"[:500]


def _submit(
    runner: ThreadPoolTaskRunner, platform: Platform, stage: str,
    contexts: list[TxContext], granularity: Granularity,
) -> _Job:
    if granularity == "stage":
        (tx,) = contexts
        return _Job(contexts, runner.submit(platform.task, parameters={"tx": tx}))
    label = f"{platform.code}.{stage} x{len(contexts)}"
    params = {"label": label, "platform_task": platform.task, "contexts": contexts}
    return _Job(contexts, runner.submit(run_batch, parameters=params))


class _Pipeline:
    """Runs the runnable stages of a run, one platform stage at a time: claims only what it
    can start now (a free task run slot), so every reserved stage starts soon."""

    def __init__(
        self, tracker: Tracker, claim: Claim, runner: ThreadPoolTaskRunner, options: _Options,
        tally: _Tally, reserve_seconds: float,
    ) -> None:
        self.tracker, self.claim, self.runner = tracker, claim, runner
        self.options, self.tally, self.reserve_seconds = options, tally, reserve_seconds
        self.claimed = 0
        self._attempts_before: dict[str, int] = {}  # per claimed uuid, of the current step

    def run(self, platform: Platform, stage: str, budget: _Budget) -> str | None:
        """Work on one platform stage until nothing of it is runnable; returns why it
        stopped early (a limit), if it did."""
        o = self.options
        unit = 1 if o.granularity == "stage" else o.batch_size
        jobs: list[_Job] = []
        waiting: list[TxContext] = []  # claimed, for the next free task run slot
        stopped: str | None = None
        drained = False
        try:
            while True:
                free = o.concurrency - len(jobs) - len(waiting) // unit
                if not drained and stopped is None and free > 0 and not waiting:
                    stopped = budget.exceeded(self.claimed)
                    if stopped is None:
                        # Stage granularity keeps up to one more round reserved, so a
                        # claim serves several task runs; batches start as they are claimed.
                        ahead = o.concurrency if unit == 1 else 0
                        want = min((free + ahead) * unit, budget.room(self.claimed),
                                   o.batch_size if unit == 1 else free * unit)
                        claimed = self.tracker.claim(
                            o.process, platform.code, stage, owner=self.claim.owner,
                            uuid=o.uuid, limit=want, lease_seconds=self.reserve_seconds,
                        )
                        drained = not claimed
                        self.claimed += len(claimed)
                        self._attempts_before.update((c.uuid, c.attempt) for c in claimed)
                        contexts = [TxContext.of(s, self.claim) for s in claimed]
                        waiting.extend(contexts)
                while waiting and len(jobs) < o.concurrency:
                    jobs.append(_submit(self.runner, platform, stage, waiting[:unit],
                                        o.granularity))
                    del waiting[:unit]
                if not jobs:
                    return stopped
                done, _ = wait(
                    [j.future.wrapped_future for j in jobs],  # type: ignore[attr-defined]
                    return_when=FIRST_COMPLETED,
                )
                finished = [j for j in jobs if j.future.wrapped_future in done]  # type: ignore[attr-defined]
                jobs = [j for j in jobs if j not in finished]
                self._settle(finished)
        except BaseException:
            self.claim.stopping.set()  # what has not started must not start now
            raise

    def _settle(self, jobs: list[_Job]) -> None:
        """Tally what the finished task runs recorded. A stage they left unrecorded is a
        system error when its attempt had started (the task run's ending as description),
        or released, attempts intact, when it never started (Prefect failed before the
        call, or the run is stopping)."""
        contexts = []
        for job in jobs:
            for tx in job.contexts:
                if tx.recorded is not None:  # the common case: no need to read it back
                    self._tally(tx, tx.recorded)
                else:
                    contexts.append((tx, job))
        if not contexts:
            return
        first = contexts[0][0]
        stages = self.tracker.get_stages([tx.uuid for tx, _ in contexts], first.platform,
                                         first.stage)
        unstarted = []
        for (tx, job), stage in zip(contexts, stages, strict=True):
            mine = stage.lease_owner == self.claim.owner
            if stage.state == StageState.IN_PROGRESS and mine:
                if stage.started_at is None:
                    unstarted.append(tx.uuid)
                    continue
                why = f"the task run ended without recording its attempt ({job.ending()})"
                stage = record_unfinished(self.tracker, tx, why) or stage
            if mine:
                self._tally(tx, stage)
        self._release(unstarted)

    def _tally(self, tx: TxContext, stage: TxStage) -> None:
        """Count what this run attempted (not a stage it skipped or another run took)."""
        if stage.attempt > self._attempts_before.pop(tx.uuid, stage.attempt):
            self.tally.add(stage)

    def _release(self, unstarted: list[str]) -> None:
        if unstarted:
            self.claimed -= self.tracker.release(
                self.options.process, owner=self.claim.owner, uuids=unstarted,
                reason="its task run ended before starting it",
            )


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
    _quiet_empty_tracebacks()
    flow_run = FlowRunContext.get().flow_run  # type: ignore[union-attr]
    owner = str(flow_run.id)
    lease = lease_seconds or get_settings().lease_seconds
    options = _Options(process, uuid, granularity, batch_size, concurrency)
    budget = _Budget(max_stages, max_seconds)
    tally = _Tally()
    stopped = "nothing left to run"
    with _tracker_for(process, database_secret) as tracker:
        proc = tracker.process(process)
        steps = _steps(proc)
        _tag_flow_run(flow_run, proc)
        recovered = tracker.recover_expired_leases(process, limit=100_000)
        progress = create_progress_artifact(
            0.0, key=_artifact_key("resume-progress", process),
            description=f"Resume {process}: starting",
        )
        claim = Claim(tracker, owner, lease)
        reserve = min(float(lease), RESERVATION_SECONDS)
        try:
            with (
                _Heartbeat(tracker, process, owner, reserve),
                ThreadPoolTaskRunner(max_workers=concurrency) as runner,
            ):
                pipeline = _Pipeline(tracker, claim, runner, options, tally, reserve)
                next_progress = time.monotonic() + PROGRESS_EVERY_SECONDS
                for index, (platform, stage) in enumerate(steps):
                    why = pipeline.run(platform, stage, budget)
                    if time.monotonic() >= next_progress:  # an API call: not every step
                        next_progress = time.monotonic() + PROGRESS_EVERY_SECONDS
                        update_progress_artifact(
                            progress, 100.0 * (index + 1) / len(steps),
                            description=f"{platform.code}.{stage}: {tally.stages_run} stages run",
                        )
                    if why is not None:
                        stopped = why
                        break
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
        _publish_summary(process, summary, tally)
        _publish_report(process, tracker)
    logger.info("resume %s: %d stages run (%s)", process, tally.stages_run, stopped)
    return summary


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


def _publish_report(process: str, tracker: Tracker) -> None:
    """The business picture after the run (the last 7 days), as in ``tracking report``."""
    end = datetime.now(UTC)
    markdown = summary_markdown(Reports(tracker.engine), end - REPORT_WINDOW, end, process)
    create_markdown_artifact(
        markdown, key=_artifact_key("tracking-report", process),
        description=f"{process}: transactions of the last 7 days by state, stages, top errors",
    )


def _publish_summary(process: str, summary: dict[str, Any], tally: _Tally) -> None:
    table = tally.table() or [{"platform": "-", "outcome": "nothing to run", "stages": 0}]
    create_table_artifact(
        table, key=_artifact_key("resume-outcomes", process),
        description=f"Stages run by {process}, per platform and outcome",
    )
    lines = [
        f"# Resume run of {process}",
        "",
        f"* stages run: **{summary['stages_run']}**",
        f"* expired leases recovered: {summary['recovered_leases']}",
        f"* stopped: {summary['stopped']}",
        "",
        "## Outcomes per platform",
        "",
        "| platform | outcome | stages |",
        "|---|---|---|",
        *[f"| {r['platform']} | {r['outcome']} | {r['stages']} |" for r in table],
    ]
    errors = summary["top_errors"]
    if errors:
        lines += ["", "## Top error codes", "", "| platform | code | description | count |",
                  "|---|---|---|---|"]
        lines += [
            f"| {e['platform']} | {e['error_code']} | {e['description'] or ''} | {e['count']} |"
            for e in errors
        ]
    create_markdown_artifact(
        "\n".join(lines), key=_artifact_key("resume-summary", process),
        description=f"Summary of the resume run of {process}",
    )
