"""A resume run and the API keep the garbage collector off the objects they started with,
and only while they work (``tracking.memory.startup_objects_frozen``)."""

from __future__ import annotations

import gc

from tracking.memory import YOUNG_THRESHOLD, startup_objects_frozen


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
