"""The garbage collector while a run or the API server works.

A process of this project holds ~200k objects once it has started (Prefect's, SQLAlchemy's,
FastAPI's, the modules'), and Python's full collections walk every one of them: ~100 ms on
a small machine, during which every request in flight or every batch of a run waits. Young
objects are collected far less often while a run, a tracker's batch call or the server
works, so that few reach the oldest generation and full collections are rare; the API
server also keeps the objects it started with out of the collector::

    with rarer_young_collections():      # a resume run, a tracker's batch call
        ...
    with startup_objects_frozen():       # the API server (rarer young collections too)
        ...  # full collections walk only what was made since
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# In the block, the youngest objects are collected after this many allocations (Python's
# default: 700). A batch makes thousands of objects that live until it is recorded: at 700
# each was walked by several young collections on the way, and enough survived to trigger a
# full collection every few thousand stages; at this size most are gone before one runs
# (the collector's time in a batch run fell from ~4% to ~0, with one full collection per
# ~100k stages).
YOUNG_THRESHOLD = 20_000


class _RarerYoungCollections:
    """The raised threshold, shared by the blocks that overlap in a process's threads (two
    runs, a run's batch calls): raised by the first to enter, put back by the last to end.
    Each block restoring what it saw on entry would leave it raised for good whenever two
    overlap (A enters, B enters, A ends, B ends)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._saved: tuple[int, ...] = gc.get_threshold()

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._saved = gc.get_threshold()
                gc.set_threshold(max(self._saved[0], YOUNG_THRESHOLD), *self._saved[1:])
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    gc.set_threshold(*self._saved)


rarer_young_collections = _RarerYoungCollections()
"""``with rarer_young_collections():`` (or as a decorator) collects the youngest objects
after ``YOUNG_THRESHOLD`` allocations, not Python's 700, until the block ends (the thresholds
are put back when the last overlapping block ends). Nothing is kept from the collector: the
objects made in the block are collected as usual, only less often."""


@contextmanager
def startup_objects_frozen() -> Iterator[None]:
    """Keep the garbage collector off the objects that exist now until the block ends, and
    collect the young ones less often (``rarer_young_collections``): for a long-lived
    server, where each full collection stalled the requests in flight by ~100 ms (the p99
    of the summary report). A process that froze its objects itself (``gc.freeze()`` after
    start-up) is left as it is.

    The garbage is collected before the objects are frozen and again once they are not,
    while the process is still whole: a frozen object that became garbage in the block (a
    connection of a pool, say) is then finalized here, not by a later collection at a worse
    time (as the process shuts down, its event loops closed). Those two full collections
    cost ~0.3 s: a resume run, short next to a server, only makes young collections rarer.
    """
    if gc.get_freeze_count():
        with rarer_young_collections():
            yield
        return
    gc.collect()
    gc.freeze()
    try:
        with rarer_young_collections():
            yield
    finally:
        gc.unfreeze()
        gc.collect()
