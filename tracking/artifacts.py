"""What a run shows in the Prefect UI: its tally, summary tables and markdown artifacts.

Each resume run publishes a progress artifact while it works, then a table of outcomes per
platform, a markdown summary with the top errors, and the business picture (the report of
the last 7 days); each intake run a table of counts.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tracking.models import StageState, TxStage
from tracking.reports import DEFAULT_REPORT_WINDOW, Reports, summary_markdown
from tracking.store import RecordedAttempt, Tracker


def artifact_key(prefix: str, process: str) -> str:
    """An artifact key (lower case, dashes) for this process."""
    return f"{prefix}-{process.lower().replace('_', '-').replace('.', '-')}"


class Tally:
    """Counts of what a resume run did, per platform and outcome, and its top errors."""

    def __init__(self) -> None:
        self.by_platform: dict[str, Counter[str]] = defaultdict(Counter)
        self.errors: Counter[tuple[str, int, str]] = Counter()
        self.stages_run = 0

    def add(self, stage: TxStage | RecordedAttempt) -> None:
        self.stages_run += 1
        platform, state, code = stage.platform, stage.state, stage.error_code
        self.by_platform[platform][state.value if isinstance(state, StageState) else state] += 1
        if code:
            self.errors[(platform, code, (stage.error_description or "")[:200])] += 1

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


class NoEmptyTraceback(logging.Filter):
    """Prefect logs a failed task run with ``exc_info=True`` even when it failed by returning
    a state (our ``SystemError``), which prints a stray ``NoneType: None``; drop that."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


def quiet_empty_tracebacks() -> None:
    logger = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, NoEmptyTraceback) for f in logger.filters):
        logger.addFilter(NoEmptyTraceback())


def publish_intake(process: str, items: int, new: int, source: str | None) -> None:
    create_table_artifact(
        [{"process": process, "items": items, "new": new, "duplicates": items - new}],
        key=artifact_key("intake", process),
        description=f"Intake of {process}" + (f" from {source}" if source else ""),
    )


def publish_report(process: str, tracker: Tracker) -> None:
    """The business picture after the run (the last 7 days), as in ``tracking report``."""
    end = datetime.now(UTC)
    markdown = summary_markdown(Reports(tracker.engine), end - DEFAULT_REPORT_WINDOW, end, process)
    create_markdown_artifact(
        markdown, key=artifact_key("tracking-report", process),
        description=f"{process}: transactions of the last 7 days by state, stages, top errors",
    )


def publish_summary(process: str, summary: dict[str, Any], tally: Tally) -> None:
    table = tally.table() or [{"platform": "-", "outcome": "nothing to run", "stages": 0}]
    create_table_artifact(
        table, key=artifact_key("resume-outcomes", process),
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
        "\n".join(lines), key=artifact_key("resume-summary", process),
        description=f"Summary of the resume run of {process}",
    )
