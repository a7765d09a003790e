"""The tracker: every state change of transactions and stages goes through here.

Example:
    engine = connect("sqlite:///tracking.db")
    tracker = Tracker(engine, processes=[process])
    uuid, is_new = tracker.start_or_resume("CANCELLATION", {"request_id": "FE-1"})
    for stage in tracker.claim("CANCELLATION", "A", owner="run-42"):
        tracker.complete_stage(stage.uuid, "A", 0, owner="run-42")

Each public method is one database transaction: the audit event and the transition it
records commit together or not at all. Several workers may share a database: ``claim``
reserves each runnable stage for one worker only (PostgreSQL ``FOR UPDATE SKIP LOCKED``,
SQLite ``BEGIN IMMEDIATE``), and starts and completions are fenced by the claim's owner.

An attempt counts when it starts, not when it is reserved::

    claim       PENDING|TERMINATED -> IN_PROGRESS, started_at NULL (reserved, attempt unchanged)
    start       reserved -> started: attempt + 1, lease = now + lease_seconds (a stuck call
                loses it then)
    complete    started (or reserved: the start is implied) -> the outcome's state
    renew       a live run keeps its reservations' leases from expiring (``renew_reservations``)
    release     reserved -> back to runnable with its attempts intact (a RELEASED event)
    recover     an expired reservation is released; an expired started attempt is lost
                (a LEASE_EXPIRED system error)

Locks are always taken stage rows first, then the transaction row, so concurrent workers
and operators cannot deadlock.
"""

from __future__ import annotations

import math
import random
import uuid as uuid_lib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.orm import selectinload
from sqlmodel import Session, select

from tracking.catalog import Platform, Process
from tracking.db import read_only
from tracking.dedup import canonical_json
from tracking.errors import (
    InvalidTransition,
    LeaseLost,
    TransactionNotFound,
    UnknownProcessError,
)
from tracking.models import (
    FINAL_STAGE_STATES,
    FINAL_TX_STATES,
    OPEN_STAGE_STATES,
    CatalogPlatform,
    CatalogProcess,
    EventKind,
    StageState,
    TxEvent,
    TxProcess,
    TxStage,
    TxState,
    utcnow,
)
from tracking.outcomes import ExecutionResult, Outcome, to_result

TX = TxProcess.__table__
STAGE = TxStage.__table__
EVENT = TxEvent.__table__
MAX_OWNER_LENGTH = 100
MAX_CLAIM = 10_000  # most stages one claim may reserve
MAX_SOURCE_LENGTH = 100

# The hot paths' statements are built once: SQLAlchemy then reuses their compiled form
# instead of rebuilding and re-hashing a statement on every call.
_SELECT_FINGERPRINTS = sa.select(TX.c.fingerprint, TX.c.uuid).where(
    TX.c.process_code == sa.bindparam("b_process"),
    TX.c.fingerprint.in_(sa.bindparam("b_fingerprints", expanding=True)),
)
_INSERT_STAGES = sa.insert(STAGE)
_INSERT_EVENT = sa.insert(EVENT)
_LOCK_STAGES = (
    sa.select(STAGE)
    .where(STAGE.c.uuid == sa.bindparam("b_uuid"))
    .order_by(STAGE.c.seq)
    .with_for_update()
)
_LOCK_TX = sa.select(TX).where(TX.c.uuid == sa.bindparam("b_uuid")).with_for_update()
# SET clauses come from the column names in the parameters of each call.
_UPDATE_STAGE = sa.update(STAGE).where(STAGE.c.id == sa.bindparam("b_id"))
_UPDATE_STAGE_FENCED = _UPDATE_STAGE.where(STAGE.c.state == sa.bindparam("b_state"))
_CANCEL_OTHER_STAGES = sa.update(STAGE).where(
    STAGE.c.uuid == sa.bindparam("b_uuid"),
    STAGE.c.id != sa.bindparam("b_id"),
    STAGE.c.state.in_([StageState.PENDING, StageState.TERMINATED]),
)
_UPDATE_TX = sa.update(TX).where(TX.c.uuid == sa.bindparam("b_uuid"))
# A stage IN_PROGRESS is either reserved (no attempt started yet) or running an attempt.
_RESERVED = sa.and_(STAGE.c.state == StageState.IN_PROGRESS, STAGE.c.started_at.is_(None))
_START_ATTEMPT = (
    sa.update(STAGE)
    .where(
        STAGE.c.uuid == sa.bindparam("b_uuid"),
        STAGE.c.platform == sa.bindparam("b_platform"),
        STAGE.c.stage == sa.bindparam("b_stage"),
        STAGE.c.lease_owner == sa.bindparam("b_owner"),
        _RESERVED,
    )
    .values(
        attempt=STAGE.c.attempt + 1,
        started_at=sa.bindparam("b_now"),
        lease_expires_at=sa.bindparam("b_expires"),
        updated_at=sa.bindparam("b_now"),
    )
    .returning(STAGE.c.attempt)
)
_TX_STARTED = sa.update(TX).where(
    TX.c.uuid == sa.bindparam("b_uuid"), TX.c.state.in_([TxState.PENDING, TxState.TERMINATED])
)
_TX_COLUMNS = ("uuid", "process_code", "fingerprint", "business_key", "source", "payload",
               "state", "created_at", "updated_at")
_INSERT_ONE_TRANSACTION = (
    sa.text(
        f"INSERT INTO tx_process ({', '.join(_TX_COLUMNS)}) "
        f"VALUES ({', '.join(':' + c for c in _TX_COLUMNS)}) "
        "ON CONFLICT (process_code, fingerprint) DO NOTHING RETURNING fingerprint"
    )
    .bindparams(*(sa.bindparam(c, type_=TX.c[c].type) for c in _TX_COLUMNS))
    .columns(TX.c.fingerprint)
)


