"""The rows the reports return: one small frozen dataclass per report."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from tracking.models import (
    StageState,
    TxState,
)
from tracking.outcomes import Outcome


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


@dataclass(frozen=True)
class AgingItem:
    """A transaction still waiting (PENDING, IN_PROGRESS or TERMINATED) and where it waits."""

    uuid: str
    process: str
    business_key: str
    state: TxState
    platform: str
    stage: str
    stage_state: StageState
    attempts: int
    attempts_allowed: int | None
    next_attempt_at: datetime | None
    error_code: int | None
    error_description: str | None
    created_at: datetime
    age_seconds: float


@dataclass(frozen=True)
class AttemptCount:
    """How many stages of a platform took ``attempts`` attempts (0: not tried yet)."""

    platform: str
    attempts: int
    stages: int


@dataclass(frozen=True)
class HourlyThroughput:
    """Transactions that finished in the hour starting at ``hour``, by final state."""

    hour: datetime
    completed: int
    rejected: int
    exhausted: int
    cancelled: int

    @property
    def finished(self) -> int:
        return self.completed + self.rejected + self.exhausted + self.cancelled


@dataclass(frozen=True)
class StageDuration:
    """Attempt durations of one platform: count, mean, 95th percentile (nearest rank), max."""

    process: str
    platform: str
    attempts: int
    mean_seconds: float
    p95_seconds: float
    max_seconds: float


@dataclass(frozen=True)
class RequeueCandidate:
    """A stopped transaction an operator may requeue, with the stage where it stopped."""

    uuid: str
    process: str
    business_key: str
    state: TxState
    platform: str
    stage: str
    error_code: int | None
    error_description: str | None
    updated_at: datetime


@dataclass(frozen=True)
class OverdueItem:
    """A waiting transaction past its due time (the earlier of its deadline and its SLA),
    with the stage it waits at."""

    uuid: str
    process: str
    business_key: str
    state: TxState
    priority: int
    deadline: datetime | None
    due_at: datetime
    platform: str
    stage: str
    stage_state: StageState
    attempts: int
    next_attempt_at: datetime | None
    error_code: int | None
    error_description: str | None
    created_at: datetime
    overdue_seconds: float


@dataclass(frozen=True)
class SlaDay:
    """The transactions of a process created on one UTC day that had a due time: how many
    finished within it, late, and how many are still open (and of those, overdue).
    ``attainment`` is ``within_sla / finished`` (None when none finished)."""

    process: str
    day: date
    sla_seconds: float | None
    transactions: int
    finished: int
    within_sla: int
    late: int
    open: int
    overdue: int
    attainment: float | None
