"""What every command module shares: exit codes, errors, the per-invocation context and the
parsing of options (dates, counts).

The context is explicit: ``main`` builds one ``Invocation`` per command line (the settings
read once, the consoles, an ``App`` opened on first use) and the launcher hands it to the
command as its ``cli`` parameter (a cyclopts ``parse=False`` parameter, so it is neither an
option nor shown in ``--help``). Nothing here is a module-level mutable, and nothing edits
``os.environ``.
"""

from __future__ import annotations

import getpass
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Literal

from cyclopts import Parameter
from rich.console import Console

from tracking.app import App, configured_processes
from tracking.catalog import Process
from tracking.db import check_schema
from tracking.reports import DEFAULT_REPORT_WINDOW, report_window
from tracking.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """Bad input from the command line: exit code 2, nothing changed."""


class Failed(Exception):
    """The operation was attempted and failed: exit code 1."""


@dataclass
class Invocation:
    """One command line: its settings (read once, in ``main``), consoles and ``App``.

    Args:
        settings: ``Settings()``, or ``Settings(database_url=...)`` with ``--database-url``.
        database_url_option: the ``--database-url`` given, if any (``serve`` refuses it).
    """

    settings: Settings
    out: Console
    err: Console
    database_url_option: str | None = None
    _app: App | None = field(default=None, repr=False)
    _schema_checked: bool = field(default=False, repr=False)

    def app(self, *, schema: bool = True) -> App:
        """The ``App`` on the settings' database, opened once and never migrated (only
        ``tracking db upgrade`` migrates). With ``schema`` (the default) the schema is checked
        first: an empty or old database is a one-line ``TrackingError`` saying to run
        ``tracking db upgrade``. ``run`` passes ``schema=False``: its flow checks."""
        if self._app is None:
            try:
                self._app = App.open(self.settings)
            except ValueError as exc:  # a bad URL, already masked
                raise BadInput(str(exc)) from None
        if schema and not self._schema_checked:
            check_schema(self._app.engine)
            self._schema_checked = True
        return self._app

    def processes(self) -> list[Process]:
        """The processes of ``TRACKING_PROCESSES`` (no database needed)."""
        with bad_input():
            return configured_processes(self.settings)

    def process(self, code: str) -> Process:
        """The configured process with this code (exit 2 naming the known ones otherwise)."""
        app = self.app(schema=False)
        with bad_input():
            return app.process(code)

    def close(self) -> None:
        if self._app is not None:
            self._app.close()


@contextmanager
def bad_input() -> Iterator[None]:
    """A ``ValueError`` of the app layer (``UnknownProcessError`` among them) as bad input:
    they are raised before anything changes."""
    try:
        yield
    except ValueError as exc:
        raise BadInput(str(exc)) from None


#: The ``cli`` parameter of every command: the invocation, passed by the launcher.
Cli = Annotated[Invocation, Parameter(parse=False)]


def actor() -> str:
    """Who acts, for the audit trail: ``cli:<user>``."""
    try:
        return f"cli:{getpass.getuser()}"[:100]
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "cli"


def positive(name: str, value: int | float | None) -> None:
    if value is not None and value < 1:
        raise BadInput(f"{name} must be at least 1, got {value}")


# -- dates and the report window -------------------------------------------------------------

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
    except (ValueError, OverflowError):
        raise BadInput(
            f"bad date {text!r}: use ISO 8601, e.g. 2026-01-31 or 2026-01-31T08:00 (UTC)"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def window(
    start: str | None, end: str | None, default: timedelta = DEFAULT_REPORT_WINDOW,
    *, now: datetime | None = None,
) -> tuple[datetime, datetime]:
    """The ``[start, end)`` window of ``--from/--to``: the strings parsed here, the window
    itself by ``tracking.reports.report_window`` (the one rule; ``end`` defaults to now)."""
    begin = parse_time(start) if start else None
    stop = parse_time(end, end=True) if end else None
    try:
        return report_window(begin, stop, now=now or datetime.now(UTC), default=default)
    except ValueError as exc:
        # The rule names its bounds "from" and "to"; here they are the options.
        raise BadInput(re.sub(r"\b(from|to) \(", r"--\1 (", str(exc))) from None