@dataclass(frozen=True)
class Intake:
    """What ``start_many`` did with one payload."""

    uuid: str
    is_new: bool


def _insert(dialect: sa.Dialect, table: sa.Table) -> Any:
    """An INSERT with the dialect's ON CONFLICT support (PostgreSQL or SQLite)."""
    return (postgresql.insert if dialect.name == "postgresql" else sqlite.insert)(table)


def _validate_payload(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, Mapping):
        raise ValueError(f"payload must be a JSON object (a mapping), got {type(payload).__name__}")
    canonical_json(payload)  # raises ValueError when not JSON-serialisable
    for key in payload:
        if not isinstance(key, str):
            raise ValueError(f"payload keys must be strings, got {key!r}")
    return dict(payload)


def _validate_source(source: str | None) -> str | None:
    if source is not None and (not isinstance(source, str) or len(source) > MAX_SOURCE_LENGTH):
        raise ValueError(f"source must be a string of at most {MAX_SOURCE_LENGTH} characters")
    return source


def _label(row: Any) -> str:
    return f"stage {row.platform}.{row.stage} of transaction {row.uuid}"


class Tracker:
    """Tracks transactions of registered processes in the database behind ``engine``.

    Args:
        engine: from ``tracking.connect()``.
        processes: processes to register right away.
        clock: returns the current UTC time (tests pass a fake clock).
        rng: random source for retry jitter.
    """

    def __init__(
        self,
        engine: Engine,
        processes: Iterable[Process] = (),
        *,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        # ON CONFLICT DO NOTHING: a concurrent submission of the same item wins quietly.
        self._insert_transactions = (
            _insert(engine.dialect, TX)
            .on_conflict_do_nothing(index_elements=["process_code", "fingerprint"])
            .returning(TX.c.fingerprint)
        )
        self.clock = clock
        self.rng = rng or random.Random()
        self._processes: dict[str, Process] = {}
        for process in processes:
            self.register(process)

    # -- catalog ---------------------------------------------------------------------------

    def register(self, process: Process) -> Process:
        """Make ``process`` known to this tracker and store its catalog in the database."""
        if not isinstance(process, Process):
            raise TypeError(f"expected a Process, got {process!r}")
        if not process.platforms:
            raise ValueError(f"process {process.code!r} has no platforms")
        now = self.clock()
        dedup = process.dedup.describe()
        with self.engine.begin() as conn:
            stmt = _insert(conn.dialect, CatalogProcess.__table__).values(
                code=process.code,
                description=process.description,
                dedup_strategy=dedup["strategy"],
                dedup_fields=dedup["fields"],
                registered_at=now,
                updated_at=now,
            )
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["code"],
                    set_={
                        "description": stmt.excluded.description,
                        "dedup_strategy": stmt.excluded.dedup_strategy,
                        "dedup_fields": stmt.excluded.dedup_fields,
                        "updated_at": stmt.excluded.updated_at,
                    },
                )
            )
            platforms = CatalogPlatform.__table__
            conn.execute(sa.delete(platforms).where(platforms.c.process_code == process.code))
            conn.execute(
                sa.insert(platforms),
                [
                    {
                        "process_code": process.code,
                        "code": p.code,
                        "platform_order": p.order,
                        "stages": list(p.stages),
                        "max_attempts": p.retry.max_attempts,
                        "delay_seconds": p.retry.delay,
                        "backoff": p.retry.backoff,
                        "max_delay_seconds": p.retry.max_delay,
                        "jitter_seconds": p.retry.jitter,
                    }
                    for p in process.platforms
                ],
            )
        self._processes[process.code] = process
        return process

    @property
    def processes(self) -> list[Process]:
        return list(self._processes.values())

    def process(self, code: str) -> Process:
        """The registered process with this code (``UnknownProcessError`` otherwise)."""
        try:
            return self._processes[code]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self._processes)) or "none"
            raise UnknownProcessError(f"unknown process {code!r} (registered: {known})") from None

    def _platform_stage(
        self, process_code: str, platform: str, stage: str | None
    ) -> tuple[Process, Platform, str]:
        process = self.process(process_code)
        p = process.get_platform(platform)
        return process, p, p.resolve_stage(stage)

    # -- intake ----------------------------------------------------------------------------

    def start_or_resume(
        self, process_code: str, payload: Mapping[str, Any], *, source: str | None = None
    ) -> tuple[str, bool]:
        """Create the transaction for ``payload`` with all its stages, unless it exists.

        Returns ``(uuid, is_new)``; a duplicate (same dedup fingerprint) returns the existing
        transaction's uuid with ``is_new=False`` and changes nothing.
        """
        (result,) = self.start_many(process_code, [payload], source=source)
        return result.uuid, result.is_new

    def start_many(
        self,
        process_code: str,
        payloads: Sequence[Mapping[str, Any]],
        *,
        source: str | None = None,
    ) -> list[Intake]:
        """Bulk ``start_or_resume``: one database transaction for the whole batch.

        Every payload is validated before anything is written; one bad payload rejects the
        batch with an error naming its index.
        """
        process = self.process(process_code)
        source = _validate_source(source)
        prepared: list[tuple[dict[str, Any], str, str]] = []
        for index, payload in enumerate(payloads):
            try:
                clean = _validate_payload(payload)
                prepared.append(
                    (clean, process.dedup.fingerprint(clean), process.dedup.business_key(clean))
                )
            except ValueError as exc:
                prefix = f"payload #{index}: " if len(payloads) > 1 else ""
                raise ValueError(f"{prefix}{exc}") from None
        if not prepared:
            return []
        now = self.clock()
        new_rows: dict[str, dict[str, Any]] = {}
        for payload, fp, key in prepared:
            if fp not in new_rows:
                new_rows[fp] = {
                    "uuid": str(uuid_lib.uuid4()),
                    "process_code": process_code,
                    "fingerprint": fp,
                    "business_key": key[:200],
                    "source": source,
                    "payload": payload,
                    "state": TxState.PENDING,
                    "created_at": now,
                    "updated_at": now,
                }
        with self.engine.begin() as conn:
            rows = list(new_rows.values())
            # SQLAlchemy never caches a compiled ON CONFLICT insert; for the one-item path
            # (start_or_resume) the same SQL as text is compiled once and reused.
            stmt = _INSERT_ONE_TRANSACTION if len(rows) == 1 else self._insert_transactions
            inserted = conn.execute(stmt, rows[0] if len(rows) == 1 else rows)
            created = {r.fingerprint for r in inserted}
            duplicates = [fp for fp in new_rows if fp not in created]
            existing = self._uuids_by_fingerprint(conn, process_code, duplicates)
            if created:
                txs = [row for fp, row in new_rows.items() if fp in created]
                self._insert_stages(conn, process, txs, now)
        results = []
        for _, fp, _ in prepared:
            if fp in created:
                results.append(Intake(new_rows[fp]["uuid"], True))
                created.discard(fp)  # a repeat of the item later in the batch is a duplicate
                existing[fp] = new_rows[fp]["uuid"]
            else:
                results.append(Intake(existing[fp], False))
        return results

    @staticmethod
    def _uuids_by_fingerprint(
        conn: Connection, process_code: str, fingerprints: list[str]
    ) -> dict[str, str]:
        found: dict[str, str] = {}
        for i in range(0, len(fingerprints), 500):
            params = {"b_process": process_code, "b_fingerprints": fingerprints[i : i + 500]}
            found.update(
                {r.fingerprint: r.uuid for r in conn.execute(_SELECT_FINGERPRINTS, params)}
            )
        return found

    @staticmethod
    def _insert_stages(
        conn: Connection, process: Process, txs: list[dict[str, Any]], now: datetime
    ) -> None:
        plan = [(s, process.get_platform(s.platform).retry) for s in process.stage_plan()]
        stage_rows = []
        event_rows = []
        for tx in txs:
            for planned, policy in plan:
                stage_rows.append(
                    {
                        "uuid": tx["uuid"],
                        "process_code": process.code,
                        "platform": planned.platform,
                        "stage": planned.stage,
                        "seq": planned.seq,
                        "platform_order": planned.platform_order,
                        "state": StageState.PENDING,
                        "attempt": 0,
                        "attempts_allowed": policy.max_attempts,
                        # Only the first stage is reachable; the others wait for it.
                        "next_attempt_at": now if planned.seq == 1 else None,
                        "created_at": now,
                        "updated_at": now,
                    }
                )
            event_rows.append(
                {
                    "uuid": tx["uuid"],
                    "process_code": process.code,
                    "kind": EventKind.CREATED,
                    "tx_state": TxState.PENDING,
                    "description": f"created from {tx['source']}" if tx["source"] else "created",
                    "created_at": now,
                }
            )
        conn.execute(_INSERT_STAGES, stage_rows)
        conn.execute(_INSERT_EVENT, event_rows)

    # -- finding and claiming work ---------------------------------------------------------

    def _runnable(
        self, process_code: str, platform: str, stage: str, now: datetime
    ) -> sa.Select[Any]:
        # Matches ix_tx_stage_runnable: an index range scan that stops after `limit` rows.
        return (
            sa.select(STAGE.c.id)
            .where(
                STAGE.c.process_code == process_code,
                STAGE.c.platform == platform,
                STAGE.c.stage == stage,
                STAGE.c.next_attempt_at.is_not(None),
                STAGE.c.next_attempt_at <= now,
            )
            .order_by(STAGE.c.next_attempt_at, STAGE.c.id)
        )

    def get_pending_stages(
        self,
        process_code: str,
        platform: str,
        stage: str | None = None,
        *,
        limit: int | None = None,
    ) -> list[TxStage]:
        """Runnable stages of one platform stage, oldest due first (read-only, one query)."""
        _, p, stage = self._platform_stage(process_code, platform, stage)
        now = self.clock()
        query = (
            select(TxStage)
            .where(
                TxStage.process_code == process_code,
                TxStage.platform == p.code,
                TxStage.stage == stage,
                TxStage.next_attempt_at.is_not(None),  # type: ignore[union-attr]
                TxStage.next_attempt_at <= now,  # type: ignore[operator]
            )
            .order_by(TxStage.next_attempt_at, TxStage.id)  # type: ignore[arg-type]
        )
        if limit is not None:
            query = query.limit(_check_limit(limit))
        with read_only(self.engine) as conn, Session(bind=conn) as session:
            return list(session.exec(query).all())

    def claim(
        self,
        process_code: str,
        platform: str,
        stage: str | None = None,
        *,
        owner: str,
        limit: int = 100,
        lease_seconds: float = 1800,
        uuid: str | None = None,
    ) -> list[TxStage]:
        """Reserve up to ``limit`` runnable stages for ``owner``.

        The claimed stages are IN_PROGRESS (reserved), their ``transaction`` (payload,
        business key) loaded; their attempt counter is unchanged until ``start_attempt``
        (or ``complete_stage``) says the attempt began. No other worker can claim them until
        ``lease_seconds`` pass; a run that holds them longer calls ``renew_reservations``.
        An expired reservation goes back to runnable with its attempts intact.

        An owner stands for one run: it is never handed a stage whose last attempt it made
        itself, so a failing stage is retried by a later run (or by an in-run retry through
        ``claim_stage``), never in a tight loop. ``uuid`` limits the claim to one transaction.
        """
        _, p, stage = self._platform_stage(process_code, platform, stage)
        limit = _check_limit(limit)
        owner = _check_owner(owner)
        lease_seconds = _check_seconds(lease_seconds)
        # Stages of dead workers first: their lost attempts are recorded (one indexed query
        # when there are none), and their expired reservations given back in the claim's own
        # transaction, so this claim can take them.
        self._recover_lost_attempts(self.process(process_code), [p.code], limit=1000)
        now = self.clock()
        candidates = self._runnable(process_code, p.code, stage, now).where(
            sa.or_(STAGE.c.lease_owner.is_(None), STAGE.c.lease_owner != owner)
        )
        if uuid is not None:
            candidates = candidates.where(STAGE.c.uuid == uuid)
        expired = _expired_leases(process_code, [p.code], now)
        return self._claim_where(candidates.limit(limit), owner, lease_seconds, now, expired)

    def claim_stage(
        self,
        uuid: str,
        platform: str,
        stage: str | None = None,
        *,
        owner: str,
        lease_seconds: float = 1800,
    ) -> TxStage | None:
        """Claim this one stage for an immediate retry, even if its next attempt is not due.

        Used for Prefect's in-run retries. Returns None when the stage cannot run now
        (finished, exhausted, cancelled, or claimed by another worker).
        """
        process = self.process(self._process_of(uuid))
        _, p, stage = self._platform_stage(process.code, platform, stage)
        owner = _check_owner(owner)
        lease_seconds = _check_seconds(lease_seconds)
        candidate = sa.select(STAGE.c.id).where(
            STAGE.c.uuid == uuid,
            STAGE.c.platform == p.code,
            STAGE.c.stage == stage,
            STAGE.c.state.in_(list(OPEN_STAGE_STATES)),
            STAGE.c.next_attempt_at.is_not(None),
        )
        claimed = self._claim_where(candidate, owner, lease_seconds, self.clock())
        return claimed[0] if claimed else None

    def _claim_where(
        self,
        candidates: sa.Select[Any],
        owner: str,
        lease_seconds: float,
        now: datetime,
        release_first: list[Any] | None = None,
    ) -> list[TxStage]:
        if self.engine.dialect.name == "postgresql":
            candidates = candidates.with_for_update(skip_locked=True)
        claim = (
            sa.update(STAGE)
            .where(STAGE.c.id.in_(candidates.scalar_subquery()))
            .where(STAGE.c.state.in_(list(OPEN_STAGE_STATES)))
            .values(
                state=StageState.IN_PROGRESS,
                next_attempt_at=None,
                lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                started_at=None,
                updated_at=now,
            )
            .returning(*STAGE.c)
        )
        with self.engine.begin() as conn:
            if release_first is not None:
                _release(conn, release_first, EXPIRED_RESERVATION, now, skip_locked=True)
            rows = conn.execute(claim).all()
            if not rows:
                return []
            uuids = [r.uuid for r in rows]
            txs = {r.uuid: r for r in conn.execute(sa.select(TX).where(TX.c.uuid.in_(uuids)))}
        stages = []
        for row in sorted(rows, key=lambda r: r.id):
            s = TxStage(**row._mapping)
            s.transaction = TxProcess(**txs[row.uuid]._mapping)
            stages.append(s)
        return stages

    def extend_lease(
        self, uuid: str, platform: str, stage: str | None = None, *, owner: str, seconds: float
    ) -> datetime:
        """Push back the lease of a long-running attempt (``LeaseLost`` if it was lost)."""
        _, p, stage = self._platform_stage(self._process_of(uuid), platform, stage)
        expires = self.clock() + timedelta(seconds=seconds)
        with self.engine.begin() as conn:
            done = conn.execute(
                sa.update(STAGE)
                .where(
                    STAGE.c.uuid == uuid,
                    STAGE.c.platform == p.code,
                    STAGE.c.stage == stage,
                    STAGE.c.state == StageState.IN_PROGRESS,
                    STAGE.c.lease_owner == owner,
                )
                .values(lease_expires_at=expires)
            ).rowcount
        if not done:
            raise LeaseLost(
                f"stage {platform}.{stage} of transaction {uuid} is not claimed by {owner!r}"
            )
        return expires

    def start_attempt(
        self,
        uuid: str,
        platform: str,
        stage: str,
        *,
        owner: str,
        lease_seconds: float = 1800,
    ) -> int:
        """Start the attempt of a stage ``owner`` has reserved; returns the attempt number.

        Call it right before the platform is called: the attempt counts from now, and the
        lease now runs ``lease_seconds`` from now and is not renewed (a call stuck past it
        loses the stage). Raises ``LeaseLost`` when the reservation is gone (it expired and was
        released or taken over, or an operator cancelled the transaction): then do not call
        the platform.
        """
        owner = _check_owner(owner)
        lease_seconds = _check_seconds(lease_seconds)
        for name, value in (("uuid", uuid), ("platform", platform), ("stage", stage)):
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {value!r}")
        now = self.clock()
        params = {
            "b_uuid": uuid, "b_platform": platform, "b_stage": stage, "b_owner": owner,
            "b_now": now, "b_expires": now + timedelta(seconds=lease_seconds),
        }
        with self.engine.begin() as conn:
            attempt = conn.execute(_START_ATTEMPT, params).scalar_one_or_none()
            if attempt is not None:
                conn.execute(
                    _TX_STARTED,
                    {"b_uuid": uuid, "state": TxState.IN_PROGRESS, "updated_at": now},
                )
                return int(attempt)
        raise LeaseLost(self._why_not_reserved(uuid, platform, stage, owner))

    def _why_not_reserved(self, uuid: str, platform: str, stage: str, owner: str) -> str:
        where = f"stage {platform}.{stage} of transaction {uuid}"
        with read_only(self.engine) as conn:
            row = conn.execute(
                sa.select(STAGE.c.state, STAGE.c.lease_owner, STAGE.c.started_at).where(
                    STAGE.c.uuid == uuid, STAGE.c.platform == platform, STAGE.c.stage == stage
                )
            ).one_or_none()
        if row is None:
            return f"no {where}"
        if row.state == StageState.IN_PROGRESS and row.lease_owner == owner:
            return f"{where}: its attempt already started"
        return (
            f"{where} is no longer reserved by {owner!r} "
            f"(state {StageState(row.state).value}, owner {row.lease_owner!r})"
        )

    def renew_reservations(self, process_code: str, *, owner: str, seconds: float) -> int:
        """Keep the reservations of a live run from expiring: each not-yet-started stage that
        ``owner`` holds is reserved for ``seconds`` from now (one statement). Started
        attempts keep their own lease. Returns how many were renewed."""
        owner = _check_owner(owner)
        now = self.clock()
        expires = now + timedelta(seconds=_check_seconds(seconds))
        held: Any = sa.and_(
            STAGE.c.process_code == process_code,
            STAGE.c.lease_expires_at.is_not(None),
            STAGE.c.lease_owner == owner,
            _RESERVED,
        )
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # A row being started or released right now is renewed at the next beat;
                # waiting for it could deadlock with that multi-row statement.
                locked = sa.select(STAGE.c.id).where(held).with_for_update(skip_locked=True)
                held = sa.and_(STAGE.c.id.in_(locked.scalar_subquery()), held)
            renew = sa.update(STAGE).where(held).values(lease_expires_at=expires)
            return conn.execute(renew).rowcount

    def release(
        self,
        process_code: str,
        *,
        owner: str,
        uuids: Sequence[str] | None = None,
        reason: str = "the run stopped before starting it",
    ) -> int:
        """Give back what ``owner`` reserved but has not started (all of it, or only the
        stages of these transactions): runnable again now, attempts intact, a RELEASED event
        each. Started attempts are left alone. Returns how many stages were released."""
        owner = _check_owner(owner)
        where = [
            STAGE.c.process_code == process_code,
            STAGE.c.lease_expires_at.is_not(None),
            STAGE.c.lease_owner == owner,
        ]
        if uuids is None:
            return self._release_where(where, f"released by {owner}: {reason}", False)
        if isinstance(uuids, str) or not all(isinstance(u, str) for u in uuids):
            raise ValueError(f"uuids must be a list of transaction uuids, got {uuids!r}")
        released = 0
        for i in range(0, len(uuids), 500):
            chunk = [*where, STAGE.c.uuid.in_(list(uuids[i : i + 500]))]
            released += self._release_where(chunk, f"released by {owner}: {reason}", False)
        return released

    def _release_where(self, where: list[Any], description: str, skip_locked: bool) -> int:
        with self.engine.begin() as conn:
            return _release(conn, where, description, self.clock(), skip_locked=skip_locked)

    def recover_expired_leases(
        self, process_code: str, platform: str | None = None, *, limit: int = 1000
    ) -> int:
        """Make the stages of dead workers runnable again.

        An expired reservation (never started) is released with its attempts intact (a
        RELEASED event). An expired started attempt counts as lost: a LEASE_EXPIRED event (a
        system error, code -1), then TERMINATED (due per the retry policy) or EXHAUSTED.
        Returns how many stages were recovered.
        """
        process = self.process(process_code)
        codes = [process.get_platform(platform).code] if platform else None
        expired = _expired_leases(process_code, codes, self.clock())
        released = self._release_where(expired, EXPIRED_RESERVATION, True)
        return released + self._recover_lost_attempts(process, codes, limit)

    def _recover_lost_attempts(
        self, process: Process, platforms: list[str] | None, limit: int
    ) -> int:
        """Record the started attempts whose lease expired as lost (one transaction each)."""
        now = self.clock()
        query = sa.select(STAGE.c.uuid).where(
            *_expired_leases(process.code, platforms, now), STAGE.c.started_at.is_not(None)
        )
        with read_only(self.engine) as conn:
            lost = conn.execute(query.limit(_check_limit(limit, 100_000))).scalars().all()
        recovered = 0
        for uuid in lost:
            with self.engine.begin() as conn:
                recovered += self._recover_one(conn, process, uuid, now)
        return recovered

    def _recover_one(self, conn: Connection, process: Process, uuid: str, now: datetime) -> int:
        stages, tx = self._lock(conn, uuid)
        for row in stages:
            lease = row.lease_expires_at
            started = row.started_at is not None
            if row.state == StageState.IN_PROGRESS and started and lease and lease <= now:
                result = ExecutionResult(
                    -1,
                    f"lease of {row.lease_owner!r} expired at {lease.isoformat()}: "
                    "the worker stopped before recording its attempt",
                )
                self._apply(
                    conn,
                    process,
                    tx,
                    stages,
                    row,
                    result,
                    now,
                    kind=EventKind.LEASE_EXPIRED,
                    actor=row.lease_owner,
                )
                return 1
        return 0

    # -- recording attempts ----------------------------------------------------------------

    def complete_stage(
        self,
        uuid: str,
        platform: str,
        result: ExecutionResult | int,
        *,
        stage: str | None = None,
        owner: str | None = None,
        flow_run_id: str | None = None,
        task_run_id: str | None = None,
    ) -> TxStage:
        """Record an attempt's result and move the stage and transaction on.

        ``result`` is an ``ExecutionResult`` or a plain int error code. Without ``owner`` the
        stage must be runnable and unclaimed (an attempt is counted now); with ``owner`` it
        must be claimed by that owner (``LeaseLost`` otherwise: a stale worker never
        overwrites an attempt that was taken over).
        """
        result = to_result(result)
        now = self.clock()
        with self.engine.begin() as conn:
            stages, tx = self._lock(conn, uuid)
            process, p, stage = self._platform_stage(tx.process_code, platform, stage)
            row = next(s for s in stages if s.platform == p.code and s.stage == stage)
            self._check_can_complete(row, owner, now)
            return self._apply(
                conn,
                process,
                tx,
                stages,
                row,
                result,
                now,
                kind=EventKind.ATTEMPT,
                actor=owner,
                flow_run_id=flow_run_id,
                task_run_id=task_run_id,
            )

    @staticmethod
    def _check_can_complete(row: Row[Any], owner: str | None, now: datetime) -> None:
        state = StageState(row.state)
        if owner is not None:
            if state != StageState.IN_PROGRESS or row.lease_owner != owner:
                raise LeaseLost(
                    f"{_label(row)} is no longer claimed by {owner!r} "
                    f"(state {state.value}, owner {row.lease_owner!r})"
                )
            return
        if state in FINAL_STAGE_STATES:
            raise InvalidTransition(f"{_label(row)} is already {state.value}")
        if state == StageState.IN_PROGRESS:
            raise InvalidTransition(
                f"{_label(row)} is claimed by {row.lease_owner!r} until "
                f"{row.lease_expires_at.isoformat()}; pass owner= to complete it"
            )
        if row.next_attempt_at is None:
            raise InvalidTransition(
                f"{_label(row)} is not runnable: earlier stages are not completed"
            )
        if row.next_attempt_at > now:
            raise InvalidTransition(
                f"{_label(row)} is not due until {row.next_attempt_at.isoformat()}"
            )

    def _process_of(self, uuid: str) -> str:
        if not isinstance(uuid, str):
            raise TransactionNotFound(f"transaction uuid must be a string, got {uuid!r}")
        with read_only(self.engine) as conn:
            code = conn.execute(
                sa.select(TX.c.process_code).where(TX.c.uuid == uuid)
            ).scalar_one_or_none()
        if code is None:
            raise TransactionNotFound(f"no transaction {uuid!r}")
        return code

    @staticmethod
    def _lock(conn: Connection, uuid: str) -> tuple[list[Row[Any]], Row[Any]]:
        """Lock the transaction's stages, then the transaction (the global lock order)."""
        if not isinstance(uuid, str):
            raise TransactionNotFound(f"transaction uuid must be a string, got {uuid!r}")
        stages = conn.execute(_LOCK_STAGES, {"b_uuid": uuid}).all()
        tx = conn.execute(_LOCK_TX, {"b_uuid": uuid}).one_or_none()
        if tx is None:
            raise TransactionNotFound(f"no transaction {uuid!r}")
        return stages, tx

    def _apply(
        self,
        conn: Connection,
        process: Process,
        tx: Row[Any],
        stages: list[Row[Any]],
        row: Row[Any],
        result: ExecutionResult,
        now: datetime,
        *,
        kind: EventKind,
        actor: str | None = None,
        flow_run_id: str | None = None,
        task_run_id: str | None = None,
    ) -> TxStage:
        """Write one attempt's outcome: the stage, its neighbours, the transaction, the event."""
        from_state = StageState(row.state)
        # A reserved stage completed without start_attempt: its attempt starts (counts) now.
        started = from_state == StageState.IN_PROGRESS and row.started_at is not None
        attempt = row.attempt if started else row.attempt + 1
        started_at = row.started_at if started else now
        outcome = result.outcome
        tx_state = TxState(tx.state)
        later = [s for s in stages if s.seq > row.seq]
        changes: dict[str, Any] = {
            "attempt": attempt,
            "next_attempt_at": None,
            # lease_owner stays: it names the run that made the last attempt (see claim).
            "lease_expires_at": None,
            "started_at": started_at,
            "error_code": result.error_code,
            "error_type": result.error_type,
            "error_description": result.description,
            "updated_at": now,
        }
        if outcome == Outcome.SUCCESS:
            changes.update(state=StageState.COMPLETED, finished_at=now)
            if later and later[0].state == StageState.PENDING:
                conn.execute(
                    _UPDATE_STAGE, {"b_id": later[0].id, "next_attempt_at": now, "updated_at": now}
                )
            new_tx_state = TxState.IN_PROGRESS if later else TxState.COMPLETED
        elif outcome == Outcome.BUSINESS_ERROR:
            changes.update(state=StageState.REJECTED, finished_at=now)
            conn.execute(
                _CANCEL_OTHER_STAGES,
                {
                    "b_uuid": row.uuid,
                    "b_id": row.id,
                    "state": StageState.CANCELLED,
                    "next_attempt_at": None,
                    "updated_at": now,
                    "finished_at": now,
                    "error_description": "cancelled: an earlier stage was rejected",
                },
            )
            new_tx_state = TxState.REJECTED
        else:
            allowed = row.attempts_allowed
            if allowed is not None and attempt >= allowed:
                changes.update(state=StageState.EXHAUSTED, finished_at=now)
                new_tx_state = TxState.EXHAUSTED
            else:
                policy = process.get_platform(row.platform).retry
                delay = policy.delay_after(attempt, self.rng)
                changes.update(
                    state=StageState.TERMINATED, next_attempt_at=now + timedelta(seconds=delay)
                )
                new_tx_state = TxState.TERMINATED
        # An operator's cancel stands even if a running attempt finishes afterwards.
        if tx_state == TxState.CANCELLED:
            new_tx_state = TxState.CANCELLED
            if changes["next_attempt_at"] is not None:
                changes.update(state=StageState.CANCELLED, next_attempt_at=None, finished_at=now)
        # The rows are locked; the state condition only guards against a bypassed lock.
        done = conn.execute(
            _UPDATE_STAGE_FENCED, {"b_id": row.id, "b_state": from_state, **changes}
        )
        if done.rowcount != 1:
            raise LeaseLost(f"{_label(row)} changed while its attempt was being recorded")
        self._set_tx_state(conn, tx, new_tx_state, now)
        conn.execute(
            _INSERT_EVENT,
            {
                "uuid": row.uuid,
                "process_code": row.process_code,
                "kind": kind,
                "platform": row.platform,
                "stage": row.stage,
                "attempt": attempt,
                "outcome": outcome,
                "error_code": result.error_code,
                "description": result.description,
                "traceback": result.traceback,
                "from_state": from_state.value,
                "to_state": StageState(changes["state"]).value,
                "tx_state": new_tx_state,
                "actor": actor,
                "flow_run_id": flow_run_id,
                "task_run_id": task_run_id,
                "started_at": started_at,
                "created_at": now,
            },
        )
        return TxStage.model_construct(**{**row._mapping, **changes})

    @staticmethod
    def _set_tx_state(conn: Connection, tx: Row[Any], state: TxState, now: datetime) -> None:
        values: dict[str, Any] = {"state": state, "updated_at": now}
        if state in FINAL_TX_STATES and tx.finished_at is None:
            values["finished_at"] = now
        elif state not in FINAL_TX_STATES:
            values["finished_at"] = None
        conn.execute(_UPDATE_TX, {"b_uuid": tx.uuid, **values})

    # -- operator actions ------------------------------------------------------------------

    def cancel(self, uuid: str, *, reason: str, actor: str | None = None) -> TxProcess:
        """Cancel a transaction that is not final: its open stages become CANCELLED.

        A stage that is running right now finishes its attempt (it is recorded), but nothing
        runs after it; a stage reserved but not started is cancelled (its run skips it).
        """
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError("cancel needs a reason")
        self._process_of(uuid)
        now = self.clock()
        with self.engine.begin() as conn:
            stages, tx = self._lock(conn, uuid)
            if TxState(tx.state) in FINAL_TX_STATES:
                raise InvalidTransition(f"transaction {uuid} is already {TxState(tx.state).value}")
            conn.execute(
                sa.update(STAGE)
                .where(
                    STAGE.c.uuid == uuid,
                    sa.or_(STAGE.c.state.in_(list(OPEN_STAGE_STATES)), _RESERVED),
                )
                .values(
                    state=StageState.CANCELLED,
                    next_attempt_at=None,
                    lease_expires_at=None,  # a cancelled reservation holds nothing
                    updated_at=now,
                    finished_at=now,
                    error_description=f"cancelled: {reason}",
                )
            )
            self._set_tx_state(conn, tx, TxState.CANCELLED, now)
            self._operator_event(conn, tx, EventKind.CANCELLED, reason, actor, now)
        return self.get_transaction(uuid)

    def requeue(
        self, uuid: str, *, actor: str | None = None, reason: str | None = None
    ) -> TxProcess:
        """Give a stopped transaction another go from its first unfinished stage.

        Allowed for EXHAUSTED, TERMINATED, REJECTED and CANCELLED transactions: the stage
        that stopped (and every later one) is PENDING again with a fresh set of attempts
        per the platform's current retry policy, due now. Completed stages are kept.
        """
        process = self.process(self._process_of(uuid))
        now = self.clock()
        with self.engine.begin() as conn:
            stages, tx = self._lock(conn, uuid)
            state = TxState(tx.state)
            if state in (TxState.COMPLETED, TxState.PENDING, TxState.IN_PROGRESS):
                raise InvalidTransition(
                    f"transaction {uuid} is {state.value}: only stopped transactions "
                    "(EXHAUSTED, TERMINATED, REJECTED, CANCELLED) can be requeued"
                )
            if any(s.state == StageState.IN_PROGRESS and s.started_at for s in stages):
                raise InvalidTransition(f"transaction {uuid} has a stage running right now")
            if all(s.state == StageState.COMPLETED for s in stages):
                # A cancel that raced the last stage's running attempt: nothing is left.
                raise InvalidTransition(
                    f"transaction {uuid} is {state.value} but every stage is COMPLETED: "
                    "nothing left to run"
                )
            first = True
            for s in stages:
                if s.state == StageState.COMPLETED:
                    continue
                policy = process.get_platform(s.platform).retry
                allowed = None if policy.max_attempts is None else s.attempt + policy.max_attempts
                conn.execute(
                    _UPDATE_STAGE,
                    {
                        "b_id": s.id,
                        "state": StageState.PENDING,
                        "attempts_allowed": allowed,
                        "lease_owner": None,
                        "lease_expires_at": None,
                        "next_attempt_at": now if first else None,
                        "finished_at": None,
                        "error_code": None,
                        "error_type": None,
                        "error_description": None,
                        "updated_at": now,
                    },
                )
                first = False
            any_done = any(s.state == StageState.COMPLETED for s in stages)
            new_state = TxState.IN_PROGRESS if any_done else TxState.PENDING
            self._set_tx_state(conn, tx, new_state, now)
            self._operator_event(
                conn, tx, EventKind.REQUEUED, reason or "requeued", actor, now, to_state=new_state
            )
        return self.get_transaction(uuid)

    @staticmethod
    def _operator_event(
        conn: Connection,
        tx: Row[Any],
        kind: EventKind,
        description: str,
        actor: str | None,
        now: datetime,
        to_state: TxState | None = None,
    ) -> None:
        conn.execute(
            sa.insert(EVENT).values(
                uuid=tx.uuid,
                process_code=tx.process_code,
                kind=kind,
                description=description,
                from_state=TxState(tx.state).value,
                to_state=(to_state or TxState.CANCELLED).value,
                tx_state=to_state or TxState.CANCELLED,
                actor=actor,
                created_at=now,
            )
        )

    # -- reading ---------------------------------------------------------------------------

    def get_stages(self, uuids: Sequence[str], platform: str, stage: str) -> list[TxStage]:
        """One platform stage of each of these transactions, in the order of ``uuids`` (one
        query per 500 uuids, on the unique index of uuid, platform and stage)."""
        found: dict[str, TxStage] = {}
        with read_only(self.engine) as conn, Session(bind=conn) as session:
            for i in range(0, len(uuids), 500):
                query = select(TxStage).where(
                    TxStage.uuid.in_(list(uuids[i : i + 500])),  # type: ignore[attr-defined]
                    TxStage.platform == platform,
                    TxStage.stage == stage,
                )
                found.update({s.uuid: s for s in session.exec(query)})
        missing = [u for u in uuids if u not in found]
        if missing:
            raise TransactionNotFound(f"no stage {platform}.{stage} of transaction {missing[0]}")
        return [found[u] for u in uuids]

    def get_transaction(self, uuid: str) -> TxProcess:
        """The transaction with its ``stages`` (in order) and ``events`` (the audit trail)."""
        query = (
            select(TxProcess)
            .where(TxProcess.uuid == uuid)
            .options(selectinload(TxProcess.stages), selectinload(TxProcess.events))  # type: ignore[arg-type]
        )
        with read_only(self.engine) as conn, Session(bind=conn) as session:
            tx = session.exec(query).one_or_none()
            if tx is None:
                raise TransactionNotFound(f"no transaction {uuid!r}")
            return tx


