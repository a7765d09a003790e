"""SQL reports on the tracking store.

Every report takes a window ``[start, end)`` of timezone-aware datetimes (transactions by
their creation time, errors by when they happened) and an optional process code, and runs
one grouped SQL query.

Example:
    reports = Reports(engine)
    for row in reports.summary_by_state(start, end, process="CANCELLATION"):
        print(row.state, row.count)
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from tracking.db import read_only
from tracking.models import EventKind, StageState, TxEvent, TxProcess, TxStage, TxState
from tracking.outcomes import Outcome

TX = TxProcess.__table__
STAGE = TxStage.__table__
EVENT = TxEvent.__table__


@dataclass(frozen=True)
class StateCount:
    state: TxState
    count: int


@dataclass(frozen=True)
class ProcessStateCount:
    process: str
    state: TxState
    count: int


@dataclass(frozen=True)
class PlatformStateCount:
    platform: str
    state: StageState
    count: int


@dataclass(frozen=True)
class PlatformStageStateCount:
    platform: str
    stage: str
    state: StageState
    count: int


@dataclass(frozen=True)
class ErrorCount:
    process: str
    platform: str
    outcome: Outcome
    error_code: int
    count: int
    last_seen: datetime
    description: str | None


def _check_window(start: datetime, end: datetime) -> None:
    for name, value in (("start", start), ("end", end)):
        if not isinstance(value, datetime):
            raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
        if value.tzinfo is None:
            raise ValueError(f"{name} must be timezone-aware (UTC), got naive {value}")
    if start > end:
        raise ValueError(f"start ({start.isoformat()}) is after end ({end.isoformat()})")


class Reports:
    """Read-only reports over transactions, stages and events."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _rows(self, query: sa.Select[Any]) -> list[sa.Row[Any]]:
        with read_only(self.engine) as conn:
            return list(conn.execute(query).all())

    @staticmethod
    def _tx_window(
        query: sa.Select[Any], start: datetime, end: datetime, process: str | None
    ) -> sa.Select[Any]:
        _check_window(start, end)
        query = query.where(TX.c.created_at >= start, TX.c.created_at < end)
        return query.where(TX.c.process_code == process) if process else query

    def summary_by_state(
        self, start: datetime, end: datetime, process: str | None = None
    ) -> list[StateCount]:
        """Transactions created in the window, counted by state."""
        q = sa.select(TX.c.state, sa.func.count().label("n")).group_by(TX.c.state)
        rows = self._rows(self._tx_window(q, start, end, process).order_by(TX.c.state))
        return [StateCount(TxState(r.state), r.n) for r in rows]

    def summary_by_process_and_state(
        self, start: datetime, end: datetime, process: str | None = None
    ) -> list[ProcessStateCount]:
        """Transactions created in the window, counted by process and state."""
        q = sa.select(TX.c.process_code, TX.c.state, sa.func.count().label("n")).group_by(
            TX.c.process_code, TX.c.state
        )
        q = self._tx_window(q, start, end, process).order_by(TX.c.process_code, TX.c.state)
        return [ProcessStateCount(r.process_code, TxState(r.state), r.n) for r in self._rows(q)]

    def stage_summary_by_platform(
        self, start: datetime, end: datetime, process: str | None = None
    ) -> list[PlatformStateCount]:
        """Stages of transactions created in the window, counted by platform and state."""
        q = (
            sa.select(STAGE.c.platform, STAGE.c.state, sa.func.count().label("n"))
            .select_from(STAGE.join(TX, TX.c.uuid == STAGE.c.uuid))
            .group_by(STAGE.c.platform_order, STAGE.c.platform, STAGE.c.state)
        )
        q = self._tx_window(q, start, end, process).order_by(
            STAGE.c.platform_order, STAGE.c.platform, STAGE.c.state
        )
        return [PlatformStateCount(r.platform, StageState(r.state), r.n) for r in self._rows(q)]

    def stage_summary_by_platform_and_stage(
        self, start: datetime, end: datetime, process: str | None = None
    ) -> list[PlatformStageStateCount]:
        """Stages of transactions created in the window, by platform, stage and state."""
        q = (
            sa.select(STAGE.c.platform, STAGE.c.stage, STAGE.c.state, sa.func.count().label("n"))
            .select_from(STAGE.join(TX, TX.c.uuid == STAGE.c.uuid))
            .group_by(STAGE.c.platform_order, STAGE.c.platform, STAGE.c.seq, STAGE.c.stage,
                      STAGE.c.state)
        )
        q = self._tx_window(q, start, end, process).order_by(
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
        _check_window(start, end)
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
        _check_window(start, end)
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


def _as_utc(value: Any, column_type: Any, dialect: sa.Dialect) -> datetime:
    # Aggregates lose the column type on SQLite (a string comes back): convert explicitly.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return column_type.process_result_value(value, dialect)


def as_dicts(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """Report rows (dataclasses or SQLModel objects) as plain dicts of JSON-friendly values."""
    out = []
    for row in rows:
        data = asdict(row) if is_dataclass(row) else row.model_dump()
        out.append({k: _plain(v) for k, v in data.items()})
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "value") and isinstance(value, str):
        return value.value
    return value


def to_csv(rows: Sequence[Any], columns: Sequence[str] | None = None) -> str:
    """Report rows as CSV text with a header line."""
    dicts = as_dicts(rows)
    if columns is None:
        if dicts:
            columns = list(dicts[0])
        elif rows and is_dataclass(rows[0]):
            columns = [f.name for f in fields(rows[0])]
        else:
            columns = []
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for d in dicts:
        writer.writerow(
            {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in d.items()}
        )
    return buf.getvalue()
