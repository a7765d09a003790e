"""Request and response models of the API, and the validation of what clients send.

Payloads are JSON objects, nested at most ``MAX_PAYLOAD_DEPTH`` levels, whose strings hold
no NUL character and no lone surrogate (neither can be stored by PostgreSQL): the one check
of ``tracking.payloads``, which the store applies to every intake too. Datetimes in query
strings are ISO 8601 (``2026-01-05T09:00:00Z``); naive values are UTC, as in the CLI. List
cursors are opaque strings (base64 of the last row's key).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tracking.api.errors import validation_error
from tracking.models import EventKind, StageState, TxEvent, TxProcess, TxStage, TxState
from tracking.outcomes import ErrorType, Outcome
from tracking.payloads import MAX_PAYLOAD_DEPTH, check_json_value, check_text
from tracking.schedule import MAX_PRIORITY, MIN_PRIORITY, Schedule

CODE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# -- validation helpers ---------------------------------------------------------------------


def is_uuid(value: str) -> bool:
    """True for a canonical (lower-case, hyphenated) UUID, the form transactions use."""
    return bool(_UUID.match(value))


def to_utc(value: datetime | None, name: str) -> datetime | None:
    """A datetime in UTC; naive values are UTC, as everywhere (422 when out of range)."""
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise validation_error(f"{name} is out of range", field=name) from None


def iso_time(value: Any, name: str) -> Any:
    """A point in time of a request body: ISO 8601 text (not a number)."""
    if value is None or isinstance(value, datetime | str):
        return value
    raise ValueError(f"{name} must be ISO 8601 text such as 2026-12-03T08:00Z, got {value!r}")


def aware(value: datetime | None) -> datetime | None:
    """A parsed datetime of a request body in UTC (naive is UTC)."""
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError("out of range") from None


TIME_HELP = "ISO 8601 (2026-12-03T08:00:00Z); naive values are UTC."


def encode_cursor(created_at: datetime, uuid: str) -> str:
    """The opaque cursor after the row ``(created_at, uuid)``."""
    raw = json.dumps([created_at.astimezone(UTC).isoformat(), uuid], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The ``(created_at, uuid)`` in a cursor from ``encode_cursor`` (422 otherwise)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at_text, uuid = json.loads(raw)
        at = datetime.fromisoformat(at_text)
        if at.tzinfo is None or not isinstance(uuid, str) or not is_uuid(uuid):
            raise ValueError("bad cursor content")
        return at.astimezone(UTC), uuid
    except (binascii.Error, ValueError, TypeError, OverflowError, UnicodeDecodeError):
        raise validation_error(
            "cursor is not valid: pass the next_cursor of a previous page", field="cursor"
        ) from None


# -- requests -------------------------------------------------------------------------------


class TransactionIn(BaseModel):
    """A new transaction: the process it belongs to and its business payload."""

    model_config = ConfigDict(extra="forbid")

    process: str = Field(
        min_length=1, max_length=64, pattern=CODE_PATTERN,
        description="Process code, one of GET /processes.",
    )
    payload: dict[str, Any] = Field(
        description=f"The business item: a JSON object, nested at most {MAX_PAYLOAD_DEPTH} "
        "levels. Deduplicated per the process's strategy.",
    )
    source: str | None = Field(
        None, max_length=100, description="Where the item comes from (free text)."
    )
    priority: int = Field(
        0, strict=True, ge=MIN_PRIORITY, le=MAX_PRIORITY,
        description="Higher is claimed first (default 0). Not part of the payload.",
    )
    not_before: datetime | None = Field(
        None, description=f"Its first stage is not due before this. {TIME_HELP}"
    )
    deadline: datetime | None = Field(
        None, description="It should be finished by then: with the process's SLA, the "
        f"earlier of the two makes it overdue (claimed first, reported). {TIME_HELP}",
    )

    @field_validator("payload")
    @classmethod
    def _payload(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_json_value(value)
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str | None) -> str | None:
        return None if value is None else check_text(value, "source")

    @field_validator("not_before", "deadline", mode="before")
    @classmethod
    def _iso(cls, value: Any, info: Any) -> Any:
        return iso_time(value, info.field_name)

    @field_validator("not_before", "deadline")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return aware(value)

    @model_validator(mode="after")
    def _schedule(self) -> TransactionIn:
        self.schedule()  # a deadline before not_before: 422
        return self

    def schedule(self) -> Schedule:
        return Schedule.of(self.priority, self.not_before, self.deadline)


class OperatorAction(BaseModel):
    """Optional body of cancel and requeue (and, with ``until``, of defer)."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(
        None, min_length=1, max_length=1000, description="Why (kept in the audit event)."
    )
    actor: str | None = Field(
        None, min_length=1, max_length=100, description="Who (kept in the audit event)."
    )

    @field_validator("reason", "actor")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("must not be blank")
        return check_text(value, "text")


class DeferAction(OperatorAction):
    """Body of defer: until when (reason and actor optional)."""

    until: datetime = Field(description=f"Its next stage is not due before this. {TIME_HELP}")

    @field_validator("until", mode="before")
    @classmethod
    def _iso(cls, value: Any) -> Any:
        return iso_time(value, "until")

    @field_validator("until")
    @classmethod
    def _utc(cls, value: datetime) -> datetime | None:
        return aware(value)


# -- responses ------------------------------------------------------------------------------


