"""Single flight for identical report requests, without serving stale results.

A dashboard (or sixteen of them) asking for the same summary at once should cost one SQL
query, not sixteen queries competing for the same CPU. ``Coalescer.run(key, fn)`` runs
``fn`` in a worker thread; requests with the same key that arrive while it runs share the
*next* run, which starts when the current one finishes. So every caller gets a result
computed entirely after it arrived (nothing committed before the request is missed), and
each key has at most one query running and one waiting.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import anyio.to_thread


@dataclass
class _Slot:
    running: asyncio.Future[Any]
    queued: asyncio.Future[Any] | None = None
    queued_fn: Callable[[], Any] | None = None


class Coalescer:
    """Runs ``fn`` for a key once for all the callers that can share the result."""

    def __init__(self) -> None:
        self._slots: dict[Hashable, _Slot] = {}

    async def run(self, key: Hashable, fn: Callable[[], Any]) -> Any:
        """The result of ``fn()`` (run in a worker thread), shared with same-key callers."""
        loop = asyncio.get_running_loop()
        slot = self._slots.get(key)
        if slot is None:
            future: asyncio.Future[Any] = loop.create_future()
            self._slots[key] = _Slot(running=future)
            self._start(loop, key, fn, future)
        elif slot.queued is None:
            future = slot.queued = loop.create_future()
            slot.queued_fn = fn
        else:
            future = slot.queued
        # shield: a caller that goes away does not cancel the run the others wait for.
        return await asyncio.shield(future)

    def _start(
        self,
        loop: asyncio.AbstractEventLoop,
        key: Hashable,
        fn: Callable[[], Any],
        future: asyncio.Future[Any],
    ) -> None:
        loop.create_task(self._execute(loop, key, fn, future), context=contextvars.Context())

    async def _execute(
        self,
        loop: asyncio.AbstractEventLoop,
        key: Hashable,
        fn: Callable[[], Any],
        future: asyncio.Future[Any],
    ) -> None:
        try:
            result = await anyio.to_thread.run_sync(fn)
        except BaseException as exc:  # handed to every waiter, even cancellation
            if not future.done():
                future.set_exception(
                    exc if isinstance(exc, Exception) else RuntimeError("report cancelled")
                )
            if not isinstance(exc, Exception):
                raise
        else:
            if not future.done():
                future.set_result(result)
        finally:
            slot = self._slots[key]
            if slot.queued is not None and slot.queued_fn is not None:
                nxt, fn_next = slot.queued, slot.queued_fn
                self._slots[key] = _Slot(running=nxt)
                self._start(loop, key, fn_next, nxt)
            else:
                del self._slots[key]
