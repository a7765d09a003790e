"""The ``tracking`` console script (also ``python -m tracking``): operations on the tracker.

Examples:
    tracking db upgrade                    # first, on a new database: only this migrates
    tracking processes
    tracking intake ORDER_CANCELLATION flows/data/cancellations.csv
    tracking run ORDER_CANCELLATION --granularity batch
    tracking tx show 3f0c...               tracking tx requeue 3f0c... 9a41...
    tracking requeue --process ORDER_CANCELLATION --platform SAP --state EXHAUSTED --yes
    tracking report summary --from 2026-01-01 --to 2026-01-31 --format csv
    tracking report html --out report.html
    tracking events send                   # business outcomes as Prefect events (batched)
    tracking purge --older-than 90d        # dry run; --yes --archive purged.jsonl to purge
    tracking zombie-automation             # after `prefect deploy`: kill -9'd runs -> Crashed

The commands are thin: each calls the application layer (``tracking.app.App``), as the HTTP
API does. Per command line, ``main`` reads the settings once (``--database-url`` overriding
``TRACKING_DATABASE_URL``) into an ``Invocation`` that the launcher passes to the command.
Exit codes: 0 done; 1 the operation failed (for example a transaction that cannot be
requeued: reported per uuid, or a database that needs ``tracking db upgrade``); 2 bad input
(unknown process, bad date, unreadable file, unknown uuid): a one-line message on stderr and
nothing changed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import sqlalchemy as sa
from cyclopts import App, CycloptsError, Parameter
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from tracking import __version__
from tracking.cli import db, events, process, report, retention, services, tx
from tracking.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    BadInput,
    Failed,
    Invocation,
    parse_time,
    window,
)
from tracking.cli.render import console
from tracking.errors import TrackingError, TransactionNotFound, UnknownProcessError
from tracking.settings import Settings

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "BadInput", "Failed", "Invocation",
           "app", "main", "parse_time", "window"]

app = App(
    name="tracking",
    help="Operate the transaction tracker: intake, runs, operator actions and reports.\n\n"
    "Exit codes: 0 ok, 1 the operation failed, 2 bad input (nothing changed).",
    version=__version__,
    result_action="return_value",
)
app.command(db.app)
app.command(tx.app)
app.command(report.app)
app.command(events.app)
app.command(process.processes)
app.command(process.intake)
app.command(process.run)
app.command(tx.requeue)
app.command(retention.purge)
app.command(services.api)
app.command(services.serve)
app.command(services.zombie_automation, name="zombie-automation")
app.command(services.demo)


@dataclass(frozen=True)
class Consoles:
    """Where one command line writes: made in ``main``, handed to the launcher."""

    out: Console
    err: Console


def _one_line_error(error: CycloptsError) -> Text:
    return Text(f"tracking: error: {' '.join(str(error).split())}")


def _settings(database_url: str | None) -> Settings:
    """The settings of this command line, read once (``--database-url`` wins)."""
    try:
        return Settings() if database_url is None else Settings(database_url=database_url)
    except ValidationError as exc:
        problems = "; ".join(
            f"TRACKING_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        raise BadInput(f"bad settings: {problems}") from None


@app.meta.default
def launcher(
    *tokens: Annotated[str, Parameter(show=False, allow_leading_hyphen=True)],
    database_url: Annotated[
        str | None,
        Parameter(name="--database-url", help="Tracking database URL (default: "
                  "TRACKING_DATABASE_URL, else sqlite:///tracking.db)."),
    ] = None,
    consoles: Annotated[Consoles, Parameter(parse=False)],
) -> Any:
    """Global options, then the command."""
    command, bound, ignored = app.parse_args(
        tokens, exit_on_error=False, error_formatter=_one_line_error, error_console=consoles.err
    )
    wanted = [name for name, hint in ignored.items() if hint is Invocation]
    if not wanted:  # --help, --version: no settings needed
        return command(*bound.args, **bound.kwargs)
    invocation = Invocation(_settings(database_url), consoles.out, consoles.err,
                            database_url_option=database_url)
    try:
        return command(*bound.args, **bound.kwargs, **dict.fromkeys(wanted, invocation))
    finally:
        invocation.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    consoles = Consoles(console(sys.stdout), console(sys.stderr))
    err = consoles.err

    def error(kind: str, message: str) -> None:
        err.print(f"tracking: {kind}: {message}", soft_wrap=True, markup=False)

    try:
        command, bound, ignored = app.meta.parse_args(
            tokens, exit_on_error=False, error_formatter=_one_line_error, error_console=err
        )
        extra = {name: consoles for name, hint in ignored.items() if hint is Consoles}
        result = command(*bound.args, **bound.kwargs, **extra)
    except CycloptsError:  # already printed, on one line
        return EXIT_BAD_INPUT
    except (BadInput, UnknownProcessError, TransactionNotFound) as exc:
        error("error", str(exc))
        return EXIT_BAD_INPUT
    except (Failed, TrackingError) as exc:  # TrackingError: e.g. "run `tracking db upgrade`"
        error("failed", " ".join(str(exc).split()))
        return EXIT_FAILED
    except sa.exc.SQLAlchemyError as exc:
        error("failed", " ".join(str(exc).split("\n")[0].split()))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else EXIT_OK
