"""The catalog in the database: what ``Tracker.register`` stores of each process.

SQL reports, the API and operator actions read it, so they work for every process in the
database, not only for those imported by the current program.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tracking.catalog import Process
from tracking.models import CatalogPlatform, CatalogProcess
from tracking.policy import RetryPolicy
from tracking.store.sql import insert_for

PROCESSES = CatalogProcess.__table__
PLATFORMS = CatalogPlatform.__table__


def register(engine: Engine, process: Process, now: datetime) -> None:
    """Store ``process`` (its platforms, stages, retry policies, session limits, dedup,
    retention, SLA) in the catalog."""
    dedup = process.dedup.describe()
    retention = process.retention
    with engine.begin() as conn:
        stmt = insert_for(conn.dialect, PROCESSES).values(
            code=process.code,
            description=process.description,
            dedup_strategy=dedup["strategy"],
            dedup_fields=dedup["fields"],
            retention_seconds=None if retention is None else retention.total_seconds(),
            sla_seconds=None if process.sla is None else process.sla.total_seconds(),
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
                    "retention_seconds": stmt.excluded.retention_seconds,
                    "sla_seconds": stmt.excluded.sla_seconds,
                    "updated_at": stmt.excluded.updated_at,
                },
            )
        )
        conn.execute(sa.delete(PLATFORMS).where(PLATFORMS.c.process_code == process.code))
        conn.execute(
            sa.insert(PLATFORMS),
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
                    "concurrency": p.concurrency,
                }
                for p in process.platforms
            ],
        )


def current_policies(conn: Connection, process_code: str) -> dict[str, RetryPolicy]:
    """The retry policy of each platform of a process as last registered."""
    rows = conn.execute(sa.select(PLATFORMS).where(PLATFORMS.c.process_code == process_code))
    return {
        r.code: RetryPolicy(
            max_attempts=r.max_attempts,
            delay=r.delay_seconds,
            backoff=r.backoff,
            max_delay=r.max_delay_seconds,
            jitter=r.jitter_seconds,
        )
        for r in rows
    }
