"""The rpa-tracker side of ``bench/compare.py``: run with the python of the rpa-tracker venv.

    build/bench-venv-rpa-tracker/bin/python bench/compare_rpa_tracker_driver.py \\
        --database PATH --payloads PAYLOADS.json [--pragma journal_mode=WAL ...]

It imports ``rpa_tracker`` (0.0.18, installed from PyPI in that venv; none of its code is
copied here), registers the workload's platforms, retry policies and a key-field
deduplication strategy, then on a fresh SQLite file:

* intake: ``start_or_resume`` per payload, then ``start_stage`` per platform (rpa-tracker
  creates a stage row only when asked, and ``get_pending_stages`` finds only existing rows);
* two hourly runs: per platform in order, ``get_pending_stages(platform)`` once, then
  ``complete_stage(uuid, platform, ExecutionResult(error_code=...))`` per stage found.

It prints one JSON object on stdout: timings, attempts per run and platform, and the final
state of every transaction and stage (by item index), which ``compare.py`` checks.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_workload as w  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from rpa_tracker.catalog.platform import PlatformDefinition  # noqa: E402
from rpa_tracker.catalog.registry import PlatformRegistry  # noqa: E402
from rpa_tracker.domain.execution_result import ExecutionResult  # noqa: E402
from rpa_tracker.models.tx_event import TxEvent  # noqa: E402
from rpa_tracker.models.tx_process import TxProcess  # noqa: E402
from rpa_tracker.models.tx_stage import TxStage  # noqa: E402
from rpa_tracker.retry.policy import RetryPolicy  # noqa: E402
from rpa_tracker.retry.registry import RetryPolicyRegistry  # noqa: E402
from rpa_tracker.tracking.deduplication.registry import DeduplicationRegistry  # noqa: E402
from rpa_tracker.tracking.sql_tracker import SqlTransactionTracker  # noqa: E402
from sqlalchemy.orm import Session, declarative_base  # noqa: E402

DedupBase = declarative_base()


class DedupRow(DedupBase):  # type: ignore[misc, valid-type]
    """rpa-tracker leaves storing fingerprints (and payloads) to the process's strategy."""

    __tablename__ = "BENCH_TX_DEDUP"

    fingerprint = sa.Column(sa.String(64), primary_key=True)
    uuid = sa.Column(sa.String(36), nullable=False)
    payload = sa.Column(sa.Text, nullable=False)


class KeyFieldDedup:
    """A ``DeduplicationStrategy``: same value of ``field`` = same item (as ``KeyFields``)."""

    version = 1

    def __init__(self, session: Session, field: str) -> None:
        self.session = session
        self.field = field

    def calculate_fingerprint(self, payload: Any) -> str:
        key = json.dumps([payload[self.field]], separators=(",", ":"))
        return hashlib.sha256(key.encode()).hexdigest()

    def find_existing_uuid(self, fingerprint: str) -> str | None:
        return self.session.scalar(
            sa.select(DedupRow.uuid).where(DedupRow.fingerprint == fingerprint)
        )

    def persist_data(self, uuid: str, payload: Any) -> None:
        # Added to the tracker's session: start_or_resume commits it with the transaction.
        self.session.add(
            DedupRow(
                fingerprint=self.calculate_fingerprint(payload),
                uuid=uuid,
                payload=json.dumps(payload, separators=(",", ":")),
            )
        )


def engine_for(path: str, pragmas: list[str]) -> sa.Engine:
    engine = sa.create_engine(f"sqlite:///{path}")
    if pragmas:

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            for pragma in pragmas:
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

    for model in (TxProcess, TxStage, TxEvent, DedupRow):
        model.metadata.create_all(engine)
    return engine


