"""The tracking schema as SQLModel tables.

* ``TxProcess``: one transaction (a business item) of a process, with its payload.
* ``TxStage``: the transaction's passage through one stage of one platform.
* ``TxEvent``: the append-only audit trail (creation, every attempt, operator actions).
* ``CatalogProcess`` / ``CatalogPlatform``: the registered process definitions, so that SQL
  reports and the API see the catalog.
* ``TxPurge``: the audit trail of retention purges (``TxPurging``: what one is deleting now).
* ``TxEventCursor`` / ``TxOverdueSent``: how far the business outcomes of the audit trail were
  sent as events, and which overdue transactions were (``tracking.store.outbox``).

Every timestamp is a timezone-aware UTC datetime (``UTCDateTime`` stores naive UTC on
SQLite and ``timestamptz`` on PostgreSQL).
"""

import enum
import functools
from datetime import UTC, datetime
from typing import Any, Optional, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, Relationship, SQLModel

from tracking.outcomes import ErrorType, Outcome

M = TypeVar("M", bound=SQLModel)


def utcnow() -> datetime:
    return datetime.now(UTC)


def from_row(cls: type[M], values: dict[str, Any]) -> M:
    """An instance of a table model from a whole row read from the database, not validated:
    what ``cls.model_construct(**values)`` builds when every field is given, without its
    per-field alias and default handling (a claim of 500 builds 1,000 instances)."""
    if not cls.__mapper__.configured:  # type: ignore[attr-defined]
        sa.orm.configure_mappers()  # once: an instance's relationships need them set up
    # object.__new__: SQLModel's __new__ only sets the pydantic attributes set below.
    instance = object.__new__(cls)
    object.__setattr__(instance, "__dict__", values)
    object.__setattr__(instance, "__pydantic_fields_set__", set(values))
    object.__setattr__(instance, "__pydantic_extra__", None)
    object.__setattr__(instance, "__pydantic_private__", None)
    return instance


class UTCDateTime(sa.types.TypeDecorator):
    """A datetime column that only takes and gives timezone-aware UTC values."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        value = _as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    # SQLite stores the text SQLAlchemy's DATETIME writes ("YYYY-MM-DD HH:MM:SS.ffffff",
    # naive UTC). These do the same conversions as the two methods above and the DATETIME
    # type below them, with the C-coded isoformat/fromisoformat: a batch converts
    # thousands of timestamps, and the composed conversions cost ~5x as much.
    def bind_processor(self, dialect: sa.Dialect) -> Any:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)
        def process(value: datetime | None) -> str | None:
            return None if value is None else _sqlite_text(_as_utc(value))

        return process

    def result_processor(self, dialect: sa.Dialect, coltype: Any) -> Any:
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)

        def process(value: str | None) -> datetime | None:
            if value is None:
                return None
            parsed = datetime.fromisoformat(value)
            return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)

        return process


def _as_utc(value: datetime) -> datetime:
    """An aware datetime in UTC; a naive one refused."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: timestamps must be timezone-aware")
    return value if value.tzinfo is UTC else value.astimezone(UTC)


@functools.lru_cache(maxsize=64)
def _sqlite_text(value: datetime) -> str:
    """The text SQLite stores for a UTC datetime, made once per instant: one write binds
    the same ``now`` to several columns and statements. UTC values only: in a zone with
    summer time, the two 02:30 of the repeated hour are equal to Python (same zone, same
    wall time) but an hour apart, and would share one cached text."""
    return value.isoformat(" ", "microseconds")[:26]


JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def _enum(cls: type[enum.Enum]) -> sa.Enum:
    # Stored as VARCHAR (no database enum type), so adding a value needs no migration.
    return sa.Enum(cls, native_enum=False, create_constraint=False, length=16)


class StageState(enum.StrEnum):
    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    REJECTED = "REJECTED"
    TERMINATED = "TERMINATED"
    EXHAUSTED = "EXHAUSTED"
    CANCELLED = "CANCELLED"


class TxState(enum.StrEnum):
    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    REJECTED = "REJECTED"
    TERMINATED = "TERMINATED"
    EXHAUSTED = "EXHAUSTED"
    CANCELLED = "CANCELLED"


class EventKind(enum.StrEnum):
    CREATED = "CREATED"
    ATTEMPT = "ATTEMPT"
    LEASE_EXPIRED = "LEASE_EXPIRED"
    # A reserved stage went back to runnable before its attempt started (attempts intact).
    RELEASED = "RELEASED"
    CANCELLED = "CANCELLED"
    REQUEUED = "REQUEUED"
    # An operator postponed a waiting transaction's next stage (``Tracker.defer``).
    DEFERRED = "DEFERRED"


