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
    plan = app.purge_plan(older_than=timedelta(days=90))      # a dry run: what would go
    run = app.purge(archive="purged.jsonl", older_than=timedelta(days=90), actor="ops")
    delivery = app.send_events()       # business outcomes as Prefect events (batched)
    app.close()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tracking.catalog import Process, find_process, load_processes
from tracking.db import connect
from tracking.errors import TrackingError, TransactionNotFound
from tracking.items import IntakeSummary, read_items, take_in
from tracking.models import TxProcess, utcnow
from tracking.payloads import MAX_SOURCE_LENGTH
from tracking.reports import Reports
from tracking.retention import Archive
from tracking.schedule import check_time
from tracking.settings import Settings, use_database
from tracking.store import Tracker, outbox
from tracking.store.retention import (
    DEFAULT_CHUNK,
    PurgePreview,
    PurgeRecord,
    PurgeTotals,
    Target,
    check_chunk_size,
    retentions,
)


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

    def defer_many(self, uuids: Iterable[str], *, until: datetime | str, reason: str,
                   actor: str) -> list[ActionResult]:
        """Defer each waiting transaction until ``until`` (an aware datetime, or ISO 8601
        text where naive is UTC: ``2026-12-03T08:00Z``); one result per distinct uuid, in
        order. A bad or past ``until`` is a ``ValueError`` before anything changes."""
        tracker = self.operator()
        at = check_time(until, "until")
        if at is None or at <= tracker.clock():
            raise ValueError(f"until must be in the future, got {until!r}")
        return _each(uuids, lambda u: tracker.defer(u, until=at, reason=reason, actor=actor))

    # -- retention -------------------------------------------------------------------------

    def purge_targets(
        self, older_than: timedelta | None = None, process: str | None = None,
        *, now: datetime | None = None,
    ) -> tuple[list[Target], list[str]]:
        """The targets of a purge, and the processes skipped (no retention).

        With ``older_than`` every process of the database's catalog (or only ``process``) is
        purged of what finished before ``now - older_than``; without it each process by its
        own retention (``Process(retention=...)``, as stored in the catalog; the configured
        processes are registered first, so the catalog has their current retention), and a
        process without one is skipped.
        """
        if older_than is not None and (
            not isinstance(older_than, timedelta) or older_than <= timedelta(0)
        ):
            raise ValueError(f"older_than must be a duration longer than zero, got {older_than!r}")
        self.tracker()  # the catalog of the configured processes, current
        if process is not None:
            self.check_reported_process(process)  # UnknownProcessError naming the known ones
        kept = retentions(self.engine)
        codes = [process] if process is not None else list(kept)
        now = now or utcnow()
        targets, skipped = [], []
        for code in codes:
            keep = older_than
            if keep is None and kept.get(code) is not None:
                keep = timedelta(seconds=kept[code])
            if keep is None:
                skipped.append(code)
                continue
            try:
                cutoff = now - keep
            except OverflowError:
                raise ValueError(f"a retention of {keep} reaches before the year 1") from None
            targets.append(Target(code, keep, cutoff))
        return targets, skipped

    def purge_plan(
        self, *, older_than: timedelta | None = None, process: str | None = None,
        now: datetime | None = None,
    ) -> PurgePlan:
        """A dry run: what ``purge`` would delete now (nothing is deleted)."""
        targets, skipped = self.purge_targets(older_than, process, now=now)
        return PurgePlan(targets, skipped, self.operator().purge_preview(targets))

    def purge(
        self, *, archive: str | Path, older_than: timedelta | None = None,
        process: str | None = None, format: str | None = None,
        chunk_size: int = DEFAULT_CHUNK, actor: str | None = None,
        on_chunk: Callable[[str, int], None] | None = None, now: datetime | None = None,
    ) -> PurgeRun:
        """Archive to ``archive`` (appended: JSON lines, or CSV; see ``tracking.retention``)
        and delete what ``purge_plan`` shows, ``chunk_size`` transactions per database
        transaction, each chunk durable in the archive before it is deleted."""
        check_chunk_size(chunk_size)
        targets, skipped = self.purge_targets(older_than, process, now=now)
        with Archive(archive, format) as sink:
            written = 0

            def write(records: list[Any]) -> None:
                nonlocal written
                written += sink.write(records)

            totals = self.operator().purge(
                targets, write, chunk_size=chunk_size, actor=actor,
                archive_path=str(sink.path), archive_format=sink.format, on_chunk=on_chunk,
            )
        return PurgeRun(targets, skipped, totals, sink.path, sink.format, written)

    def purge_history(self, process: str | None = None, *, limit: int = 100
                      ) -> list[PurgeRecord]:
        """The purge audit trail, newest first."""
        return self.operator().purge_history(process, limit=limit)

    # -- business outcomes as Prefect events ------------------------------------------------

    def send_events(
        self, *, batch_size: int = outbox.DEFAULT_BATCH, max_events: int | None = None,
        wait_seconds: float = 0.0,
    ) -> outbox.Delivery:
        """Send every business outcome not sent yet (final states, overdue transactions) as
        a Prefect event to the server of ``PREFECT_API_URL``, ``batch_size`` per API call
        (``tracking.prefect_events``); each resume run does it as it ends. Raises
        ``outbox.DeliveryFailed`` (what was sent stays sent; the rest goes next time)."""
        from tracking.prefect_events import send_outcome_events

        return send_outcome_events(self.engine, batch_size=batch_size, max_events=max_events,
                                   wait_seconds=wait_seconds)

    def pending_events(self, *, limit: int = 100) -> list[outbox.OutcomeEvent]:
        """The outcomes ``send_events`` would send next (a dry run: nothing is sent)."""
        return outbox.pending(self.engine, limit=limit)

    def events_status(self) -> outbox.CursorState:
        """How far the outcomes were sent, and how many wait."""
        return outbox.cursor_state(self.engine)


@dataclass(frozen=True)
class PurgePlan:
    """What a purge covers: a target per process (its cutoff), the processes skipped for
    having no retention (only without ``older_than``), and what would be deleted now."""

    targets: list[Target]
    skipped: list[str]
    preview: list[PurgePreview]

    @property
    def transactions(self) -> int:
        return sum(p.transactions for p in self.preview)


@dataclass(frozen=True)
class PurgeRun:
    """What a purge did: per target, what it deleted; the archive and its records written."""

    targets: list[Target]
    skipped: list[str]
    totals: list[PurgeTotals]
    archive: Path
    format: str
    written: int


def _each(uuids: Iterable[str], action: Callable[[str], TxProcess]) -> list[ActionResult]:
    results = []
    for uuid in dict.fromkeys(uuids):
        try:
            results.append(ActionResult(uuid, tx=action(uuid)))
        except (TrackingError, ValueError) as exc:
            results.append(ActionResult(uuid, error=str(exc)))
    return results
