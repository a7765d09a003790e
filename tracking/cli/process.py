"""The work of a process: ``tracking processes`` (the catalog), ``tracking intake`` (items in,
``App.intake``) and ``tracking run`` (the resume flow once, now: ``App.run_now``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from tracking.cli import render
from tracking.cli.common import EXIT_OK, BadInput, Cli, Failed, Invocation, ShowFormat, positive
from tracking.errors import UnknownProcessError
from tracking.retention import format_duration


def processes(*, format: ShowFormat = "table", cli: Cli) -> int:
    """The processes of TRACKING_PROCESSES: platforms in order, stages, retry policies, session
    limits, dedup, SLA, retention."""
    found = cli.processes()
    if format == "json":
        render.write_json([p.describe() for p in found])
        return EXIT_OK
    for process in found:
        d = process.describe()
        dedup = d["dedup"]["strategy"] + (
            f" ({', '.join(d['dedup']['fields'])})" if d["dedup"]["fields"] else ""
        )
        rows = [
            [p["order"], p["code"], ", ".join(p["stages"]), render.retry_text(p["retry"]),
             "unlimited" if p["concurrency"] is None else p["concurrency"]]
            for p in d["platforms"]
        ]
        keep = ("forever" if process.retention is None
                else f"{format_duration(process.retention)} after finishing")
        sla = "none" if process.sla is None else format_duration(process.sla)
        title = (f"{process.code}: {process.description or '(no description)'}  "
                 f"[dedup: {dedup}; SLA: {sla}; kept: {keep}]")
        cli.out.print(render.table(
            title, ["Order", "Platform", "Stages", "Retry policy", "Sessions"], rows))
    return EXIT_OK


def intake(
    process: str,
    file: Path,
    /,
    *,
    source: str | None = None,
    chunk_size: int = 500,
    format: ShowFormat = "table",
    cli: Cli,
) -> int:
    """Take the items of FILE into PROCESS: new items become transactions, duplicates are counted.

    FILE is CSV (header row) or JSON lines (.jsonl/.ndjson; .json may hold a list). The
    columns (fields) priority, not_before and deadline are an item's schedule, not part of its
    payload; times are ISO 8601, naive ones UTC. Every item is checked before anything is
    written.

    Parameters
    ----------
    process
        Process code.
    file
        CSV or JSON-lines file of items.
    source
        Recorded on each new transaction (default: the file name).
    chunk_size
        Items written per database transaction.
    """
    cli.process(process)
    app = cli.app()
    with Progress(
        TextColumn("[bold]intake {task.description}"), BarColumn(), MofNCompleteColumn(),
        console=cli.err, transient=True, disable=not cli.err.is_terminal,
    ) as progress:
        task = progress.add_task(process, total=None)
        try:
            summary = app.intake(process, path=file, source=source, chunk_size=chunk_size,
                                 on_chunk=lambda n: progress.advance(task, n))
        except ValueError as exc:  # unreadable file, bad item or chunk size: nothing written
            message = str(exc)
            raise BadInput(f"{file}: {message}" if message.startswith("item ") else message
                           ) from None
    if format == "json":
        render.write_json({"process": process, "file": str(file), "total": summary.total,
                           "new": summary.new, "duplicates": summary.duplicates}, indent=None)
    else:
        cli.out.print(
            f"{process}: {render.count(summary.total, 'item')} from {file}: "
            f"[green]{summary.new} new[/], {render.count(summary.duplicates, 'duplicate')}"
        )
    return EXIT_OK


def run(
    process: str,
    /,
    *,
    uuid: str | None = None,
    granularity: Literal["stage", "batch"] = "stage",
    batch_size: int = 100,
    concurrency: int = 8,
    max_stages: int | None = None,
    max_seconds: float | None = None,
    format: ShowFormat = "table",
    cli: Cli,
) -> int:
    """Run the resume flow of PROCESS once, now (what the hourly deployment does).

    Parameters
    ----------
    process
        Process code.
    uuid
        Only this transaction.
    granularity
        One Prefect task run per stage, or per batch of stages (high volumes).
    batch_size
        Stages claimed at once (and per task run with --granularity batch).
    concurrency
        Stages (or batches) run at the same time.
    max_stages
        Stop after this many stages.
    max_seconds
        Stop claiming after this many seconds.
    """
    cli.process(process)
    for name, value in (("--batch-size", batch_size), ("--concurrency", concurrency),
                        ("--max-stages", max_stages)):
        positive(name, value)
    if max_seconds is not None and max_seconds <= 0:
        raise BadInput(f"--max-seconds must be positive, got {max_seconds}")
    # The flow checks the schema (and says to run `tracking db upgrade`); without
    # PREFECT_API_URL it starts Prefect's temporary server, stopped at exit.
    app = cli.app(schema=False)
    try:
        summary = app.run_now(
            process, uuid=uuid, granularity=granularity, batch_size=batch_size,
            concurrency=concurrency, max_stages=max_stages, max_seconds=max_seconds,
        )
    except UnknownProcessError:
        raise
    except Exception as exc:
        raise Failed(f"the resume run of {process} failed: {exc}") from exc
    _print_run_summary(cli, summary, format)
    return EXIT_OK


def _print_run_summary(cli: Invocation, summary: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        render.write_json(summary)
        return
    scalars = [[k, v] for k, v in summary.items() if not isinstance(v, dict | list)]
    cli.out.print(render.table(f"Run of {summary.get('process', '?')}", ["", "Value"], scalars))
    by_platform = summary.get("by_platform") or {}
    outcomes = list(dict.fromkeys(o for counts in by_platform.values() for o in counts))
    if by_platform:
        rows = [[p, *(c.get(o, 0) for o in outcomes)] for p, c in by_platform.items()]
        cli.out.print(render.table("Stages run per platform", ["Platform", *outcomes], rows))
    errors = summary.get("top_errors") or []
    if errors:
        headers = list(errors[0])
        cli.out.print(render.table("Top errors", headers,
                                   [[e.get(h) for h in headers] for e in errors]))
