"""Group commit for ``POST /transactions``.

Writing one transaction costs a database transaction (and on SQLite the single write lock),
so concurrent submissions are written together: each request validates its payload, queues
it and waits; a background writer takes everything queued so far and writes it with
``Tracker.start_many`` (one database transaction per process and source), then reads the
rows back with one query. While a batch is being written the next one fills up, so a lone
request is written at once and a busy server writes many per commit.

Semantics are those of ``start_or_resume`` for each request: a duplicate (same dedup
fingerprint, in the database or earlier in the same batch) returns the existing transaction
with ``is_new=False``; a payload the tracker refuses fails alone (the batch is retried item by
item) and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import sqlalchemy as sa

from tracking.api.errors import validation_error
from tracking.connections import read_only
from tracking.models import TxProcess
from tracking.schedule import Item, Schedule
from tracking.store import Intake, Tracker

TX = TxProcess.__table__


@dataclass
class _Item:
    process: str
    payload: dict[str, Any]
    source: str | None
    future: asyncio.Future[tuple[Any, bool]] = field(repr=False)
    schedule: Schedule = field(default_factory=Schedule)

    def item(self) -> Item:
        s = self.schedule
        return Item(self.payload, s.priority, s.not_before, s.deadline)


class IntakeBatcher:
    """Queues submissions and writes them in batches (see the module docstring).

    Args:
        tracker: the tracker that writes them.
        max_batch: most payloads written in one database transaction.
        writers: batches written at the same time. One is best on both databases: SQLite
            has one writer at a time anyway, and on PostgreSQL four writers measured slower
            (~750 vs ~950 creates/s in-process): smaller batches, and the writers' Python
            work competes with the event loop for the GIL.
    """

    def __init__(self, tracker: Tracker, max_batch: int = 256, writers: int = 1) -> None:
        self.tracker = tracker
        self.max_batch = max_batch
        self.writers = writers
        self._queue: list[_Item] = []
        self._active = 0

    async def submit(
        self, process: str, payload: dict[str, Any], source: str | None = None,
        schedule: Schedule | None = None,
    ) -> tuple[Any, bool]:
        """Start (or find) the transaction for ``payload``: ``(row, is_new)``.

        ``row`` has the columns of ``tx_process``. Raises ``UnknownProcessError`` for an
        unknown process and a 422 ``ApiError`` when the payload lacks its dedup key.
        """
        strategy = self.tracker.process(process).dedup
        try:
            strategy.fingerprint(payload)  # fail fast and alone, not in the batch
        except ValueError as exc:
            raise validation_error(str(exc), field="payload") from None
        loop = asyncio.get_running_loop()
        item = _Item(process, payload, source, loop.create_future(), schedule or Schedule())
        self._queue.append(item)
        if self._active < self.writers:
            self._active += 1
            # A fresh context: the writer's log lines must not carry this request's id.
            loop.create_task(self._drain(), context=contextvars.Context())
        return await item.future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                try:
                    results = await anyio.to_thread.run_sync(self._write, batch)
                except BaseException as exc:  # even cancellation must not strand a request
                    for item in batch:
                        if not item.future.done():
                            item.future.set_exception(
                                exc if isinstance(exc, Exception) else RuntimeError("cancelled")
                            )
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for item, result in zip(batch, results, strict=True):
                    if item.future.done():  # the client went away
                        continue
                    if isinstance(result, Exception):
                        item.future.set_exception(result)
                    else:
                        item.future.set_result(result)
        finally:
            self._active -= 1

    def _write(self, batch: list[_Item]) -> list[tuple[Any, bool] | Exception]:
        """Runs in a worker thread: write the batch, read the rows back."""
        groups: dict[tuple[str, str | None], list[int]] = defaultdict(list)
        for index, item in enumerate(batch):
            groups[(item.process, item.source)].append(index)
        outcomes: list[Intake | Exception] = [RuntimeError("not written")] * len(batch)
        for (process, source), indexes in groups.items():
            payloads = [batch[i].item() for i in indexes]
            try:
                written: list[Intake | Exception] = list(
                    self.tracker.start_many(process, payloads, source=source)
                )
            except ValueError:
                written = [self._write_one(process, p, source) for p in payloads]
            except Exception as exc:
                written = [exc] * len(indexes)
            for i, outcome in zip(indexes, written, strict=True):
                outcomes[i] = outcome
        uuids = list({o.uuid for o in outcomes if isinstance(o, Intake)})
        rows: dict[str, Any] = {}
        if uuids:
            with read_only(self.tracker.engine) as conn:
                rows = {r.uuid: r for r in conn.execute(sa.select(TX).where(TX.c.uuid.in_(uuids)))}
        return [
            (rows[o.uuid], o.is_new) if isinstance(o, Intake) else o for o in outcomes
        ]

    def _write_one(self, process: str, payload: Item, source: str | None) -> Intake | Exception:
        try:
            return self.tracker.start_many(process, [payload], source=source)[0]
        except ValueError as exc:
            return validation_error(str(exc), field="payload")
        except Exception as exc:
            return exc
