"""``tracking purge``: retention. A dry run by default (``App.purge_plan``); with ``--yes``
the finished transactions are archived and deleted in chunks (``App.purge``); ``--history``
shows the audit trail of past purges (``App.purge_history``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from rich.progress import MofNCompleteColumn, Progress, TextColumn

from tracking.app import PurgePlan, PurgeRun
from tracking.cli import render
from tracking.cli.common import EXIT_OK, BadInput, Cli, Failed, Invocation, actor, bad_input
from tracking.retention import format_duration, parse_duration
from tracking.store.retention import MAX_CHUNK, PurgeStopped, PurgeTotals


def purge(
    *,
    older_than: str | None = None,
    process: str | None = None,
    archive: Path | None = None,
    format: Literal["jsonl", "csv"] | None = None,
    chunk_size: int = 500,
    yes: bool = False,
    history: bool = False,
    limit: int = 50,
    cli: Cli,
) -> int:
    """Purge finished transactions: archive them with their stages and events, then delete
    them (a dry run unless --yes).

    Only final transactions (COMPLETED, REJECTED, EXHAUSTED, CANCELLED) that finished before
    now minus the retention are purged, never a waiting or running one.

    Parameters
    ----------
    older_than
        Purge what finished longer ago than this (90d, 12h, 30m, 2w; 1d12h combines).
        Default: each process's own retention (Process(retention=...)); processes without
        one are skipped.
    process
        Only this process.
    archive
        The archive file, appended to (required with --yes). Each chunk is written and
        fsynced before it is deleted.
    format
        jsonl (one JSON object per transaction, stages and events nested) or csv (one row
        per transaction, payload/stages/events as JSON). Default: from the file name
        (.csv is csv, else jsonl).
    chunk_size
        Transactions deleted per database transaction.
    yes
        Archive and delete; without it nothing changes.
    history
        Show the audit trail of past purges instead.
    limit
        Rows of --history.
    """
    if history:
        if yes or older_than is not None or archive is not None:
            raise BadInput("--history only shows past purges: give it alone (or with --process)")
        return _history(cli, process, limit)
    keep = None
    if older_than is not None:
        with bad_input():
            try:
                keep = parse_duration(older_than)
            except ValueError as exc:
                raise ValueError(f"--older-than: {exc}") from None
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise BadInput(f"--chunk-size must be from 1 to {MAX_CHUNK}, got {chunk_size}")
    app = cli.app()
    if not yes:
        with bad_input():
            plan = app.purge_plan(older_than=keep, process=process)
        _show_plan(cli, plan)
        return EXIT_OK
    if archive is None:
        raise BadInput("--yes needs --archive PATH: purged transactions are archived first")
    with Progress(
        TextColumn("[bold]purge {task.description}"), MofNCompleteColumn(),
        console=cli.err, transient=True, disable=not cli.err.is_terminal,
    ) as progress:
        task = progress.add_task("", total=None)

        def advance(code: str, n: int) -> None:
            progress.update(task, description=code, advance=n)

        try:
            with bad_input():  # unknown process, bad archive: raised before anything changes
                run = app.purge(archive=archive, older_than=keep, process=process,
                                format=format, chunk_size=chunk_size, actor=actor(),
                                on_chunk=advance)
        except PurgeStopped as exc:
            _show_totals(cli, exc.totals)
            raise Failed(f"{exc} (what was deleted is in {archive}; run it again to go on)"
                         ) from exc
    _show_run(cli, run)
    return EXIT_OK


def _show_plan(cli: Invocation, plan: PurgePlan) -> None:
    by_process: dict[str, list[list[object]]] = {}
    for p in plan.preview:
        by_process.setdefault(p.process_code, []).append(
            [p.state, p.transactions, p.oldest_finished_at, p.newest_finished_at])
    rows = []
    for target in plan.targets:
        found = by_process.get(target.process_code) or [["(none)", 0, None, None]]
        for state, n, oldest, newest in found:
            rows.append([target.process_code, format_duration(target.older_than),
                         target.cutoff, state, n, oldest, newest])
    if plan.targets:
        cli.out.print(render.table(
            "Would purge (dry run): finished transactions older than the cutoff",
            ["Process", "Older than", "Cutoff", "State", "Transactions", "Oldest finished",
             "Newest finished"], rows,
        ))
    _show_skipped(cli, plan.skipped)
    cli.out.print(
        f"dry run: nothing deleted; {render.count(plan.transactions, 'transaction')} would be "
        "purged" + ("; add --yes --archive PATH to archive and delete them"
                    if plan.transactions else "")
    )


def _show_skipped(cli: Invocation, skipped: list[str]) -> None:
    if skipped:
        cli.out.print(f"skipped, no retention (give --older-than): {', '.join(skipped)}")


def _show_totals(cli: Invocation, totals: list[PurgeTotals]) -> None:
    for t in totals:
        cli.out.print(
            f"{t.process_code}: purged {render.count(t.transactions, 'transaction')} "
            f"({render.count(t.stages, 'stage')}, {render.count(t.events, 'event')}) "
            f"in {render.count(t.chunks, 'chunk')}"
        )


def _show_run(cli: Invocation, run: PurgeRun) -> None:
    cutoffs = {t.process_code: t for t in run.targets}
    for t in run.totals:
        target = cutoffs[t.process_code]
        cli.out.print(
            f"{t.process_code}: purged {render.count(t.transactions, 'transaction')} "
            f"({render.count(t.stages, 'stage')}, {render.count(t.events, 'event')}) "
            f"finished before {render.plain_text(target.cutoff)} UTC "
            f"(older than {format_duration(target.older_than)})"
        )
    _show_skipped(cli, run.skipped)
    cli.out.print(f"archive {run.archive} ({run.format}): "
                  f"{render.count(run.written, 'record')} written")


def _history(cli: Invocation, process: str | None, limit: int) -> int:
    if not 1 <= limit <= 10_000:
        raise BadInput(f"--limit must be from 1 to 10000, got {limit}")
    app = cli.app()
    with bad_input():
        app.check_reported_process(process)
    rows = [
        [r.id, r.process_code, r.started_at, r.finished_at or "not finished",
         format_duration(r.older_than_seconds), r.transactions, r.stages, r.events,
         r.archive_path, r.actor]
        for r in app.purge_history(process, limit=limit)
    ]
    cli.out.print(render.table("Purges (newest first)", [
        "Id", "Process", "Started", "Finished", "Older than", "Transactions", "Stages",
        "Events", "Archive", "Actor",
    ], rows))
    return EXIT_OK