EXPIRED_RESERVATION = "reservation expired before the attempt started (its run stopped)"


def _expired_leases(process_code: str, platforms: list[str] | None, now: datetime) -> list[Any]:
    """Conditions of the stages of ``process_code`` whose lease expired (ix_tx_stage_lease)."""
    where = [
        STAGE.c.process_code == process_code,
        STAGE.c.lease_expires_at.is_not(None),
        STAGE.c.lease_expires_at <= now,
        STAGE.c.state == StageState.IN_PROGRESS,
    ]
    if platforms:
        where.append(STAGE.c.platform.in_(platforms))
    return where


def _release(
    conn: Connection, where: list[Any], description: str, now: datetime, *, skip_locked: bool
) -> int:
    """Reserved stages matching ``where`` back to runnable, with their RELEASED events.

    ``skip_locked`` leaves rows another transaction holds (PostgreSQL) for a later call: a
    claim that gives back expired reservations of other runs must not wait or deadlock.
    """
    matching: Any = sa.and_(*where, _RESERVED)
    if skip_locked and conn.dialect.name == "postgresql":
        locked = sa.select(STAGE.c.id).where(matching).with_for_update(skip_locked=True)
        matching = sa.and_(STAGE.c.id.in_(locked.scalar_subquery()), _RESERVED)
    released = (
        sa.update(STAGE)
        .where(matching)
        .values(
            # TERMINATED when the last attempt left a system error, else never tried.
            state=sa.case(
                (STAGE.c.error_code.is_(None), StageState.PENDING.value),
                else_=StageState.TERMINATED.value,
            ),
            next_attempt_at=now,
            # lease_owner stays: the releasing run is not handed the stage again.
            lease_expires_at=None,
            updated_at=now,
        )
        .returning(STAGE.c.id)
    )
    ids = conn.execute(released).scalars().all()
    for i in range(0, len(ids), 500):
        conn.execute(_released_events(ids[i : i + 500], description, now))
    return len(ids)


