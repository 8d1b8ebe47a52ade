"""Process-wide interpreter settings for a long-running coordinator; applied by its CLI, after start-up."""

from __future__ import annotations

import gc
import sys

# How long a thread may hold the GIL while another waits for it (CPython's default is 5 ms).
SWITCH_INTERVAL_SECONDS = 0.0005


def freeze_startup_heap() -> int:
    """Collect once, then move every object alive now into the collector's permanent generation.

    A coordinator that has imported its embedding runtime and loaded a model holds 190,000 (ONNX Runtime)
    to 470,000 (torch) long-lived objects, and every full collection walked all of them: with torch,
    0.1-0.3 s pauses in the middle of intake on a 2-core machine (bench/bench_ingest.py counts them).
    Frozen objects are never scanned again; what the service allocates afterwards is collected as before.
    Returns how many were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def shorten_gil_switch_interval() -> None:
    """Let a worker thread get the GIL back within 0.5 ms instead of 5 ms.

    The intake group commit runs in a worker thread, and SQLite hands the GIL back at every prepare and
    step, a dozen times a commit. While the event loop is busy with deliveries, each wait for the GIL
    took up to the whole switch interval: a commit of 50 batches took 140-220 ms, and the deliveries
    behind it waited for their acks (bench/bench_ingest.py). At 0.5 ms the same commit takes 10-30 ms.
    """
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)


def prepare_service_process() -> int:
    """Both of the above; returns how many start-up objects were frozen."""
    shorten_gil_switch_interval()
    return freeze_startup_heap()
