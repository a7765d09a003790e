"""``tracking report ...``: the ``Reports`` of a window as tables, CSV, JSON or an HTML page.

``--from/--to`` are parsed here (``common.window``) and the window is
``tracking.reports.report_window``'s; ``--process`` may name any process in the database.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cyclopts import App
from rich.console import Group

from tracking.cli import render
from tracking.cli.common import (
    EXIT_OK,
    BadInput,
    Cli,
    From,
    Invocation,
    ProcessFilter,
    ReportFormat,
    To,
    parse_time,
    positive,
    window,
)
from tracking.models import StageState, TxState
from tracking.reports import (
    DEFAULT_REPORT_WINDOW,
    AgingItem,
    AttemptCount,
    ErrorCount,
    HourlyThroughput,
    OverdueItem,
    PlatformStageStateCount,
    ProcessStateCount,
    Reports,
    SlaDay,
    StageDuration,
)
from tracking.retention import format_duration

app = App(name="report", help="Reports over a time window (tables, CSV, JSON, HTML).")

THROUGHPUT_WINDOW = timedelta(hours=24)


def _window(
    cli: Invocation, start: str | None, end: str | None, process: str | None,
    default: timedelta = DEFAULT_REPORT_WINDOW,
) -> tuple[Reports, datetime, datetime]:
    """The reports, and the window of ``--from/--to``, once ``--process`` is known."""
    begin, stop = window(start, end, default)
    cli.app().check_reported_process(process)  # UnknownProcessError: exit 2
    return cli.app().reports(), begin, stop


def _states_present(rows: Iterable[Any], order: Iterable[Any]) -> list[str]:
    present = {r.state for r in rows}
    return [s.value for s in order if s in present]


@app.command
def summary(
    *, from_: From = None, to: To = None, process: ProcessFilter = None,
    format: ReportFormat = "table", cli: Cli,
) -> int:
    """Transactions created in the window, by process and state (default: the last 7 days)."""
    reports, start, end = _window(cli, from_, to, process)
    rows = reports.summary_by_process_and_state(start, end, process)

    def as_table() -> Group:
        keys = list(dict.fromkeys((r.process,) for r in rows))
        counts = {((r.process,), r.state.value): r.count for r in rows}
        return render.pivot(f"Transactions by state, {render.span(start, end)}", keys,
                            ["Process"], counts, _states_present(rows, TxState))

    render.emit(cli.out, rows, format, ProcessStateCount, as_table)
    return EXIT_OK


@app.command
def stages(
    *, from_: From = None, to: To = None, process: ProcessFilter = None,
    format: ReportFormat = "table", cli: Cli,
) -> int:
    """Stages of transactions created in the window, by platform, stage and state."""
    reports, start, end = _window(cli, from_, to, process)
    rows = reports.stage_summary_by_platform_and_stage(start, end, process)

    def as_table() -> Group:
        keys = list(dict.fromkeys((r.platform, r.stage) for r in rows))
        counts = {((r.platform, r.stage), r.state.value): r.count for r in rows}
        return render.pivot(f"Stages by state, {render.span(start, end)}", keys,
                            ["Platform", "Stage"], counts, _states_present(rows, StageState))

    render.emit(cli.out, rows, format, PlatformStageStateCount, as_table)
    return EXIT_OK


@app.command
def errors(
    *, from_: From = None, to: To = None, process: ProcessFilter = None,
    format: ReportFormat = "table", limit: int = 10, cli: Cli,
) -> int:
    """The most frequent error codes of attempts made in the window, with a description.

    Parameters
    ----------
    limit
        How many error codes.
    """
    positive("--limit", limit)
    reports, start, end = _window(cli, from_, to, process)
    rows = reports.top_errors(start, end, process, limit=limit)
    render.emit(cli.out, rows, format, ErrorCount, lambda: render.table(
        f"Top errors, {render.span(start, end)}",
        ["Process", "Platform", "Outcome", "Code", "Count", "Last seen", "Description"],
        [[r.process, r.platform, r.outcome, r.error_code, r.count, r.last_seen, r.description]
         for r in rows],
    ))
    return EXIT_OK


@app.command
def aging(
    *, from_: From = None, to: To = None, process: ProcessFilter = None,
    format: ReportFormat = "table", limit: int = 50, cli: Cli,
) -> int:
    """Transactions still waiting (pending or retrying), oldest first, with their age.

    Without --from/--to every waiting transaction counts.

    Parameters
    ----------
    limit
        How many (the oldest).
    """
    positive("--limit", limit)
    start = parse_time(from_) if from_ else None
    end = parse_time(to, end=True) if to else None
    cli.app().check_reported_process(process)
    rows = cli.app().reports().aging(process, start=start, end=end, limit=limit)
    render.emit(cli.out, rows, format, AgingItem, lambda: render.table(
        "Waiting transactions, oldest first",
        ["uuid", "Process", "Business key", "State", "Waiting at", "Stage state", "Tries",
         "Next attempt", "Last error", "Created", "Age"],
        [[r.uuid, r.process, r.business_key, r.state, f"{r.platform}.{r.stage}",
          r.stage_state, r.attempts, r.next_attempt_at,
          f"{r.error_code}: {r.error_description or ''}" if r.error_code else "",
          r.created_at, render.age(r.age_seconds)] for r in rows],
    ))
    return EXIT_OK


@app.command
def overdue(
    *, process: ProcessFilter = None, format: ReportFormat = "table", limit: int = 50,
    cli: Cli,
) -> int:
    """Transactions still waiting past their due time (the earlier of their deadline and
    their process's SLA), most overdue first, with where they wait.

    Parameters
    ----------
    limit
        How many (the most overdue).
    """
    positive("--limit", limit)
    cli.app().check_reported_process(process)
    rows = cli.app().reports().overdue(process, limit=limit)
    render.emit(cli.out, rows, format, OverdueItem, lambda: render.table(
        "Overdue transactions, most overdue first",
        ["uuid", "Process", "Business key", "State", "Priority", "Due", "Overdue by",
         "Waiting at", "Tries", "Next attempt", "Last error"],
        [[r.uuid, r.process, r.business_key, r.state, r.priority, r.due_at,
          render.age(r.overdue_seconds), f"{r.platform}.{r.stage}", r.attempts,
          r.next_attempt_at,
          f"{r.error_code}: {r.error_description or ''}" if r.error_code else ""]
         for r in rows],
    ))
    return EXIT_OK


@app.command
def sla(
    *, from_: From = None, to: To = None, process: ProcessFilter = None,
    format: ReportFormat = "table", cli: Cli,
) -> int:
    """SLA attainment per process and UTC creation day: of the transactions with a due time,
    finished within it, late, still open and overdue (default: the last 7 days)."""
    reports, start, end = _window(cli, from_, to, process)
    rows = reports.sla(start, end, process)

    def percent(value: float | None) -> str:
        return "–" if value is None else f"{value:.1%}"

    render.emit(cli.out, rows, format, SlaDay, lambda: render.table(
        f"SLA attainment, {render.span(start, end)}",
        ["Process", "Day", "SLA", "Created", "Finished", "Within SLA", "Late", "Open",
         "Overdue", "Attainment"],
        [[r.process, r.day.isoformat(),
          "–" if r.sla_seconds is None else format_duration(r.sla_seconds), r.transactions,
          r.finished, r.within_sla, r.late, r.open, r.overdue, percent(r.attainment)]
         for r in rows],
    ))
    return EXIT_OK


@app.command
def throughput(
    *, from_: From = None, to: To = None, process: ProcessFilter = None,
    format: ReportFormat = "table", cli: Cli,
) -> int:
    """Transactions finished per UTC hour, by final state (default: the last 24 hours)."""
    reports, start, end = _window(cli, from_, to, process, THROUGHPUT_WINDOW)
    rows = reports.throughput_by_hour(start, end, process)
    peak = max((r.finished for r in rows), default=0) or 1
    render.emit(cli.out, rows, format, HourlyThroughput, lambda: render.table(
        f"Finished per hour, {render.span(start, end)}",
        ["Hour (UTC)", "Completed", "Rejected", "Exhausted", "Cancelled", "Total", ""],
        [[r.hour.strftime("%Y-%m-%d %H:00"), r.completed, r.rejected, r.exhausted,
          r.cancelled, r.finished, "█" * round(30 * r.finished / peak)] for r in rows],
    ))
    return EXIT_OK


@app.command
def attempts(
    *, from_: From = None, to: To = None, process: ProcessFilter = None,
    format: ReportFormat = "table", cli: Cli,
) -> int:
    """How many attempts stages took, per platform (0: not tried yet)."""
    reports, start, end = _window(cli, from_, to, process)
    rows = reports.attempts_distribution(start, end, process)
    render.emit(cli.out, rows, format, AttemptCount, lambda: render.table(
        f"Attempts per stage, {render.span(start, end)}", ["Platform", "Attempts", "Stages"],
        [[r.platform, r.attempts, r.stages] for r in rows],
    ))
    return EXIT_OK


@app.command
def durations(
    *, from_: From = None, to: To = None, process: ProcessFilter = None,
    format: ReportFormat = "table", cli: Cli,
) -> int:
    """Attempt durations per platform: mean, p95 and max seconds."""
    reports, start, end = _window(cli, from_, to, process)
    rows = reports.stage_durations(start, end, process)
    render.emit(cli.out, rows, format, StageDuration, lambda: render.table(
        f"Attempt durations (seconds), {render.span(start, end)}",
        ["Process", "Platform", "Attempts", "Mean", "p95", "Max"],
        [[r.process, r.platform, r.attempts, r.mean_seconds, r.p95_seconds, r.max_seconds]
         for r in rows],
    ))
    return EXIT_OK


@app.command
def html(
    *, out: Path, from_: From = None, to: To = None, process: ProcessFilter = None,
    title: str | None = None, cli: Cli,
) -> int:
    """Write a self-contained HTML report (charts and tables; opens without network).

    Parameters
    ----------
    out
        The HTML file to write.
    title
        Page title (default: "Tracking report").
    """
    from tracking.report_html import render_html

    reports, start, end = _window(cli, from_, to, process)
    page = render_html(reports, start, end, process, title=title)
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise BadInput(f"cannot write {out}: {exc.strerror or exc}") from None
    cli.out.print(f"wrote {out} ({len(page):,} bytes)")
    return EXIT_OK