def _released_events(ids: Sequence[int], description: str, now: datetime) -> sa.Insert:
    """The RELEASED events of these just-released stages (one INSERT ... SELECT)."""
    source = (
        sa.select(
            STAGE.c.uuid, STAGE.c.process_code, sa.literal(EventKind.RELEASED.value),
            STAGE.c.platform, STAGE.c.stage, STAGE.c.attempt, sa.literal(description),
            sa.literal(StageState.IN_PROGRESS.value), STAGE.c.state, TX.c.state,
            STAGE.c.lease_owner, sa.literal(now, type_=EVENT.c.created_at.type),
        )
        .join(TX, TX.c.uuid == STAGE.c.uuid)
        .where(STAGE.c.id.in_(list(ids)))
    )
    columns = ["uuid", "process_code", "kind", "platform", "stage", "attempt", "description",
               "from_state", "to_state", "tx_state", "actor", "created_at"]
    return sa.insert(EVENT).from_select(columns, source)


def _check_limit(limit: Any, maximum: int = MAX_CLAIM) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= maximum:
        raise ValueError(f"limit must be an int from 1 to {maximum}, got {limit!r}")
    return limit


def _check_seconds(seconds: Any, name: str = "lease_seconds") -> float:
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        raise ValueError(f"{name} must be a number of seconds > 0, got {seconds!r}")
    return float(seconds)


def _check_owner(owner: Any) -> str:
    if not isinstance(owner, str) or not owner or len(owner) > MAX_OWNER_LENGTH:
        raise ValueError(f"owner must be a non-empty string of at most {MAX_OWNER_LENGTH} chars")
    return owner
