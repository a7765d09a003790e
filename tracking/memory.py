"""The garbage collector and the objects a process starts with.

A process of this project holds ~200k objects once it has started (Prefect's, SQLAlchemy's,
FastAPI's, the modules'), and Python's full collections walk every one of them: ~100 ms on
a small machine, during which every request in flight or every batch of a run waits. A
resume run and the API server keep them out of the collector while they work::

    with startup_objects_frozen():
        ...  # full collections walk only what was made since
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

# In the block, the youngest objects are collected after this many allocations (Python's
# default: 700). A batch makes thousands of objects that live until it is recorded: at 700
# each was walked by several young collections on the way; at this size most are gone
# before one runs (the collector's time in a batch run fell from ~4% to ~0).
YOUNG_THRESHOLD = 20_000


@contextmanager
def startup_objects_frozen() -> Iterator[None]:
    """Keep the garbage collector off the objects that exist now until the block ends, and
    collect the young ones less often (``YOUNG_THRESHOLD``).

    A busy run's objects that live through a batch are promoted fast enough to trigger a
    full collection every few thousand stages (~13% of a batch workload's time); in the API
    each one stalled the requests in flight by ~100 ms (the p99 of the summary report). The
    objects made in the block are collected as usual; nothing is kept beyond it. A process
    that froze its objects itself (``gc.freeze()`` after start-up) is left as it is.

    The garbage is collected before the objects are frozen and again once they are not,
    while the process is still whole: a frozen object that became garbage in the block (a
    connection of a pool, say) is then finalized here, as it would have been in the block,
    not by a later collection at a worse time (as the process shuts down, its event loops
    closed).
    """
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], YOUNG_THRESHOLD), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        gc.collect()