# The moves between these states, and the named sets of them (runnable, final, waiting,
# requeuable), are declared in ``tracking.states``.


class CatalogProcess(SQLModel, table=True):
    """A registered process (what ``Tracker.register`` stores)."""

    __tablename__ = "tx_catalog_process"

    code: str = Field(primary_key=True, max_length=64)
    description: str = Field(default="", sa_type=sa.Text)
    dedup_strategy: str = Field(max_length=32)
    dedup_fields: list[str] = Field(default_factory=list, sa_type=JSONType)
    # How long finished transactions are kept (``Process(retention=...)``); NULL: forever.
    retention_seconds: float | None = None
    # How long an item may take from creation (``Process(sla=...)``); NULL: no SLA.
    sla_seconds: float | None = None
    registered_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class CatalogPlatform(SQLModel, table=True):
    """A registered platform of a process, with its stages and retry policy."""

    __tablename__ = "tx_catalog_platform"

    process_code: str = Field(
        primary_key=True, max_length=64, foreign_key="tx_catalog_process.code"
    )
    code: str = Field(primary_key=True, max_length=64)
    platform_order: int
    stages: list[str] = Field(sa_type=JSONType)
    max_attempts: int | None = None
    delay_seconds: float = 0.0
    backoff: float = 1.0
    max_delay_seconds: float | None = None
    jitter_seconds: float = 0.0
    # Most calls at once across workers (``Platform(concurrency=N)``); NULL: no limit.
    concurrency: int | None = None


class TxProcess(SQLModel, table=True):
    """One transaction: a business item going through the process's platforms."""

    __tablename__ = "tx_process"
    __table_args__ = (
        sa.UniqueConstraint("process_code", "fingerprint", name="uq_tx_process_fingerprint"),
        sa.Index("ix_tx_process_process_state", "process_code", "state"),
        # Covers the summary reports (index-only scans of a time window).
        sa.Index("ix_tx_process_window", "created_at", "process_code", "state"),
        # A purge walks a process's finished transactions oldest first, a chunk at a time.
        sa.Index(
            "ix_tx_process_finished",
            "process_code",
            "finished_at",
            sqlite_where=sa.text("finished_at IS NOT NULL"),
            postgresql_where=sa.text("finished_at IS NOT NULL"),
        ),
        # The overdue report and v_overdue: open transactions by when they are due.
        sa.Index(
            "ix_tx_process_due",
            "due_at",
            "process_code",
            sqlite_where=sa.text("finished_at IS NULL AND due_at IS NOT NULL"),
            postgresql_where=sa.text("finished_at IS NULL AND due_at IS NOT NULL"),
        ),
    )

    uuid: str = Field(primary_key=True, max_length=36)
    process_code: str = Field(max_length=64, foreign_key="tx_catalog_process.code")
    fingerprint: str = Field(max_length=64)
    business_key: str = Field(max_length=200)
    source: str | None = Field(default=None, max_length=100)
    payload: dict[str, Any] = Field(sa_type=JSONType)
    state: TxState = Field(default=TxState.PENDING, sa_type=_enum(TxState))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # The schedule (``tracking.schedule``): claims take higher priority first; the first stage
    # is not due before ``not_before``; ``due_at`` is the earlier of ``deadline`` and
    # ``created_at`` + the process's SLA, fixed at intake (past it, unfinished: overdue).
    priority: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    not_before: datetime | None = Field(default=None, sa_type=UTCDateTime)
    deadline: datetime | None = Field(default=None, sa_type=UTCDateTime)
    due_at: datetime | None = Field(default=None, sa_type=UTCDateTime)

    stages: list["TxStage"] = Relationship(
        sa_relationship_kwargs={"order_by": "TxStage.seq", "lazy": "raise"}
    )
    events: list["TxEvent"] = Relationship(
        sa_relationship_kwargs={"order_by": "TxEvent.id", "lazy": "raise"}
    )


