"""``Reports``: the SQL reports, each one grouped query over a window ``[start, end)`` of
timezone-aware datetimes (transactions by their creation time, errors by when they happened)
and an optional process code."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from tracking.connections import read_only
from tracking.errors import UnknownProcessError
from tracking.models import (
    EventKind,
    StageState,
    TxProcess,
    TxState,
    utcnow,
)
from tracking.outcomes import Outcome
from tracking.reports.counts import backlogged, counts_query, fold
from tracking.reports.deadlines import DeadlineReports
from tracking.reports.rows import (
    AgingItem,
    AttemptCount,
    ErrorCount,
    HourlyThroughput,
    PlatformStageStateCount,
    PlatformStateCount,
    ProcessStateCount,
    RequeueCandidate,
    StageDuration,
    StateCount,
)
from tracking.reports.tables import (
    CATALOG_PLATFORM,
    CATALOG_PROCESS,
    EVENT,
    STAGE,
    STAGE_2,
    TX,
    with_waiting_stage,
)
from tracking.reports.window import check_window
from tracking.states import REQUEUABLE_TX_STATES, WAITING_TX_STATES


class Reports(DeadlineReports):
    """Read-only reports over transactions, stages and events (``overdue`` and ``sla``:
    ``tracking.reports.deadlines``)."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.clock = clock  # what "now" is (only to choose how to count a window's edges)

    def _rows(self, query: sa.Select[Any]) -> list[sa.Row[Any]]:
        with read_only(self.engine) as conn:
            return list(conn.execute(query).all())

    @staticmethod
    def _tx_window(
        query: sa.Select[Any], start: datetime, end: datetime, process: str | None
    ) -> sa.Select[Any]:
        check_window(start, end)
        query = query.where(TX.c.created_at >= start, TX.c.created_at < end)
        return query.where(TX.c.process_code == process) if process else query

    def summary_by_state(
        self, start: datetime, end: datetime, process: str | None = None
    ) -> list[StateCount]:
        """Transactions created in the window, counted by state."""
        by_state: dict[TxState, int] = {}
        for r in self.summary_by_process_and_state(start, end, process):
            by_state[r.state] = by_state.get(r.state, 0) + r.count
        return [StateCount(s, by_state[s]) for s in sorted(by_state)]

    def summary_by_process_and_state(
        self, start: datetime, end: datetime, process: str | None = None
    ) -> list[ProcessStateCount]:
        """Transactions created in the window, counted by process and state (from the hourly
        counts, ``tracking.reports.counts``: a few hundred rows read whatever the size)."""
        check_window(start, end)
        rows = self._rows(counts_query(start, end, self.clock(), process))
        if backlogged(rows):  # fold for the next ones
            fold(self.engine)
        return [ProcessStateCount(r.process_code, TxState(r.state), int(r.n)) for r in rows]

    @staticmethod
    def _stage_window(
        query: sa.Select[Any], start: datetime, end: datetime, process: str | None
    ) -> sa.Select[Any]:
        # A stage's created_at is its transaction's: no join, an index-only scan.
        check_window(start, end)
        query = query.where(STAGE.c.created_at >= start, STAGE.c.created_at < end)
        return query.where(STAGE.c.process_code == process) if process else query

    def stage_summary_by_platform(
        self, start: datetime, end: datetime, process: str | None = None
    ) -> list[PlatformStateCount]:
        """Stages of transactions created in the window, counted by platform and state."""
        q = sa.select(STAGE.c.platform, STAGE.c.state, sa.func.count().label("n")).group_by(
            STAGE.c.platform_order, STAGE.c.platform, STAGE.c.state
        )
        q = self._stage_window(q, start, end, process).order_by(
            STAGE.c.platform_order, STAGE.c.platform, STAGE.c.state
        )
        return [PlatformStateCount(r.platform, StageState(r.state), r.n) for r in self._rows(q)]

    def stage_summary_by_platform_and_stage(
        self, start: datetime, end: datetime, process: str | None = None
    ) -> list[PlatformStageStateCount]:
        """Stages of transactions created in the window, by platform, stage and state."""
        q = (
            sa.select(STAGE.c.platform, STAGE.c.stage, STAGE.c.state, sa.func.count().label("n"))
            .group_by(STAGE.c.platform_order, STAGE.c.platform, STAGE.c.seq, STAGE.c.stage,
                      STAGE.c.state)
        )
        q = self._stage_window(q, start, end, process).order_by(
            STAGE.c.platform_order, STAGE.c.seq, STAGE.c.state
        )
        return [
            PlatformStageStateCount(r.platform, r.stage, StageState(r.state), r.n)
            for r in self._rows(q)
        ]

    def transactions_between(
        self,
        start: datetime,
        end: datetime,
        process: str | None = None,
        *,
        state: TxState | str | None = None,
        limit: int | None = None,
    ) -> list[TxProcess]:
        """Transactions created in the window, oldest first."""
        check_window(start, end)
        q = select(TxProcess).where(TxProcess.created_at >= start, TxProcess.created_at < end)
        if process:
            q = q.where(TxProcess.process_code == process)
        if state:
            q = q.where(TxProcess.state == TxState(state))
        q = q.order_by(TxProcess.created_at, TxProcess.uuid)  # type: ignore[arg-type]
        if limit:
            q = q.limit(limit)
        with read_only(self.engine) as conn, Session(bind=conn) as session:
            return list(session.exec(q).all())

    def list_transactions(
        self,
        *,
        process: str | None = None,
        state: TxState | str | None = None,
        source: str | None = None,
        created_from: datetime | None = None,
        created_to: datetime | None = None,
        limit: int = 50,
        before: tuple[datetime, str] | None = None,
    ) -> list[TxProcess]:
        """Transactions newest first (``created_at``, then ``uuid``, descending); one query.

        ``created_from`` is inclusive, ``created_to`` exclusive (timezone-aware). ``before`` is
        a keyset cursor, the ``(created_at, uuid)`` of the last row of the previous page: only
        rows after it in this order are returned, so pages stay right while rows are added.
        """
        for name, value in (("created_from", created_from), ("created_to", created_to)):
            if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
                raise ValueError(f"{name} must be a timezone-aware datetime, got {value!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise ValueError(f"limit must be an int from 1 to 10000, got {limit!r}")
        q = select(TxProcess)
        if process:
            q = q.where(TxProcess.process_code == process)
        if state:
            q = q.where(TxProcess.state == TxState(state))
        if source is not None:
            q = q.where(TxProcess.source == source)
        if created_from is not None:
            q = q.where(TxProcess.created_at >= created_from)
        if created_to is not None:
            q = q.where(TxProcess.created_at < created_to)
        if before is not None:
            at, uuid = before
            q = q.where(
                sa.or_(
                    TX.c.created_at < at, sa.and_(TX.c.created_at == at, TX.c.uuid < uuid)
                )
            )
        q = q.order_by(TX.c.created_at.desc(), TX.c.uuid.desc()).limit(limit)
        with read_only(self.engine) as conn, Session(bind=conn) as session:
            return list(session.exec(q).all())

    def top_errors(
        self, start: datetime, end: datetime, process: str | None = None, *, limit: int = 10
    ) -> list[ErrorCount]:
        """The most frequent error codes of attempts made in the window, with a description."""
        check_window(start, end)
        failed = [Outcome.BUSINESS_ERROR, Outcome.SYSTEM_ERROR]
        q = (
            sa.select(
                EVENT.c.process_code,
                EVENT.c.platform,
                EVENT.c.outcome,
                EVENT.c.error_code,
                sa.func.count().label("n"),
                sa.func.max(EVENT.c.created_at).label("last_seen"),
                sa.func.max(EVENT.c.description).label("description"),
            )
            .where(
                EVENT.c.kind.in_([EventKind.ATTEMPT, EventKind.LEASE_EXPIRED]),
                EVENT.c.outcome.in_(failed),
                EVENT.c.created_at >= start,
                EVENT.c.created_at < end,
            )
            .group_by(EVENT.c.process_code, EVENT.c.platform, EVENT.c.outcome, EVENT.c.error_code)
            .order_by(sa.desc("n"), EVENT.c.process_code, EVENT.c.platform, EVENT.c.error_code)
            .limit(limit)
        )
        if process:
            q = q.where(EVENT.c.process_code == process)
        last_seen = EVENT.c.created_at.type
        return [
            ErrorCount(
                r.process_code, r.platform, Outcome(r.outcome), r.error_code, r.n,
                _as_utc(r.last_seen, last_seen, self.engine.dialect), r.description,
            )
            for r in self._rows(q)
        ]

    def aging(
        self,
        process: str | None = None,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        now: datetime | None = None,
        limit: int | None = None,
    ) -> list[AgingItem]:
        """Transactions still waiting, oldest first, with the stage they wait at (one query).

        Waiting means PENDING (nothing ran yet), IN_PROGRESS, or TERMINATED (a system error,
        retried later); the stage is the first one not COMPLETED. ``age_seconds`` is
        ``now - created_at``. ``start``/``end`` limit it to transactions created then.

        Example:
            for item in reports.aging(process="CANCELLATION", limit=20):
                print(item.uuid, item.platform, round(item.age_seconds / 3600, 1), "hours")
        """
        now = _aware(now, "now") or utcnow()
        q = (
            sa.select(
                TX.c.uuid, TX.c.process_code, TX.c.business_key, TX.c.state, TX.c.created_at,
                STAGE.c.platform, STAGE.c.stage, STAGE.c.state.label("stage_state"),
                STAGE.c.attempt, STAGE.c.attempts_allowed, STAGE.c.next_attempt_at,
                STAGE.c.error_code, STAGE.c.error_description,
            )
            .select_from(with_waiting_stage())
            .where(TX.c.state.in_(list(WAITING_TX_STATES)))
            .order_by(TX.c.created_at, TX.c.uuid)
        )
        if process:
            q = q.where(TX.c.process_code == process)
        if _aware(start, "start") is not None:
            q = q.where(TX.c.created_at >= start)
        if _aware(end, "end") is not None:
            q = q.where(TX.c.created_at < end)
        if limit:
            q = q.limit(limit)
        return [
            AgingItem(
                r.uuid, r.process_code, r.business_key, TxState(r.state), r.platform, r.stage,
                StageState(r.stage_state), r.attempt, r.attempts_allowed, r.next_attempt_at,
                r.error_code, r.error_description, r.created_at,
                round((now - r.created_at).total_seconds(), 3),
            )
            for r in self._rows(q)
        ]

    def attempts_distribution(
        self, start: datetime, end: datetime, process: str | None = None
    ) -> list[AttemptCount]:
        """Stages of transactions created in the window, counted by platform and attempts made.

        Example:
            {(r.platform, r.attempts): r.stages for r in reports.attempts_distribution(s, e)}
        """
        q = (
            sa.select(STAGE.c.platform, STAGE.c.attempt, sa.func.count().label("n"))
            .select_from(STAGE.join(TX, TX.c.uuid == STAGE.c.uuid))
            .group_by(STAGE.c.platform_order, STAGE.c.platform, STAGE.c.attempt)
        )
        q = self._tx_window(q, start, end, process).order_by(
            STAGE.c.platform_order, STAGE.c.platform, STAGE.c.attempt
        )
        return [AttemptCount(r.platform, r.attempt, r.n) for r in self._rows(q)]

    def throughput_by_hour(
        self, start: datetime, end: datetime, process: str | None = None
    ) -> list[HourlyThroughput]:
        """Transactions finished per UTC hour of the window, by final state; one row per hour.

        Hours with nothing finished are included with zeros, so the rows chart directly.

        Example:
            for row in reports.throughput_by_hour(now - timedelta(hours=24), now):
                print(row.hour.strftime("%H:00"), row.completed)
        """
        check_window(start, end)
        bucket = _hour_bucket(TX.c.finished_at, self.engine.dialect.name).label("hour")
        inner = sa.select(bucket, TX.c.state).where(
            TX.c.finished_at >= start, TX.c.finished_at < end
        )
        if process:
            inner = inner.where(TX.c.process_code == process)
        finished = inner.subquery()

        def count(state: TxState) -> Any:
            return sa.func.sum(sa.case((finished.c.state == state, 1), else_=0))

        q = sa.select(
            finished.c.hour,
            count(TxState.COMPLETED).label("completed"),
            count(TxState.REJECTED).label("rejected"),
            count(TxState.EXHAUSTED).label("exhausted"),
            count(TxState.CANCELLED).label("cancelled"),
        ).group_by(finished.c.hour)
        found = {_hour_value(r.hour): r for r in self._rows(q)}
        rows = []
        for hour in _hours(start, end):
            r = found.get(hour)
            counts = (r.completed, r.rejected, r.exhausted, r.cancelled) if r else (0, 0, 0, 0)
            rows.append(HourlyThroughput(hour, *(int(n) for n in counts)))
        return rows

    def stage_durations(
        self, start: datetime, end: datetime, process: str | None = None
    ) -> list[StageDuration]:
        """Mean, p95 (nearest rank) and max attempt duration per process and platform.

        Counts the attempts recorded in the window (``started_at`` to the event's
        ``created_at``); one query, the percentile picked in SQL with window functions.

        Example:
            for row in reports.stage_durations(start, end):
                print(row.platform, row.mean_seconds, row.p95_seconds)
        """
        check_window(start, end)
        seconds = _seconds_between(EVENT.c.started_at, EVENT.c.created_at, self.engine.dialect)
        attempts = sa.select(EVENT.c.process_code, EVENT.c.platform, seconds.label("seconds"))
        attempts = attempts.where(
            EVENT.c.kind == EventKind.ATTEMPT,
            EVENT.c.started_at.is_not(None),
            EVENT.c.created_at >= start,
            EVENT.c.created_at < end,
        )
        if process:
            attempts = attempts.where(EVENT.c.process_code == process)
        d = attempts.subquery()
        part = [d.c.process_code, d.c.platform]
        ranked = sa.select(
            d.c.process_code, d.c.platform, d.c.seconds,
            sa.func.row_number().over(partition_by=part, order_by=d.c.seconds).label("rank"),
            sa.func.count().over(partition_by=part).label("n"),
            sa.func.avg(d.c.seconds).over(partition_by=part).label("mean"),
            sa.func.max(d.c.seconds).over(partition_by=part).label("longest"),
        ).subquery()
        catalog = CATALOG_PLATFORM
        q = (
            sa.select(ranked.c.process_code, ranked.c.platform, ranked.c.n, ranked.c.mean,
                      ranked.c.seconds.label("p95"), ranked.c.longest)
            .select_from(ranked.outerjoin(catalog, sa.and_(
                catalog.c.process_code == ranked.c.process_code,
                catalog.c.code == ranked.c.platform,
            )))
            # nearest rank: the smallest rank with rank >= 0.95 * n
            .where(ranked.c.rank * 100 >= ranked.c.n * 95,
                   (ranked.c.rank - 1) * 100 < ranked.c.n * 95)
            .order_by(ranked.c.process_code, catalog.c.platform_order, ranked.c.platform)
        )
        return [
            StageDuration(r.process_code, r.platform, r.n, round(float(r.mean), 3),
                          round(float(r.p95), 3), round(float(r.longest), 3))
            for r in self._rows(q)
        ]

    def requeue_candidates(
        self,
        process: str,
        state: TxState | str = TxState.EXHAUSTED,
        *,
        platform: str | None = None,
        limit: int | None = None,
    ) -> list[RequeueCandidate]:
        """Transactions of ``process`` in ``state`` (one query), oldest change first.

        With ``platform``, only those that have a stage of that platform in that state; each
        row names the first such stage (where the transaction stopped). Used by the bulk
        requeue of the CLI; ``Tracker.requeue`` then acts on each uuid.

        Example:
            uuids = [c.uuid for c in reports.requeue_candidates("CANCELLATION", platform="B")]
        """
        state = TxState(state)
        if state not in REQUEUABLE_TX_STATES:
            allowed = ", ".join(sorted(s.value for s in REQUEUABLE_TX_STATES))
            raise ValueError(f"only {allowed} transactions can be requeued, not {state.value}")
        conditions = [STAGE_2.c.uuid == TX.c.uuid, STAGE_2.c.state == StageState(state.value)]
        if platform:
            conditions.append(STAGE_2.c.platform == platform)
        stopped_at = sa.select(sa.func.min(STAGE_2.c.seq)).where(*conditions).scalar_subquery()
        q = (
            sa.select(
                TX.c.uuid, TX.c.process_code, TX.c.business_key, TX.c.state, TX.c.updated_at,
                STAGE.c.platform, STAGE.c.stage, STAGE.c.error_code, STAGE.c.error_description,
            )
            .select_from(TX.join(STAGE, sa.and_(STAGE.c.uuid == TX.c.uuid,
                                                STAGE.c.seq == stopped_at)))
            .where(TX.c.process_code == process, TX.c.state == state)
            .order_by(TX.c.updated_at, TX.c.uuid)
        )
        if limit:
            q = q.limit(limit)
        return [
            RequeueCandidate(r.uuid, r.process_code, r.business_key, TxState(r.state),
                             r.platform, r.stage, r.error_code, r.error_description,
                             r.updated_at)
            for r in self._rows(q)
        ]

    def existing_uuids(self, uuids: Iterable[str]) -> set[str]:
        """Which of ``uuids`` are transactions (one query per 500 uuids)."""
        wanted = list(dict.fromkeys(uuids))
        found: set[str] = set()
        for i in range(0, len(wanted), 500):
            q = sa.select(TX.c.uuid).where(TX.c.uuid.in_(wanted[i : i + 500]))
            found.update(r.uuid for r in self._rows(q))
        return found

    def process_codes(self) -> list[str]:
        """Codes of every process registered in this database's catalog."""
        q = sa.select(CATALOG_PROCESS.c.code).order_by(CATALOG_PROCESS.c.code)
        return [r.code for r in self._rows(q)]

    def check_process(self, code: str | None) -> str | None:
        """``code`` if reports may name it: any process in the database's catalog, imported
        by this program or not (``UnknownProcessError`` otherwise; None passes)."""
        if code is not None:
            known = self.process_codes()
            if code not in known:
                raise UnknownProcessError(
                    f"unknown process {code!r} (registered: {', '.join(known) or 'none'})"
                )
        return code



def _aware(value: datetime | None, name: str) -> datetime | None:
    if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
        raise ValueError(f"{name} must be a timezone-aware datetime, got {value!r}")
    return value


def _hour_bucket(column: Any, dialect_name: str) -> Any:
    """The UTC hour a timestamp falls in (PostgreSQL: a timestamp; SQLite: text)."""
    if dialect_name == "postgresql":
        utc = sa.func.timezone(sa.literal_column("'UTC'"), column)
        return sa.func.date_trunc(sa.literal_column("'hour'"), utc)
    return sa.func.strftime(sa.literal_column("'%Y-%m-%d %H:00:00'"), column)


def _hour_value(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _hours(start: datetime, end: datetime) -> Iterator[datetime]:
    hour = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    while hour < end:
        yield hour
        hour += timedelta(hours=1)


def _seconds_between(earlier: Any, later: Any, dialect: sa.Dialect) -> Any:
    """``later - earlier`` in seconds, as a float SQL expression."""
    if dialect.name == "postgresql":
        return sa.cast(sa.extract("epoch", later - earlier), sa.Float)
    return (sa.func.julianday(later) - sa.func.julianday(earlier)) * 86400.0


def _as_utc(value: Any, column_type: Any, dialect: sa.Dialect) -> datetime:
    # Aggregates lose the column type on SQLite (a string comes back): convert explicitly.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return column_type.process_result_value(value, dialect)