class TransactionOut(BaseModel):
    """A transaction without its stages and events."""

    uuid: str
    process: str
    state: TxState
    business_key: str
    source: str | None
    payload: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    priority: int
    not_before: datetime | None
    deadline: datetime | None
    due_at: datetime | None = Field(
        description="When it is overdue: the earlier of its deadline and created_at + the "
        "process's SLA (null: never)."
    )

    @classmethod
    def of(cls, tx: TxProcess | Any) -> TransactionOut:
        return cls(
            uuid=tx.uuid, process=tx.process_code, state=tx.state, business_key=tx.business_key,
            source=tx.source, payload=tx.payload, created_at=tx.created_at,
            updated_at=tx.updated_at, finished_at=tx.finished_at, priority=tx.priority,
            not_before=tx.not_before, deadline=tx.deadline, due_at=tx.due_at,
        )


class StageOut(BaseModel):
    """One stage of a transaction."""

    seq: int
    platform: str
    stage: str
    state: StageState
    attempt: int
    attempts_allowed: int | None
    next_attempt_at: datetime | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    error_code: int | None
    error_type: ErrorType | None
    error_description: str | None

    @classmethod
    def of(cls, s: TxStage) -> StageOut:
        return cls(
            seq=s.seq, platform=s.platform, stage=s.stage, state=s.state, attempt=s.attempt,
            attempts_allowed=s.attempts_allowed, next_attempt_at=s.next_attempt_at,
            lease_owner=s.lease_owner, lease_expires_at=s.lease_expires_at,
            started_at=s.started_at, finished_at=s.finished_at, error_code=s.error_code,
            error_type=s.error_type, error_description=s.error_description,
        )


class EventOut(BaseModel):
    """One audit event (creation, attempt, lease expiry, operator action)."""

    id: int
    kind: EventKind
    platform: str | None
    stage: str | None
    attempt: int | None
    outcome: Outcome | None
    error_code: int | None
    description: str | None
    traceback: str | None
    from_state: str | None
    to_state: str | None
    tx_state: TxState | None
    actor: str | None
    flow_run_id: str | None
    task_run_id: str | None
    started_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, e: TxEvent) -> EventOut:
        return cls(**{name: getattr(e, name) for name in cls.model_fields})


class TransactionDetail(TransactionOut):
    """A transaction with its stages (in order) and its audit events (oldest first)."""

    stages: list[StageOut]
    events: list[EventOut]

    @classmethod
    def of(cls, tx: TxProcess | Any) -> TransactionDetail:
        base = TransactionOut.of(tx).model_dump()
        return cls(
            **base,
            stages=[StageOut.of(s) for s in tx.stages],
            events=[EventOut.of(e) for e in tx.events],
        )


class TransactionPage(BaseModel):
    """A page of transactions, newest first."""

    items: list[TransactionOut]
    limit: int
    next_cursor: str | None = Field(
        description="Pass as ?cursor= for the next page; null on the last page."
    )


class ProcessResult(TransactionDetail):
    """The transaction after ``POST /transactions/{uuid}/process`` ran it inline."""

    previous_state: TxState
    stages_run: int | None = Field(
        None, description="Stages this call's resume flow ran: at least 1 (a call that ran "
        "none is a 409 ALREADY_PROCESSED); null if the runner does not report it."
    )
    flow_run_id: str | None = Field(None, description="The Prefect flow run that ran them.")


class ProcessQueued(BaseModel):
    """``POST /transactions/{uuid}/process`` handed to a Prefect deployment."""

    uuid: str
    process: str
    state: TxState
    deployment: str
    flow_run_id: str


class RetryOut(BaseModel):
    max_attempts: int | None
    delay: float
    backoff: float
    max_delay: float | None
    jitter: float


class PlatformOut(BaseModel):
    code: str
    order: int
    stages: list[str]
    retry: RetryOut
    concurrency: int | None = Field(
        None, description="At most this many calls at once (sessions); null: no limit."
    )


class DedupOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    strategy: str = Field(description="key_fields, payload_hash or custom.")
    fields: list[str] = Field(description="The key fields (key_fields strategy).")


class ProcessOut(BaseModel):
    code: str
    description: str
    dedup: DedupOut
    sla_seconds: float | None = Field(
        default=None, description="An item not finished this long after it was created is "
        "overdue (null: no SLA).")
    retention_seconds: float | None = Field(
        default=None, description="How long finished transactions are kept (null: forever).")
    platforms: list[PlatformOut]


class ProcessList(BaseModel):
    processes: list[ProcessOut]


class PurgeOut(BaseModel):
    """One row of the purge audit trail: what one purge run deleted of one process."""

    id: int
    run_id: str
    process_code: str
    older_than_seconds: float
    cutoff: datetime = Field(description="Transactions finished before it were purged.")
    started_at: datetime
    purged_at: datetime = Field(description="When its last chunk was deleted.")
    finished_at: datetime | None = Field(description="null: still running, or interrupted.")
    chunks: int
    transactions: int
    stages: int
    events: int
    oldest_finished_at: datetime | None
    newest_finished_at: datetime | None
    archive_path: str | None
    archive_format: str | None
    actor: str | None


class PurgeList(BaseModel):
    purges: list[PurgeOut]


class ComponentHealth(BaseModel):
    status: str = Field(description="ok, error, unreachable or not configured.")
    detail: str | None = None


class Health(BaseModel):
    status: Literal["ok", "degraded"] = Field(
        description="ok, or degraded when Prefect does not answer (the database is required)."
    )
    version: str
    database: ComponentHealth
    prefect: ComponentHealth


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any]


class ErrorEnvelope(BaseModel):
    """The body of every error response."""

    error: ErrorBody
    request_id: str
