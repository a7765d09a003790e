"""The ``tracking`` console script (also ``python -m tracking``): operations on the tracker.

Examples:
    tracking db upgrade
    tracking processes
    tracking intake ORDER_CANCELLATION flows/data/cancellations.csv
    tracking run ORDER_CANCELLATION --granularity batch
    tracking tx show 3f0c...               tracking tx requeue 3f0c... 9a41...
    tracking requeue --process ORDER_CANCELLATION --platform SAP --state EXHAUSTED --yes
    tracking report summary --from 2026-01-01 --to 2026-01-31 --format csv
    tracking report html --out report.html
    tracking zombie-automation             # after `prefect deploy`: kill -9'd runs -> Crashed

Every command calls the same ``Tracker``/``Reports`` methods as the HTTP API. Exit codes:
0 done; 1 the operation failed (for example a transaction that cannot be requeued: reported
per uuid); 2 bad input (unknown process, bad date, unreadable file, unknown uuid): a one-line
message on stderr and nothing changed.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from cyclopts import App, CycloptsError, Parameter
from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import Engine

from tracking import __version__
from tracking.catalog import Process, load_processes
from tracking.db import connect, create_engine, current_revision, head_revision, upgrade
from tracking.dedup import canonical_json
from tracking.errors import InvalidTransition, TrackingError, TransactionNotFound
from tracking.models import StageState, TxState
from tracking.reports import (
    AgingItem,
    AttemptCount,
    ErrorCount,
    HourlyThroughput,
    PlatformStageStateCount,
    ProcessStateCount,
    Reports,
    StageDuration,
    as_dicts,
    to_csv,
)
from tracking.settings import get_settings, use_database
from tracking.states import REQUEUABLE_TX_STATES
from tracking.store import Tracker

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
INTAKE_CHUNK = 500
SHOWN_ROWS = 50

STATE_STYLES = {
    "PENDING": "blue",
    "IN_PROGRESS": "cyan",
    "COMPLETED": "green",
    "REJECTED": "red",
    "TERMINATED": "yellow",
    "EXHAUSTED": "magenta",
    "CANCELLED": "bright_black",
    "SUCCESS": "green",
    "BUSINESS_ERROR": "red",
    "SYSTEM_ERROR": "yellow",
}


class BadInput(Exception):
    """Bad input from the command line: exit code 2, nothing changed."""


class Failed(Exception):
    """The operation was attempted and failed: exit code 1."""


# -- per-invocation context ------------------------------------------------------------------


@dataclass
class Context:
    """What one command invocation shares: the database URL, engine and consoles."""

    database_url: str | None = None
    out: Console = field(default_factory=lambda: _console(sys.stdout))
    err: Console = field(default_factory=lambda: _console(sys.stderr))
    _engine: Engine | None = None
    _processes: list[Process] | None = None

    def engine(self) -> Engine:
        """The tracking database, migrated (created on first use for SQLite)."""
        if self._engine is None:
            url = self.database_url or get_settings().database_url
            try:
                self._engine = connect(url)
            except (ValueError, sa.exc.ArgumentError) as exc:
                raise BadInput(f"bad database URL {_shown(url)}: {exc}") from None
        return self._engine

    def reports(self) -> Reports:
        return Reports(self.engine())

    def processes(self) -> list[Process]:
        """The processes of TRACKING_PROCESSES (imported once)."""
        if self._processes is None:
            paths = get_settings().processes
            try:
                self._processes = load_processes(paths)
            except ValueError as exc:
                raise BadInput(f"TRACKING_PROCESSES={','.join(paths)}: {exc}") from None
        return self._processes

    def process(self, code: str) -> Process:
        """The process with this code among TRACKING_PROCESSES (``BadInput`` otherwise)."""
        found = {p.code: p for p in self.processes()}
        if code not in found:
            known = ", ".join(sorted(found)) or "none"
            raise BadInput(f"unknown process {code!r} (TRACKING_PROCESSES has: {known})")
        return found[code]

    def tracker(self) -> Tracker:
        """A tracker with every process of TRACKING_PROCESSES registered."""
        return Tracker(self.engine(), processes=self.processes())

    def check_reported_process(self, code: str | None) -> None:
        """Reports may name any process registered in the database (``BadInput`` if none)."""
        if code is None:
            return
        known = self.reports().process_codes()
        if code not in known:
            raise BadInput(
                f"unknown process {code!r} (registered: {', '.join(known) or 'none'})"
            )

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def _shown(url: str) -> str:
    """A database URL fit for a message: its password masked."""
    try:
        return repr(sa.make_url(url).render_as_string(hide_password=True))
    except Exception:  # not even parseable: say so rather than echo what may hold a secret
        return "(unparseable)"


def _console(file: Any) -> Console:
    # Wide enough for uuids in tables when writing to a file or a pipe.
    width = None if getattr(file, "isatty", lambda: False)() else 160
    return Console(file=file, highlight=False, width=width, soft_wrap=file is sys.stderr)


_ctx = Context()


def ctx() -> Context:
    return _ctx


# -- parsing helpers ---------------------------------------------------------------------------

DATE_HELP = (
    "ISO date or date-time (2026-01-31, 2026-01-31T08:00, 2026-01-31T08:00+02:00); "
    "naive values are UTC"
)
From = Annotated[
    str | None,
    Parameter(name="--from", help=f"Start of the window, inclusive. {DATE_HELP}."),
]
To = Annotated[
    str | None,
    Parameter(
        name="--to",
        help=f"End of the window, exclusive; a date alone includes that whole day. {DATE_HELP}."
        " Default: now.",
    ),
]
ProcessFilter = Annotated[str | None, Parameter(name="--process", help="Only this process.")]
ReportFormat = Annotated[
    Literal["table", "csv", "json"], Parameter(name="--format", help="Output format.")
]
ShowFormat = Annotated[Literal["table", "json"], Parameter(name="--format", help="Output format.")]


def parse_time(text: str, *, end: bool = False) -> datetime:
    """An ISO date or date-time as an aware UTC datetime (naive means UTC).

    A date alone is midnight UTC; as the end of a window (``end=True``) it is the next
    midnight, so ``--to 2026-01-31`` includes the 31st.
    """
    try:
        if len(text) == 10:
            day = datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
            return day + timedelta(days=1) if end else day
        value = datetime.fromisoformat(text)
    except ValueError:
        raise BadInput(
            f"bad date {text!r}: use ISO 8601, e.g. 2026-01-31 or 2026-01-31T08:00 (UTC)"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def window(
    start: str | None, end: str | None, default: timedelta = timedelta(days=7)
) -> tuple[datetime, datetime]:
    """The ``[start, end)`` window of ``--from/--to``; defaults: ``end`` now, ``start`` before."""
    stop = parse_time(end, end=True) if end else datetime.now(UTC)
    begin = parse_time(start) if start else stop - default
    if begin > stop:
        raise BadInput(f"--from ({begin.isoformat()}) is after --to ({stop.isoformat()})")
    return begin, stop


def _positive(name: str, value: int | float | None) -> None:
    if value is not None and value < 1:
        raise BadInput(f"{name} must be at least 1, got {value}")


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"[:100]
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "cli"


# -- output helpers ----------------------------------------------------------------------------


def _styled(value: Any) -> Text:
    text = "" if value is None else _plain_text(value)
    return Text(text, style=STATE_STYLES.get(text, ""))


def _plain_text(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(getattr(value, "value", value))


def _table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> Group:
    """A bold title line over a rich table; numeric columns right-aligned; states coloured."""
    rows = [list(r) for r in rows]
    if not rows:
        return Group(Text(title, style="bold"), Text("(none)", style="dim"))
    table = Table(header_style="bold")
    for i, header in enumerate(headers):
        numeric = bool(rows) and all(isinstance(r[i], int | float) for r in rows)
        uuid = header == "uuid"  # never folded: operators copy them
        table.add_column(header, justify="right" if numeric else "left", overflow="fold",
                         no_wrap=uuid, min_width=36 if uuid else None)
    for row in rows:
        table.add_row(*(_styled(v) for v in row))
    return Group(Text(title, style="bold"), table)


def _emit(
    rows: Sequence[Any], fmt: str, row_type: type, as_table: Callable[[], Group]
) -> None:
    """Print report rows as csv, json, or (``table``) what ``as_table`` builds."""
    if fmt == "csv":
        sys.stdout.write(to_csv(rows, [f.name for f in fields(row_type)]))
    elif fmt == "json":
        sys.stdout.write(json.dumps(as_dicts(rows), indent=2) + "\n")
    else:
        ctx().out.print(as_table())


def _pivot(
    title: str, keys: list[tuple[str, ...]], key_headers: Sequence[str],
    counts: dict[tuple[tuple[str, ...], str], int], states: Sequence[str],
) -> Group:
    """Rows per key, a column per state, with row and column totals."""
    rows = []
    for key in keys:
        values = [counts.get((key, s), 0) for s in states]
        rows.append([*key, *values, sum(values)])
    totals = [sum(counts.get((k, s), 0) for k in keys) for s in states]
    group = _table(title, [*key_headers, *states, "Total"], rows)
    table = group.renderables[-1]
    if len(keys) > 1:
        table.add_section()
        table.add_row(
            *[Text("Total", style="bold")] + [Text("")] * (len(key_headers) - 1),
            *(Text(str(n), style="bold") for n in [*totals, sum(totals)]),
        )
    return group


# -- the app -----------------------------------------------------------------------------------

app = App(
    name="tracking",
    help="Operate the transaction tracker: intake, runs, operator actions and reports.\n\n"
    "Exit codes: 0 ok, 1 the operation failed, 2 bad input (nothing changed).",
    version=__version__,
    result_action="return_value",
)
db_app = App(name="db", help="The tracking database (migrations).")
tx_app = App(name="tx", help="One or more transactions by uuid: show, cancel, requeue.")
report_app = App(name="report", help="Reports over a time window (tables, CSV, JSON, HTML).")
app.command(db_app)
app.command(tx_app)
app.command(report_app)


@app.meta.default
def launcher(
    *tokens: Annotated[str, Parameter(show=False, allow_leading_hyphen=True)],
    database_url: Annotated[
        str | None,
        Parameter(name="--database-url", help="Tracking database URL (default: "
                  "TRACKING_DATABASE_URL, else sqlite:///tracking.db)."),
    ] = None,
) -> Any:
    """Global options, then the command."""
    _ctx.database_url = database_url
    return app(tokens)


# -- db ----------------------------------------------------------------------------------------


@db_app.command(name="upgrade")
def db_upgrade(revision: str = "head") -> int:
    """Apply the Alembic migrations (tables and reporting views) up to REVISION.

    Parameters
    ----------
    revision
        Target revision (default: the latest).
    """
    url = ctx().database_url or get_settings().database_url
    try:
        engine = create_engine(url)
    except (ValueError, sa.exc.ArgumentError) as exc:
        raise BadInput(f"bad database URL {_shown(url)}: {exc}") from None
    try:
        before = current_revision(engine)
        upgrade(engine, revision)
        after = current_revision(engine)
    except Exception as exc:  # alembic raises several types for bad revisions
        if "revision" in str(exc).lower() and "Can't locate" in str(exc):
            raise BadInput(f"unknown revision {revision!r}") from None
        raise
    finally:
        engine.dispose()
    ctx().out.print(
        f"database at revision {after} (was {before or 'empty'}; head {head_revision()})"
    )
    return EXIT_OK


# -- catalog and intake ------------------------------------------------------------------------


@app.command
def processes(*, format: ShowFormat = "table") -> int:
    """The processes of TRACKING_PROCESSES: platforms in order, stages, retry policies, dedup."""
    found = ctx().processes()
    if format == "json":
        sys.stdout.write(json.dumps([p.describe() for p in found], indent=2) + "\n")
        return EXIT_OK
    for process in found:
        d = process.describe()
        dedup = d["dedup"]["strategy"] + (
            f" ({', '.join(d['dedup']['fields'])})" if d["dedup"]["fields"] else ""
        )
        rows = [
            [p["order"], p["code"], ", ".join(p["stages"]), _retry_text(p["retry"])]
            for p in d["platforms"]
        ]
        title = f"{process.code}: {process.description or '(no description)'}  [dedup: {dedup}]"
        ctx().out.print(_table(title, ["Order", "Platform", "Stages", "Retry policy"], rows))
    return EXIT_OK


def _retry_text(retry: dict[str, Any]) -> str:
    attempts = retry.get("max_attempts")
    parts = [f"{attempts} attempts" if attempts is not None else "unlimited attempts"]
    if retry.get("delay"):
        parts.append(f"delay {retry['delay']:g}s")
    if retry.get("backoff", 1) != 1:
        parts.append(f"backoff x{retry['backoff']:g}")
    if retry.get("max_delay") is not None:
        parts.append(f"max delay {retry['max_delay']:g}s")
    if retry.get("jitter"):
        parts.append(f"jitter {retry['jitter']:g}s")
    return ", ".join(parts)


@app.command
def intake(
    process: str,
    file: Path,
    /,
    *,
    source: str | None = None,
    chunk_size: int = INTAKE_CHUNK,
    format: ShowFormat = "table",
) -> int:
    """Take the items of FILE into PROCESS: new items become transactions, duplicates are counted.

    FILE is CSV (header row) or JSON lines (.jsonl/.ndjson; .json may hold a list). Every item
    is checked before anything is written.

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
    from tracking.runner import read_items

    proc = ctx().process(process)
    _positive("--chunk-size", chunk_size)
    try:
        items = read_items(file)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    for number, item in enumerate(items, start=1):
        try:
            canonical_json(item)
            proc.dedup.fingerprint(item)
        except ValueError as exc:
            raise BadInput(f"{file}: item {number}: {exc}") from None
    tracker = ctx().tracker()
    new = 0
    with Progress(
        TextColumn("[bold]intake {task.description}"), BarColumn(), MofNCompleteColumn(),
        console=ctx().err, transient=True, disable=not ctx().err.is_terminal,
    ) as progress:
        task = progress.add_task(process, total=len(items))
        for i in range(0, len(items), chunk_size):
            chunk = items[i : i + chunk_size]
            results = tracker.start_many(process, chunk, source=(source or file.name)[:100])
            new += sum(r.is_new for r in results)
            progress.advance(task, len(chunk))
    summary = {"process": process, "file": str(file), "total": len(items), "new": new,
               "duplicates": len(items) - new}
    if format == "json":
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        ctx().out.print(
            f"{process}: {_count(len(items), 'item')} from {file}: [green]{new} new[/], "
            f"{_count(len(items) - new, 'duplicate')}"
        )
    return EXIT_OK


