"""The deadline reports of ``Reports``: what is overdue now, and SLA attainment per day.

A transaction's due time (``tx_process.due_at``) is the earlier of its own deadline and its
creation time plus its process's SLA, fixed at intake (``tracking.schedule``). It is
*overdue* while it waits (``WAITING_TX_STATES``) past that time; it finished *within its
SLA* when it reached a final state (any: completed, rejected, exhausted, cancelled) by then.
The SQL views ``v_overdue`` and ``v_sla_daily`` (migration 0006) give the same rows.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tracking.models import StageState, TxState, utcnow
from tracking.reports.rows import OverdueItem, SlaDay
from tracking.reports.tables import CATALOG_PROCESS, STAGE, TX, with_waiting_stage
from tracking.reports.window import check_window
from tracking.states import WAITING_TX_STATES


def _aware(value: datetime | None, name: str) -> datetime:
    if value is None:
        return utcnow()
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {value!r}")
    return value


def _open_overdue(now: datetime) -> Any:
    """Waiting past the due time (``finished_at IS NULL``: on ix_tx_process_due)."""
    return sa.and_(TX.c.state.in_(list(WAITING_TX_STATES)), TX.c.finished_at.is_(None),
                   TX.c.due_at.is_not(None), TX.c.due_at <= now)


class DeadlineReports:
    """``Reports.overdue`` and ``Reports.sla`` (``Reports`` inherits them)."""

    engine: Engine

    def _rows(self, query: sa.Select[Any]) -> list[sa.Row[Any]]:
        raise NotImplementedError

    def overdue(
        self, process: str | None = None, *, now: datetime | None = None,
        limit: int | None = None,
    ) -> list[OverdueItem]:
        """Waiting transactions past their due time, most overdue first, with the stage each
        waits at (its first stage not COMPLETED); one query.

        Example:
            for item in reports.overdue("CANCELLATION", limit=20):
                print(item.uuid, item.platform, round(item.overdue_seconds / 3600, 1), "h late")
        """
        now = _aware(now, "now")
        q = (
            sa.select(
                TX.c.uuid, TX.c.process_code, TX.c.business_key, TX.c.state, TX.c.priority,
                TX.c.deadline, TX.c.due_at, TX.c.created_at, STAGE.c.platform, STAGE.c.stage,
                STAGE.c.state.label("stage_state"), STAGE.c.attempt, STAGE.c.next_attempt_at,
                STAGE.c.error_code, STAGE.c.error_description,
            )
            .select_from(with_waiting_stage())
            .where(_open_overdue(now))
            .order_by(TX.c.due_at, TX.c.uuid)
        )
        if process:
            q = q.where(TX.c.process_code == process)
        if limit:
            q = q.limit(limit)
        return [
            OverdueItem(
                r.uuid, r.process_code, r.business_key, TxState(r.state), r.priority,
                r.deadline, r.due_at, r.platform, r.stage, StageState(r.stage_state),
                r.attempt, r.next_attempt_at, r.error_code, r.error_description, r.created_at,
                round((now - r.due_at).total_seconds(), 3),
            )
            for r in self._rows(q)
        ]

    def sla(
        self, start: datetime, end: datetime, process: str | None = None, *,
        now: datetime | None = None,
    ) -> list[SlaDay]:
        """SLA attainment per process and UTC creation day of the window: of the
        transactions created that day with a due time, how many finished within it, late,
        are still open, and of those overdue at ``now`` (one grouped query).

        Example:
            for day in reports.sla(now - timedelta(days=7), now, "CANCELLATION"):
                print(day.day, day.attainment, day.overdue)
        """
        check_window(start, end)
        now = _aware(now, "now")
        created_day = _day(TX.c.created_at, self.engine.dialect.name).label("day")

        def count(*conditions: Any) -> Any:
            return sa.func.sum(sa.case((sa.and_(*conditions), 1), else_=0))

        inner = sa.select(TX.c.process_code, created_day, TX.c.finished_at, TX.c.due_at).where(
            TX.c.created_at >= start, TX.c.created_at < end, TX.c.due_at.is_not(None)
        )
        if process:
            inner = inner.where(TX.c.process_code == process)
        d = inner.subquery()
        q = (
            sa.select(
                d.c.process_code, d.c.day, CATALOG_PROCESS.c.sla_seconds,
                sa.func.count().label("transactions"),
                count(d.c.finished_at.is_not(None)).label("finished"),
                count(d.c.finished_at.is_not(None), d.c.finished_at <= d.c.due_at).label("within"),
                count(d.c.finished_at.is_not(None), d.c.finished_at > d.c.due_at).label("late"),
                count(d.c.finished_at.is_(None)).label("open"),
                count(d.c.finished_at.is_(None), d.c.due_at <= now).label("overdue"),
            )
            .select_from(d.outerjoin(CATALOG_PROCESS, CATALOG_PROCESS.c.code == d.c.process_code))
            .group_by(d.c.process_code, d.c.day, CATALOG_PROCESS.c.sla_seconds)
            .order_by(d.c.process_code, d.c.day)
        )
        rows = []
        for r in self._rows(q):
            finished, within = int(r.finished), int(r.within)
            rows.append(SlaDay(
                r.process_code, _day_value(r.day), r.sla_seconds, int(r.transactions),
                finished, within, int(r.late), int(r.open), int(r.overdue),
                round(within / finished, 4) if finished else None,
            ))
        return rows


def _day(column: Any, dialect_name: str) -> Any:
    """The UTC day a timestamp falls on (PostgreSQL: a date; SQLite: ``YYYY-MM-DD`` text)."""
    if dialect_name == "postgresql":
        return sa.cast(sa.func.timezone(sa.literal_column("'UTC'"), column), sa.Date)
    return sa.func.date(column)


def _day_value(value: Any) -> date:
    if isinstance(value, datetime):
        return value.astimezone(UTC).date()
    return value if isinstance(value, date) else date.fromisoformat(value)