def register() -> None:
    PlatformRegistry.clear()
    RetryPolicyRegistry.clear()
    for code, order, max_attempts, _ in w.PLATFORMS:
        policy = RetryPolicy(max_attempts=max_attempts)
        PlatformRegistry.register(PlatformDefinition(code=code, retry_policy=policy, order=order))
        RetryPolicyRegistry.register(code, policy)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def hourly_run(tracker: SqlTransactionTracker, index_of: dict[str, int]) -> dict[str, Any]:
    """Every runnable stage once, platform by platform; returns timings and attempt counts."""
    attempts: dict[str, int] = {}
    find = record = 0.0
    start = time.perf_counter()
    for code, *_ in w.PLATFORMS:
        t = time.perf_counter()
        # Plain tuples first: after the first commit the ORM objects are expired, and each
        # read of one would reload it (a query per stage that is rpa-tracker's cost only if
        # a caller iterates the objects; a careful caller does not).
        todo = [(s.uuid, s.attempt) for s in tracker.get_pending_stages(code)]
        find += time.perf_counter() - t
        t = time.perf_counter()
        for uuid, attempt in todo:
            error_code = w.outcome(index_of[uuid], code, attempt + 1)
            result = ExecutionResult(error_code=error_code, description=w.description(error_code))
            tracker.complete_stage(uuid, code, result)
        record += time.perf_counter() - t
        attempts[code] = len(todo)
    return {
        "seconds": time.perf_counter() - start,
        "find_seconds": find,
        "record_seconds": record,
        "attempts": sum(attempts.values()),
        "attempts_by_platform": attempts,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="rpa-tracker side of bench/compare.py")
    parser.add_argument("--database", required=True, help="path of a new SQLite file")
    parser.add_argument("--payloads", required=True, help="JSON file: a list of payloads")
    parser.add_argument(
        "--pragma", action="append", default=[], help="PRAGMA run on each connection"
    )
    args = parser.parse_args()
    if Path(args.database).exists():
        raise SystemExit(f"{args.database} exists: give the path of a new SQLite file")
    payloads = json.loads(Path(args.payloads).read_text())

    from importlib.metadata import version

    out: dict[str, Any] = {
        "versions": {"rpa-tracker": version("rpa-tracker"), "sqlalchemy": sa.__version__},
        "n": len(payloads),
        "pragmas": args.pragma,
    }
    t0 = time.perf_counter()
    engine = engine_for(args.database, args.pragma)
    session = Session(engine)
    register()
    DeduplicationRegistry.register(w.PROCESS, KeyFieldDedup(session, "id"))
    tracker = SqlTransactionTracker(session)
    out["setup_seconds"] = time.perf_counter() - t0

    index_of: dict[str, int] = {}
    start = time.perf_counter()
    stage_seconds = 0.0
    for i, payload in enumerate(payloads):
        uuid, is_new = tracker.start_or_resume(w.PROCESS, payload)
        if not is_new:
            raise SystemExit(f"payload {i} was taken as a duplicate")
        index_of[uuid] = i
        t = time.perf_counter()
        for code, *_ in w.PLATFORMS:
            tracker.start_stage(uuid, code)
        stage_seconds += time.perf_counter() - t
        if (i + 1) % 2000 == 0:
            log(f"    rpa-tracker intake: {i + 1:,}/{len(payloads):,}")
    out["intake"] = {
        "seconds": time.perf_counter() - start,
        "start_stage_seconds": stage_seconds,
        "items": len(payloads),
    }
    log(f"    rpa-tracker intake: {len(payloads):,} in {out['intake']['seconds']:.1f}s")

    for run in range(1, w.RUNS + 1):
        out[f"run{run}"] = hourly_run(tracker, index_of)
        log(
            f"    rpa-tracker run {run}: {out[f'run{run}']['attempts']:,} attempts in "
            f"{out[f'run{run}']['seconds']:.1f}s"
        )
    out["total_seconds"] = (
        out["intake"]["seconds"] + sum(out[f"run{r}"]["seconds"] for r in range(1, w.RUNS + 1))
    )

    # Final states, by item index, for compare.py to check.
    session.rollback()
    tx_state = [""] * len(payloads)
    for uuid, state in session.execute(sa.select(TxProcess.uuid, TxProcess.state)):
        tx_state[index_of[uuid]] = state
    column = {code: k for k, (code, *_) in enumerate(w.PLATFORMS)}
    stages: list[list[Any]] = [[None] * len(w.PLATFORMS) for _ in payloads]
    for uuid, system, state, attempt in session.execute(
        sa.select(TxStage.uuid, TxStage.system, TxStage.state, TxStage.attempt)
    ):
        stages[index_of[uuid]][column[system]] = [state, attempt]
    out["final"] = {"tx": tx_state, "stages": stages}
    out["events"] = session.scalar(sa.select(sa.func.count()).select_from(TxEvent))
    session.close()
    engine.dispose()
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