# -- runs and services -------------------------------------------------------------------------


@app.command
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
    ctx().process(process)
    for name, value in (("--batch-size", batch_size), ("--concurrency", concurrency),
                        ("--max-stages", max_stages)):
        _positive(name, value)
    if max_seconds is not None and max_seconds <= 0:
        raise BadInput(f"--max-seconds must be positive, got {max_seconds}")
    from tracking.prefect_server import quiet_settings
    from tracking.runner import resume_flow

    try:
        # Without PREFECT_API_URL the flow starts Prefect's temporary server (stopped at exit).
        with quiet_settings(), use_database(ctx().database_url):
            summary = resume_flow(
                process=process, uuid=uuid, granularity=granularity, batch_size=batch_size,
                concurrency=concurrency, max_stages=max_stages, max_seconds=max_seconds,
            )
    except Exception as exc:
        raise Failed(f"the resume run of {process} failed: {exc}") from exc
    _print_run_summary(summary, format)
    return EXIT_OK


def _print_run_summary(summary: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        sys.stdout.write(json.dumps(summary, default=str, indent=2) + "\n")
        return
    out = ctx().out
    scalars = [[k, v] for k, v in summary.items() if not isinstance(v, dict | list)]
    out.print(_table(f"Run of {summary.get('process', '?')}", ["", "Value"], scalars))
    by_platform = summary.get("by_platform") or {}
    outcomes = list(dict.fromkeys(o for counts in by_platform.values() for o in counts))
    if by_platform:
        rows = [[p, *(c.get(o, 0) for o in outcomes)] for p, c in by_platform.items()]
        out.print(_table("Stages run per platform", ["Platform", *outcomes], rows))
    errors = summary.get("top_errors") or []
    if errors:
        headers = list(errors[0])
        out.print(_table("Top errors", headers, [[e.get(h) for h in headers] for e in errors]))


def _run_service(name: str, call: Callable[[], Any]) -> Any:
    """Run ``call`` (a server or the demo) with --database-url, if given, as
    TRACKING_DATABASE_URL; any error it raises is a failure (exit code 1)."""
    url = ctx().database_url
    previous = os.environ.get("TRACKING_DATABASE_URL")
    if url is not None:
        os.environ["TRACKING_DATABASE_URL"] = url
    try:
        return call()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        raise Failed(f"{name}: {type(exc).__name__}: {exc}") from exc
    finally:
        if url is not None and previous is None:
            os.environ.pop("TRACKING_DATABASE_URL", None)
        elif url is not None:
            os.environ["TRACKING_DATABASE_URL"] = previous


@app.command
def api(*, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Start the HTTP API (uvicorn on tracking.api:app).

    Parameters
    ----------
    host
        Interface to listen on.
    port
        TCP port.
    """
    if not 0 < port < 65536:
        raise BadInput(f"--port must be from 1 to 65535, got {port}")
    import uvicorn

    _run_service("api", lambda: uvicorn.run("tracking.api:app", host=host, port=port))
    return EXIT_OK


@app.command
def serve() -> int:
    """Serve every process's hourly deployment from this process (until Ctrl-C)."""
    def serve_all() -> None:
        from deployments.serve import main as serve_main

        serve_main()

    _run_service("serve", serve_all)
    return EXIT_OK


@app.command(name="zombie-automation")
def zombie_automation() -> int:
    """Create or update the Prefect automation that marks a tracking flow run Crashed when its
    heartbeats stop (its process was killed with kill -9 or its machine died). Run it once
    after `prefect deploy`; running it again updates the automation, never duplicates it.
    """
    from deployments.automations import (
        HEARTBEAT_SECONDS,
        TRACKING_TAG,
        ZOMBIE_AFTER_SECONDS,
        ZOMBIE_AUTOMATION_NAME,
        ensure_zombie_automation,
    )
    from tracking.prefect_server import api_url_configured

    if not api_url_configured():
        raise BadInput("PREFECT_API_URL is not set: point it at the Prefect server of the "
                       "deployments (a temporary server would forget the automation)")
    try:
        automation_id, applied = ensure_zombie_automation()
    except Exception as exc:
        raise Failed(f"zombie-automation: {type(exc).__name__}: {exc}") from exc
    ctx().out.print(
        f"{applied} automation {ZOMBIE_AUTOMATION_NAME!r} ({automation_id}): flow runs tagged "
        f"{TRACKING_TAG!r} become Crashed after {ZOMBIE_AFTER_SECONDS} s without a heartbeat "
        f"(they beat every {HEARTBEAT_SECONDS} s)", markup=False, soft_wrap=True,
    )
    return EXIT_OK


@app.command
def demo() -> int:
    """Run the demo end to end: intake the sample file, run it a few times, print reports."""
    def run_demo() -> Any:
        from flows.demo import main as demo_main

        return demo_main()

    result = _run_service("demo", run_demo)
    return result if isinstance(result, int) else EXIT_OK


# -- transactions ------------------------------------------------------------------------------


@tx_app.command(name="show")
def tx_show(uuid: str, /, *, format: ShowFormat = "table") -> int:
    """One transaction: its stages and its audit trail.

    Parameters
    ----------
    uuid
        Transaction uuid.
    """
    try:
        tx = Tracker(ctx().engine()).get_transaction(uuid)
    except TransactionNotFound as exc:
        raise BadInput(str(exc)) from None
    if format == "json":
        data = as_dicts([tx])[0] | {"stages": as_dicts(tx.stages), "events": as_dicts(tx.events)}
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        return EXIT_OK
    out = ctx().out
    out.print(_table(f"Transaction {tx.uuid}", ["", "Value"], [
        ["process", tx.process_code], ["business key", tx.business_key], ["state", tx.state],
        ["source", tx.source], ["created", tx.created_at], ["updated", tx.updated_at],
        ["finished", tx.finished_at], ["payload", tx.payload],
    ]))
    out.print(_table("Stages", [
        "#", "Platform", "Stage", "State", "Attempts", "Allowed", "Next attempt", "Error",
        "Description",
    ], [
        [s.seq, s.platform, s.stage, s.state, s.attempt,
         "∞" if s.attempts_allowed is None else s.attempts_allowed, s.next_attempt_at,
         s.error_code, s.error_description]
        for s in tx.stages
    ]))
    out.print(_table("Audit trail", [
        "Time", "Event", "Platform.stage", "Try", "Outcome", "Code", "Change", "Actor",
        "Description",
    ], [
        [e.created_at, e.kind, f"{e.platform}.{e.stage}" if e.platform else "", e.attempt,
         e.outcome, e.error_code, f"{e.from_state or ''} → {e.to_state or ''}".strip(" →"),
         e.actor, e.description]
        for e in tx.events
    ]))
    return EXIT_OK


def _check_uuids(uuids: Sequence[str]) -> None:
    if not uuids:
        raise BadInput("give at least one transaction uuid")
    known = ctx().reports().existing_uuids(uuids)
    missing = [u for u in dict.fromkeys(uuids) if u not in known]
    if missing:
        raise BadInput(f"unknown transaction(s): {', '.join(missing)}")


def _act_on_each(
    uuids: Iterable[str], verb: str, action: Callable[[str], Any]
) -> int:
    """Apply an operator action to each uuid, report each result; 1 if any failed."""
    failed = 0
    for uuid in dict.fromkeys(uuids):
        try:
            tx = action(uuid)
        except (TrackingError, ValueError) as exc:
            failed += 1
            ctx().err.print(f"[red]✗[/] {uuid}: {exc}", soft_wrap=True)
        else:
            ctx().out.print(f"[green]✓[/] {uuid}: {verb}, now {tx.state.value}", soft_wrap=True)
    if failed:
        ctx().err.print(f"{failed} of {len(set(uuids))} could not be {verb}")
    return EXIT_FAILED if failed else EXIT_OK


@tx_app.command(name="cancel")
def tx_cancel(*uuids: str, reason: str) -> int:
    """Cancel transactions: their open stages become CANCELLED (audited with the reason).

    Parameters
    ----------
    uuids
        Transaction uuids.
    reason
        Why (kept in the audit trail).
    """
    if not reason.strip():
        raise BadInput("--reason must not be empty")
    _check_uuids(uuids)
    tracker = Tracker(ctx().engine())
    return _act_on_each(uuids, "cancelled",
                        lambda u: tracker.cancel(u, reason=reason, actor=_actor()))


@tx_app.command(name="requeue")
def tx_requeue(*uuids: str, reason: str = "requeued from the CLI") -> int:
    """Requeue stopped transactions (EXHAUSTED, TERMINATED, REJECTED, CANCELLED).

    The stage that stopped and every later one get a fresh set of attempts, due now.

    Parameters
    ----------
    uuids
        Transaction uuids.
    reason
        Why (kept in the audit trail).
    """
    _check_uuids(uuids)
    tracker = ctx().tracker()
    return _act_on_each(uuids, "requeued",
                        lambda u: tracker.requeue(u, reason=reason, actor=_actor()))


@app.command
def requeue(
    *,
    process: str,
    platform: str | None = None,
    state: str = TxState.EXHAUSTED.value,
    limit: int | None = None,
    yes: bool = False,
    reason: str = "bulk requeue from the CLI",
) -> int:
    """Requeue every transaction of a process in a state (a dry run unless --yes).

    Parameters
    ----------
    process
        Process code.
    platform
        Only transactions with a stage of this platform in that state.
    state
        EXHAUSTED, TERMINATED, REJECTED or CANCELLED.
    limit
        At most this many (oldest first).
    yes
        Requeue them; without it nothing changes.
    reason
        Kept in the audit trail.
    """
    proc = ctx().process(process)
    if platform is not None:
        try:
            proc.get_platform(platform)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
    allowed = sorted(s.value for s in REQUEUABLE_TX_STATES)
    if state.upper() not in allowed:
        raise BadInput(f"--state must be one of {', '.join(allowed)}, got {state!r}")
    _positive("--limit", limit)
    found = ctx().reports().requeue_candidates(process, state.upper(), platform=platform,
                                               limit=limit)
    where = f"{process} in {state.upper()}" + (f" at {platform}" if platform else "")
    if not found:
        ctx().out.print(f"nothing to requeue: no transaction of {where}")
        return EXIT_OK
    rows = [[c.uuid, c.business_key, c.state, f"{c.platform}.{c.stage}", c.error_code,
             c.error_description, c.updated_at] for c in found[:SHOWN_ROWS]]
    ctx().out.print(_table(
        f"{len(found)} transaction(s) of {where}",
        ["uuid", "Business key", "State", "Stopped at", "Code", "Error", "Since"], rows,
    ))
    if len(found) > SHOWN_ROWS:
        ctx().out.print(f"... and {len(found) - SHOWN_ROWS} more")
    if not yes:
        ctx().out.print(f"dry run: nothing changed; add --yes to requeue these {len(found)}")
        return EXIT_OK
    tracker = ctx().tracker()
    return _act_on_each([c.uuid for c in found], "requeued",
                        lambda u: tracker.requeue(u, reason=reason, actor=_actor()))


# -- reports -----------------------------------------------------------------------------------


def _report_window(
    start: str | None, end: str | None, process: str | None, default: timedelta
) -> tuple[datetime, datetime]:
    begin, stop = window(start, end, default)
    ctx().check_reported_process(process)
    return begin, stop


def _states_present(rows: Iterable[Any], order: Iterable[Any]) -> list[str]:
    present = {r.state for r in rows}
    return [s.value for s in order if s in present]


@report_app.command
def summary(
    *, from_: From = None, to: To = None, process: ProcessFilter = None,
    format: ReportFormat = "table",
) -> int:
    """Transactions created in the window, by process and state (default: the last 7 days)."""
    start, end = _report_window(from_, to, process, timedelta(days=7))
    rows = ctx().reports().summary_by_process_and_state(start, end, process)

    def as_table() -> Group:
        keys = list(dict.fromkeys((r.process,) for r in rows))
        counts = {((r.process,), r.state.value): r.count for r in rows}
        return _pivot(f"Transactions by state, {_span(start, end)}", keys, ["Process"], counts,
                      _states_present(rows, TxState))

    _emit(rows, format, ProcessStateCount, as_table)
    return EXIT_OK


@report_app.command
def stages(
    *, from_: From = None, to: To = None, process: ProcessFilter = None,
    format: ReportFormat = "table",
) -> int:
    """Stages of transactions created in the window, by platform, stage and state."""
    start, end = _report_window(from_, to, process, timedelta(days=7))
    rows = ctx().reports().stage_summary_by_platform_and_stage(start, end, process)

    def as_table() -> Group:
        keys = list(dict.fromkeys((r.platform, r.stage) for r in rows))
        counts = {((r.platform, r.stage), r.state.value): r.count for r in rows}
        return _pivot(f"Stages by state, {_span(start, end)}", keys, ["Platform", "Stage"],
                      counts, _states_present(rows, StageState))

    _emit(rows, format, PlatformStageStateCount, as_table)
    return EXIT_OK


@report_app.command
def errors(
    *, from_: From = None, to: To = None, process: ProcessFilter = None,
    format: ReportFormat = "table", limit: int = 10,
) -> int:
    """The most frequent error codes of attempts made in the window, with a description.

    Parameters
    ----------
    limit
        How many error codes.
    """
    _positive("--limit", limit)
    start, end = _report_window(from_, to, process, timedelta(days=7))
    rows = ctx().reports().top_errors(start, end, process, limit=limit)
    _emit(rows, format, ErrorCount, lambda: _table(
        f"Top errors, {_span(start, end)}",
        ["Process", "Platform", "Outcome", "Code", "Count", "Last seen", "Description"],
        [[r.process, r.platform, r.outcome, r.error_code, r.count, r.last_seen, r.description]
         for r in rows],
    ))
    return EXIT_OK


@report_app.command
def aging(
    *, from_: From = None, to: To = None, process: ProcessFilter = None,
    format: ReportFormat = "table", limit: int = 50,
) -> int:
    """Transactions still waiting (pending or retrying), oldest first, with their age.

    Without --from/--to every waiting transaction counts.

    Parameters
    ----------
    limit
        How many (the oldest).
    """
    _positive("--limit", limit)
    start = parse_time(from_) if from_ else None
    end = parse_time(to, end=True) if to else None
    ctx().check_reported_process(process)
    rows = ctx().reports().aging(process, start=start, end=end, limit=limit)
    _emit(rows, format, AgingItem, lambda: _table(
        "Waiting transactions, oldest first",
        ["uuid", "Process", "Business key", "State", "Waiting at", "Stage state", "Tries",
         "Next attempt", "Last error", "Created", "Age"],
        [[r.uuid, r.process, r.business_key, r.state, f"{r.platform}.{r.stage}",
          r.stage_state, r.attempts, r.next_attempt_at,
          f"{r.error_code}: {r.error_description or ''}" if r.error_code else "",
          r.created_at, _age(r.age_seconds)] for r in rows],
    ))
    return EXIT_OK


@report_app.command
def throughput(
    *, from_: From = None, to: To = None, process: ProcessFilter = None,
    format: ReportFormat = "table",
) -> int:
    """Transactions finished per UTC hour, by final state (default: the last 24 hours)."""
    start, end = _report_window(from_, to, process, timedelta(hours=24))
    rows = ctx().reports().throughput_by_hour(start, end, process)
    peak = max((r.finished for r in rows), default=0) or 1
    _emit(rows, format, HourlyThroughput, lambda: _table(
        f"Finished per hour, {_span(start, end)}",
        ["Hour (UTC)", "Completed", "Rejected", "Exhausted", "Cancelled", "Total", ""],
        [[r.hour.strftime("%Y-%m-%d %H:00"), r.completed, r.rejected, r.exhausted,
          r.cancelled, r.finished, "█" * round(30 * r.finished / peak)] for r in rows],
    ))
    return EXIT_OK


@report_app.command
def attempts(
    *, from_: From = None, to: To = None, process: ProcessFilter = None,
    format: ReportFormat = "table",
) -> int:
    """How many attempts stages took, per platform (0: not tried yet)."""
    start, end = _report_window(from_, to, process, timedelta(days=7))
    rows = ctx().reports().attempts_distribution(start, end, process)
    _emit(rows, format, AttemptCount, lambda: _table(
        f"Attempts per stage, {_span(start, end)}", ["Platform", "Attempts", "Stages"],
        [[r.platform, r.attempts, r.stages] for r in rows],
    ))
    return EXIT_OK


@report_app.command
def durations(
    *, from_: From = None, to: To = None, process: ProcessFilter = None,
    format: ReportFormat = "table",
) -> int:
    """Attempt durations per platform: mean, p95 and max seconds."""
    start, end = _report_window(from_, to, process, timedelta(days=7))
    rows = ctx().reports().stage_durations(start, end, process)
    _emit(rows, format, StageDuration, lambda: _table(
        f"Attempt durations (seconds), {_span(start, end)}",
        ["Process", "Platform", "Attempts", "Mean", "p95", "Max"],
        [[r.process, r.platform, r.attempts, r.mean_seconds, r.p95_seconds, r.max_seconds]
         for r in rows],
    ))
    return EXIT_OK


@report_app.command
def html(
    *, out: Path, from_: From = None, to: To = None, process: ProcessFilter = None,
    title: str | None = None,
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

    start, end = _report_window(from_, to, process, timedelta(days=7))
    page = render_html(ctx().reports(), start, end, process, title=title)
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise BadInput(f"cannot write {out}: {exc.strerror or exc}") from None
    ctx().out.print(f"wrote {out} ({len(page):,} bytes)")
    return EXIT_OK


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _span(start: datetime, end: datetime) -> str:
    return f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"


def _age(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


# -- entry point -------------------------------------------------------------------------------


def _one_line_error(error: CycloptsError) -> Text:
    return Text(f"tracking: error: {' '.join(str(error).split())}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    global _ctx
    _ctx = Context()
    tokens = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app.meta(tokens, exit_on_error=False, error_formatter=_one_line_error,
                          error_console=_ctx.err)
    except CycloptsError:
        return EXIT_BAD_INPUT
    except BadInput as exc:
        _ctx.err.print(f"tracking: error: {exc}", soft_wrap=True, markup=False)
        return EXIT_BAD_INPUT
    except Failed as exc:
        _ctx.err.print(f"tracking: failed: {exc}", soft_wrap=True, markup=False)
        return EXIT_FAILED
    except (sa.exc.SQLAlchemyError, InvalidTransition) as exc:
        message = " ".join(str(exc).split("\n")[0].split())
        _ctx.err.print(f"tracking: failed: {message}", soft_wrap=True, markup=False)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    finally:
        _ctx.close()
    return result if isinstance(result, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
