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
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from tracking.catalog import Platform, Process, load_processes
from tracking.db import connect
from tracking.decorator import Claim, TxContext, record_unfinished
from tracking.models import StageState, TxStage
from tracking.reports import Reports, summary_markdown
from tracking.settings import get_settings
from tracking.store import Tracker, UnknownProcessError

INTAKE_CHUNK = 1000
REPORT_WINDOW = timedelta(days=7)
PROGRESS_EVERY_SECONDS = 5.0
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


@contextmanager
def _tracker_for(process_code: str, database_url: str | None) -> Iterator[Tracker]:
    process = resolve_process(process_code)
    engine = connect(database_url)
    try:
        yield Tracker(engine, processes=[process])
    finally:
        engine.dispose()


def _artifact_key(prefix: str, process: str) -> str:
    return f"{prefix}-{process.lower().replace('_', '-').replace('.', '-')}"


# -- intake -----------------------------------------------------------------------------


@flow(name="intake", flow_run_name="intake {process}")
def intake_flow(
    process: str,
    items: list[dict[str, Any]] | None = None,
    path: str | None = None,
    source: str | None = None,
    database_url: str | None = None,
) -> dict[str, Any]:
    """Take items in: each becomes a transaction unless it is a duplicate.

    Give ``items`` or ``path`` (a CSV or JSON-lines file). Returns counts and the uuids.
    """
    logger = get_run_logger()
    if (items is None) == (path is None):
        raise ValueError("give exactly one of items= or path=")
    if items is None:
        items = read_items(path)  # type: ignore[arg-type]
        source = source or Path(path).name  # type: ignore[arg-type]
    new = 0
    uuids: list[str] = []
    with _tracker_for(process, database_url) as tracker:
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


def _run_claimed(
    runner: ThreadPoolTaskRunner,
    platform: Platform,
    stage: str,
    contexts: list[TxContext],
    granularity: Granularity,
    batch_size: int,
) -> None:
    futures: list[PrefectFuture[Any]] = []
    if granularity == "stage":
        futures = [runner.submit(platform.task, parameters={"tx": tx}) for tx in contexts]
    else:
        for i in range(0, len(contexts), batch_size):
            chunk = contexts[i : i + batch_size]
            label = f"{platform.code}.{stage} x{len(chunk)}"
            params = {"label": label, "platform_task": platform.task, "contexts": chunk}
            futures.append(runner.submit(run_batch, parameters=params))
    for future in futures:
        future.wait()


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
    database_url: str | None = None,
) -> dict[str, Any]:
    """Run every runnable stage of ``process`` (or only of transaction ``uuid``).

    Args:
        granularity: ``"stage"`` (one task run per stage, every item visible in the UI) or
            ``"batch"`` (one task run per batch of stages: for high volumes).
        batch_size: stages claimed at once (and per task run in batch granularity).
        concurrency: stages (or batches) run at the same time.
        max_stages / max_seconds: stop claiming after this many stages / seconds.
        lease_seconds: how long a claim is held (default ``TRACKING_LEASE_SECONDS``).
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
    deadline = time.monotonic() + max_seconds if max_seconds else None
    tally = _Tally()
    stopped = "nothing left to run"
    with _tracker_for(process, database_url) as tracker:
        proc = tracker.process(process)
        steps = _steps(proc)
        recovered = tracker.recover_expired_leases(process, limit=100_000)
        progress = create_progress_artifact(
            0.0, key=_artifact_key("resume-progress", process),
            description=f"Resume {process}: starting",
        )
        claim = Claim(tracker, owner, lease)
        next_progress = time.monotonic() + PROGRESS_EVERY_SECONDS
        with ThreadPoolTaskRunner(max_workers=concurrency) as runner:
            for index, (platform, stage) in enumerate(steps):
                while True:
                    if deadline is not None and time.monotonic() >= deadline:
                        stopped = f"time limit of {max_seconds}s reached"
                        break
                    room = None if max_stages is None else max_stages - tally.stages_run
                    if room is not None and room <= 0:
                        stopped = f"limit of {max_stages} stages reached"
                        break
                    limit = batch_size * (concurrency if granularity == "batch" else 1)
                    claimed = tracker.claim(
                        process, platform.code, stage, owner=owner, uuid=uuid,
                        limit=min(limit, room) if room else limit, lease_seconds=lease,
                    )
                    if not claimed:
                        break
                    contexts = [TxContext.of(s, claim) for s in claimed]
                    _run_claimed(runner, platform, stage, contexts, granularity, batch_size)
                    for s in _settle(tracker, contexts):
                        tally.add(s)
                    if time.monotonic() >= next_progress:  # an API call: not every batch
                        next_progress = time.monotonic() + PROGRESS_EVERY_SECONDS
                        update_progress_artifact(
                            progress, 100.0 * index / len(steps),
                            description=f"{platform.code}.{stage}: {tally.stages_run} stages run",
                        )
                if stopped != "nothing left to run":
                    break
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
    _publish_report(process, database_url)
    logger.info("resume %s: %d stages run (%s)", process, tally.stages_run, stopped)
    return summary


def _settle(tracker: Tracker, contexts: list[TxContext]) -> list[TxStage]:
    """The stages as recorded; a stage whose task run ended without recording its attempt
    (timeout, crash) gets a system error now, so nothing waits for its lease to expire."""
    first = contexts[0]
    stages = tracker.get_stages([tx.uuid for tx in contexts], first.platform, first.stage)
    settled = []
    for tx, stage in zip(contexts, stages, strict=True):
        if stage.state == StageState.IN_PROGRESS and stage.lease_owner == tx.claim.owner:  # type: ignore[union-attr]
            stage = record_unfinished(
                tracker, tx, "the task run ended without recording its attempt"
            ) or stage
        settled.append(stage)
    return settled


def _publish_report(process: str, database_url: str | None) -> None:
    """The business picture after the run (the last 7 days), as in ``tracking report``."""
    end = datetime.now(UTC)
    engine = connect(database_url)
    try:
        markdown = summary_markdown(Reports(engine), end - REPORT_WINDOW, end, process)
    finally:
        engine.dispose()
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
