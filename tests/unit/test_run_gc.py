"""While they work, a resume run collects young objects less often
(``tracking.memory.rarer_young_collections``) and the API also keeps the garbage collector
off the objects it started with (``startup_objects_frozen``)."""

from __future__ import annotations

import gc

from tracking.memory import YOUNG_THRESHOLD, rarer_young_collections, startup_objects_frozen


def test_a_run_freezes_the_objects_it_starts_with_and_unfreezes_them_after():
    assert gc.get_freeze_count() == 0
    before = object()  # noqa: F841 (exists when the run starts)
    thresholds = gc.get_threshold()
    with startup_objects_frozen():
        assert gc.get_freeze_count() > 0  # full collections skip what existed already
        assert gc.get_threshold()[0] >= YOUNG_THRESHOLD  # young objects collected less often
    assert gc.get_freeze_count() == 0  # nothing is kept out of collection after the run
    assert gc.get_threshold() == thresholds


def test_a_process_that_froze_its_objects_itself_keeps_them_frozen():
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with startup_objects_frozen():
            pass
        # still frozen (unfreezing would leave 0; a frozen object freed meanwhile leaves it)
        assert gc.get_freeze_count() > frozen // 2
    finally:
        gc.unfreeze()


def test_a_run_collects_young_objects_less_often_and_only_while_it_works():
    thresholds = gc.get_threshold()
    with rarer_young_collections():
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *thresholds[1:])
        assert gc.get_freeze_count() == 0  # nothing kept from the collector
    assert gc.get_threshold() == thresholds


def test_overlapping_blocks_in_threads_put_the_thresholds_back_once_the_last_ends():
    # Two runs (or batch calls) in threads of one process: A enters, B enters, A ends, B
    # ends. Restoring what each saw on entry would leave B's raised threshold for good.
    thresholds = gc.get_threshold()
    a, b = rarer_young_collections(), rarer_young_collections()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD  # B still works
    b.__exit__(None, None, None)
    assert gc.get_threshold() == thresholds

