"""The application layer: what the CLI, the HTTP API and the flows do, written once.

Each front end reads its settings once, opens an ``App`` and calls it; the rules (which
processes exist, how intake is chunked, what a report window is, what an operator action
on many transactions reports) live here or below, never in a front end.

Example:
    app = App.open(Settings(), migrate=True)
    summary = app.intake("ORDER_CANCELLATION", path="flows/data/cancellations.csv")
    app.run_now("ORDER_CANCELLATION")
    for result in app.requeue_many(uuids, reason="SAP is back", actor="ops"):
        print(result.uuid, result.error or result.tx.state)
    app.close()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tracking.catalog import Process, find_process, load_processes
from tracking.db import connect
from tracking.errors import TrackingError, TransactionNotFound
from tracking.items import IntakeSummary, read_items, take_in
from tracking.models import TxProcess
from tracking.payloads import MAX_SOURCE_LENGTH
from tracking.reports import Reports
from tracking.settings import Settings, use_database
from tracking.store import Tracker


def shown_url(url: str) -> str:
    """A database URL fit for a message: its password masked."""
    try:
        return repr(sa.make_url(url).render_as_string(hide_password=True))
    except Exception:  # not even parseable: say so rather than echo what may hold a secret
        return "(unparseable)"


def configured_processes(settings: Settings) -> list[Process]:
    """The processes of ``TRACKING_PROCESSES`` (``ValueError`` naming the setting)."""
    try:
        return load_processes(settings.processes)
    except ValueError as exc:
        raise ValueError(f"TRACKING_PROCESSES={','.join(settings.processes)}: {exc}") from None


@dataclass(frozen=True)
class ActionResult:
    """What an operator action did to one transaction: the transaction after it, or why not."""

    uuid: str
    tx: TxProcess | None = None
    error: str | None = None


@dataclass
class App:
    """One database and the configured processes, for one front end.

    Args:
        settings: read once by the front end (``Settings()``), never again below it.
        engine: on ``settings.database_url`` (``App.open`` makes it).
    """

    settings: Settings
    engine: Engine
    _tracker: Tracker | None = field(default=None, repr=False)

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool = False) -> App:
        """Connect to ``settings.database_url`` (``ValueError`` for a bad URL, masked)."""
        try:
            engine = connect(settings.database_url, migrate=migrate)
        except (ValueError, sa.exc.ArgumentError) as exc:
            shown = shown_url(settings.database_url)
            raise ValueError(f"bad database URL {shown}: {exc}") from None
        return cls(settings, engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- processes -----------------------------------------------------------------------

    @cached_property
    def processes(self) -> list[Process]:
        """The configured processes, imported once."""
        return configured_processes(self.settings)

    def process(self, code: str) -> Process:
        """The configured process with this code (``UnknownProcessError`` otherwise)."""
        return find_process(self.processes, code)

    def tracker(self) -> Tracker:
        """A tracker with the configured processes registered (once per App)."""
        if self._tracker is None:
            self._tracker = Tracker(self.engine, processes=self.processes)
        return self._tracker

    def operator(self) -> Tracker:
        """A tracker for operator actions and reads: works on every process in the database,
        configured or not, and registers nothing."""
        return Tracker(self.engine)

    def reports(self) -> Reports:
        return Reports(self.engine)

    def check_reported_process(self, code: str | None) -> str | None:
        """Reports may name any process in the database's catalog (``Reports.check_process``)."""
        return self.reports().check_process(code)

    # -- intake and runs -----------------------------------------------------------------

    def intake(
        self,
        process: str,
        items: Sequence[Any] | None = None,
        *,
        path: str | Path | None = None,
        source: str | None = None,
        chunk_size: int | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> IntakeSummary:
        """Take ``items`` (or the items of the file at ``path``) into ``process``."""
        self.process(process)
        if (items is None) == (path is None):
            raise ValueError("give exactly one of items or path")
        if path is not None:
            items = read_items(path)
            source = source or Path(path).name[:MAX_SOURCE_LENGTH]  # a long name still fits
        return take_in(self.tracker(), process, items, source=source, chunk_size=chunk_size,
                       on_chunk=on_chunk)

    def run_now(self, process: str, **options: Any) -> dict[str, Any]:
        """Run the resume flow of ``process`` once, in this process, on this App's database
        (handed over through ``use_database``, never as a flow parameter)."""
        self.process(process)
        from tracking.flows import resume_flow
        from tracking.prefect_server import quiet_settings

        # The URL as configured: the engine's is normalised (postgresql+psycopg://...).
        with quiet_settings(), use_database(self.settings.database_url):
            return resume_flow(process=process, **options)

    # -- operator actions -----------------------------------------------------------------

    def check_transactions(self, uuids: Iterable[str]) -> None:
        """Before an operator action on a list: every uuid must be a transaction, else
        ``TransactionNotFound`` naming all the unknown ones (and nothing is changed)."""
        wanted = list(dict.fromkeys(uuids))
        known = self.reports().existing_uuids(wanted)
        missing = [u for u in wanted if u not in known]
        if missing:
            raise TransactionNotFound(f"unknown transaction(s): {', '.join(missing)}")

    def cancel_many(self, uuids: Iterable[str], *, reason: str, actor: str) -> list[ActionResult]:
        """Cancel each transaction; one result per distinct uuid, in order."""
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError("cancel needs a reason")
        tracker = self.operator()
        return _each(uuids, lambda u: tracker.cancel(u, reason=reason, actor=actor))

    def requeue_many(self, uuids: Iterable[str], *, reason: str, actor: str
                     ) -> list[ActionResult]:
        """Requeue each stopped transaction; one result per distinct uuid, in order."""
        tracker = self.operator()
        return _each(uuids, lambda u: tracker.requeue(u, reason=reason, actor=actor))


def _each(uuids: Iterable[str], action: Callable[[str], TxProcess]) -> list[ActionResult]:
    results = []
    for uuid in dict.fromkeys(uuids):
        try:
            results.append(ActionResult(uuid, tx=action(uuid)))
        except (TrackingError, ValueError) as exc:
            results.append(ActionResult(uuid, error=str(exc)))
    return results
