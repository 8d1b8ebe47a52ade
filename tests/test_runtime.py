"""The coordinator's process settings: a frozen start-up heap, a short GIL switch interval."""

from __future__ import annotations

import gc
import sys
import weakref

from coordinator.runtime import SWITCH_INTERVAL_SECONDS, freeze_startup_heap, prepare_service_process


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


def test_prepare_service_process_sets_the_switch_interval_and_freezes() -> None:
    before = sys.getswitchinterval()
    try:
        assert prepare_service_process() == gc.get_freeze_count() > 0
        assert sys.getswitchinterval() == SWITCH_INTERVAL_SECONDS < before
    finally:
        gc.unfreeze()
        sys.setswitchinterval(before)
