"""freeze_startup_heap: what is alive at start-up leaves the collector's reach, later garbage does not."""

from __future__ import annotations

import gc
import weakref

from coordinator.heap import freeze_startup_heap


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_frozen_objects_survive_collections_and_later_cycles_are_still_collected() -> None:
    try:
        kept = Node()
        kept_ref = weakref.ref(kept)
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
        del kept  # unreachable now, but frozen: a full collection must not even look at it
        gc.collect()
        assert kept_ref() is not None

        later = Node()
        later_ref = weakref.ref(later)
        del later
        gc.collect()
        assert later_ref() is None  # allocated after the freeze: collected as before
    finally:
        gc.unfreeze()