class TxStage(SQLModel, table=True):
    """A transaction's passage through one stage of one platform.

    A stage is runnable exactly when ``next_attempt_at`` is set and due: it is set only while
    the stage is PENDING or TERMINATED, every earlier stage is COMPLETED and attempts remain.
    That keeps "find runnable work" a single index range scan.
    """

    __tablename__ = "tx_stage"
    __table_args__ = (
        sa.UniqueConstraint("uuid", "seq", name="uq_tx_stage_seq"),
        sa.UniqueConstraint("uuid", "platform", "stage", name="uq_tx_stage_platform_stage"),
        # ix_tx_stage_runnable (priority descending) is declared below the class.
        sa.Index(
            "ix_tx_stage_overdue",
            "process_code",
            "platform",
            "stage",
            "due_at",
            "next_attempt_at",
            "id",
            sqlite_where=sa.text("next_attempt_at IS NOT NULL AND due_at IS NOT NULL"),
            postgresql_where=sa.text("next_attempt_at IS NOT NULL AND due_at IS NOT NULL"),
        ),
        sa.Index(
            "ix_tx_stage_lease",
            "process_code",
            "platform",
            "lease_expires_at",
            sqlite_where=sa.text("lease_expires_at IS NOT NULL"),
            postgresql_where=sa.text("lease_expires_at IS NOT NULL"),
        ),
        # Covers the stage reports (index-only scans of a time window).
        sa.Index(
            "ix_tx_stage_window",
            "created_at", "process_code", "platform_order", "platform", "seq", "stage", "state",
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    uuid: str = Field(max_length=36, foreign_key="tx_process.uuid")
    process_code: str = Field(max_length=64)
    platform: str = Field(max_length=64)
    stage: str = Field(max_length=64)
    seq: int
    platform_order: int
    state: StageState = Field(default=StageState.PENDING, sa_type=_enum(StageState))
    attempt: int = 0
    attempts_allowed: int | None = None
    # The retry policy this stage runs under (its platform's when it was created or requeued).
    retry_delay_seconds: float = Field(default=0.0, sa_column_kwargs={"server_default": "0"})
    retry_backoff: float = Field(default=1.0, sa_column_kwargs={"server_default": "1"})
    retry_max_delay_seconds: float | None = None
    retry_jitter_seconds: float = Field(default=0.0, sa_column_kwargs={"server_default": "0"})
    next_attempt_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    lease_owner: str | None = Field(default=None, max_length=100)
    lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # When the current (or last) attempt started. NULL while a stage is IN_PROGRESS means
    # reserved by ``lease_owner`` but not started: no attempt is counted yet.
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    error_code: int | None = None
    error_type: ErrorType | None = Field(default=None, sa_type=_enum(ErrorType))
    error_description: str | None = Field(default=None, sa_type=sa.Text)
    # Always its transaction's created_at, so stage reports need no join.
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # Always its transaction's (set at intake), so claims order and pick by them on the
    # stage's own indexes: higher priority first, overdue (``due_at`` passed) before all.
    priority: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    due_at: datetime | None = Field(default=None, sa_type=UTCDateTime)

    transaction: Optional["TxProcess"] = Relationship(  # noqa: UP045, UP037 (SQLModel needs it)
        sa_relationship_kwargs={"lazy": "raise", "viewonly": True}
    )


# Claims: the due stages of one platform stage, higher priority first, then oldest due (an
# index range scan that stops after the claim's limit; see tracking/store/claims.py).
_STAGE_COLUMNS = TxStage.__table__.c
sa.Index(
    "ix_tx_stage_runnable",
    _STAGE_COLUMNS.process_code,
    _STAGE_COLUMNS.platform,
    _STAGE_COLUMNS.stage,
    _STAGE_COLUMNS.priority.desc(),
    _STAGE_COLUMNS.next_attempt_at,
    _STAGE_COLUMNS.id,
    sqlite_where=sa.text("next_attempt_at IS NOT NULL"),
    postgresql_where=sa.text("next_attempt_at IS NOT NULL"),
)


class TxEvent(SQLModel, table=True):
    """One entry of the audit trail. Rows are never updated or deleted (triggers enforce it)."""

    __tablename__ = "tx_event"
    __table_args__ = (
        sa.Index("ix_tx_event_uuid", "uuid", "id"),
        sa.Index("ix_tx_event_process_created", "process_code", "created_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    uuid: str = Field(max_length=36, foreign_key="tx_process.uuid")
    process_code: str = Field(max_length=64)
    kind: EventKind = Field(sa_type=_enum(EventKind))
    platform: str | None = Field(default=None, max_length=64)
    stage: str | None = Field(default=None, max_length=64)
    attempt: int | None = None
    outcome: Outcome | None = Field(default=None, sa_type=_enum(Outcome))
    error_code: int | None = None
    description: str | None = Field(default=None, sa_type=sa.Text)
    traceback: str | None = Field(default=None, sa_type=sa.Text)
    from_state: str | None = Field(default=None, max_length=16)
    to_state: str | None = Field(default=None, max_length=16)
    tx_state: TxState | None = Field(default=None, sa_type=_enum(TxState))
    actor: str | None = Field(default=None, max_length=100)
    flow_run_id: str | None = Field(default=None, max_length=36)
    task_run_id: str | None = Field(default=None, max_length=36)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)

    @property
    def finished_at(self) -> datetime:
        """When the event was recorded (the end of an attempt)."""
        return self.created_at

    @property
    def duration_ms(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.created_at - self.started_at).total_seconds() * 1000


class TxPurge(SQLModel, table=True):
    """The audit trail of retention purges: one row per purge run and process, written in the
    same database transaction as each chunk it deletes (so its counts are exactly what is
    gone). ``finished_at`` is NULL while the run works, or when it was interrupted."""

    __tablename__ = "tx_purge"
    __table_args__ = (sa.Index("ix_tx_purge_process_started", "process_code", "started_at"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(max_length=36)
    process_code: str = Field(max_length=64)
    older_than_seconds: float
    cutoff: datetime = Field(sa_type=UTCDateTime)
    started_at: datetime = Field(sa_type=UTCDateTime)
    purged_at: datetime = Field(sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    chunks: int = 0
    transactions: int = 0
    stages: int = 0
    events: int = 0
    oldest_finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    newest_finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    archive_path: str | None = Field(default=None, sa_type=sa.Text)
    archive_format: str | None = Field(default=None, max_length=8)
    actor: str | None = Field(default=None, max_length=100)


class TxPurging(SQLModel, table=True):
    """The transactions a purge is deleting right now. Filled and emptied inside each chunk's
    database transaction, so it is empty outside one: the append-only trigger of ``tx_event``
    lets an event be deleted only while its transaction is listed here."""

    __tablename__ = "tx_purging"

    uuid: str = Field(primary_key=True, max_length=36)
    purge_id: int


class TxEventCursor(SQLModel, table=True):
    """How far an emitter has read the audit trail (``tracking.store.outbox``): the business
    outcomes of the events up to ``last_event_id`` are sent. ``owner`` holds the cursor while
    one emitter sends (until ``lease_expires_at``), so two emitters never send a batch twice.
    """

    __tablename__ = "tx_event_cursor"

    name: str = Field(primary_key=True, max_length=64)
    last_event_id: int = 0
    owner: str | None = Field(default=None, max_length=100)
    lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    sent: int = 0
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class TxOverdueSent(SQLModel, table=True):
    """The transactions whose going overdue was sent as an event (``tracking.store.outbox``),
    with the due time it was sent for: one event per transaction and due time. Deleted with
    its transaction."""

    __tablename__ = "tx_overdue_sent"

    uuid: str = Field(primary_key=True, max_length=36, foreign_key="tx_process.uuid",
                      ondelete="CASCADE")
    due_at: datetime = Field(sa_type=UTCDateTime)
    sent_at: datetime = Field(sa_type=UTCDateTime)


class TxCount(SQLModel, table=True):
    """How many transactions of a process created in one UTC hour (``created_hour``, the
    hour's start) are in each state: the summary report adds these up instead of reading
    every transaction (``tracking.reports.counts``). Kept by triggers on ``tx_process``
    (migration 0008) in the same database transaction as each intake, state change and
    purge, so no code path can leave them behind; on PostgreSQL through ``TxCountDelta``."""

    __tablename__ = "tx_count"
    __table_args__ = (sa.Index("ix_tx_count_hour", "created_hour"),)

    process_code: str = Field(primary_key=True, max_length=64)
    created_hour: datetime = Field(primary_key=True, sa_type=UTCDateTime)
    state: TxState = Field(primary_key=True, sa_type=_enum(TxState))
    n: int = 0


class TxCountDelta(SQLModel, table=True):
    """PostgreSQL's changes to ``TxCount`` not folded into it yet: the triggers append here,
    so concurrent writers never wait for one another on the current hour's counts;
    ``tracking.store.counts.fold`` moves them into ``TxCount`` (SQLite, one writer at a
    time, adds to ``TxCount`` directly and leaves this empty)."""

    __tablename__ = "tx_count_delta"

    id: int | None = Field(
        default=None,
        sa_column=sa.Column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                            primary_key=True),
    )
    process_code: str = Field(max_length=64)
    created_hour: datetime = Field(sa_type=UTCDateTime)
    state: TxState = Field(sa_type=_enum(TxState))
    n: int
