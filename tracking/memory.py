"""The garbage collector while a run or the API server works.

A process of this project holds ~200k objects once it has started (Prefect's, SQLAlchemy's,
FastAPI's, the modules'), and Python's full collections walk every one of them: ~100 ms on
a small machine, during which every request in flight or every batch of a run waits. Young
objects are collected far less often while a run or the server works, so that few reach the
oldest generation and full collections are rare; the API server also keeps the objects it
started with out of the collector::

    with rarer_young_collections():      # a resume run
        ...
    with startup_objects_frozen():       # the API server (rarer young collections too)
        ...  # full collections walk only what was made since
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

# In the block, the youngest objects are collected after this many allocations (Python's
# default: 700). A batch makes thousands of objects that live until it is recorded: at 700
# each was walked by several young collections on the way, and enough survived to trigger a
# full collection every few thousand stages; at this size most are gone before one runs
# (the collector's time in a batch run fell from ~4% to ~0, with one full collection per
# ~100k stages).
YOUNG_THRESHOLD = 20_000


@contextmanager
def rarer_young_collections() -> Iterator[None]:
    """Collect the youngest objects after ``YOUNG_THRESHOLD`` allocations, not Python's 700,
    until the block ends (the thresholds are put back then). Nothing is kept from the
    collector: the objects made in the block are collected as usual, only less often."""
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], YOUNG_THRESHOLD), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


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
