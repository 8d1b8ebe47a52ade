"""Federations of scripted participants against a coordinator process, for the load benchmarks.

The participant itself is `participant.testing.ScriptedParticipant` (shipped, so that tests and users
writing learners share it); this module adds `run_with_coordinator_process`, which runs hundreds of
them against a coordinator started as its own process and samples its memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import peak_rss_mib_of, start_coordinator
from participant.testing import ScriptedParticipant


@dataclass(frozen=True)
class CoordinatorRun:
    peak_rss_mib: float  # the coordinator process's
    connect_seconds: float  # connecting every participant
    seconds: float  # the whole run


async def run_with_coordinator_process(
    config: Path,
    coordinator_url: str,
    participants: Sequence[ScriptedParticipant],
    rounds: int,
    work_dir: Path,
    *,
    timeout: float,
    startup_seconds: float = 3.0,
) -> CoordinatorRun:
    """Start the coordinator on `config` as its own process (its log in work_dir/coordinator.log),
    connect the participants (50 at a time) and join them; wait until the coordinator exits (at most
    `timeout` seconds, sampling its peak RSS) and every participant has seen `rounds` RoundClosed.
    Everything is closed after, the coordinator killed if it is still running."""
    started = time.time()
    log = work_dir / "coordinator.log"
    coordinator = start_coordinator(config, coordinator_url, log)
    peak = 0.0
    gate = asyncio.Semaphore(50)

    async def connect(participant: ScriptedParticipant) -> None:
        async with gate:
            await participant.transport.__aenter__()

    try:
        await asyncio.gather(*(connect(p) for p in participants))
        connected = time.time() - started
        await asyncio.sleep(startup_seconds)  # the coordinator declares its queues and starts consuming
        await asyncio.gather(*(p.join() for p in participants))
        deadline = time.monotonic() + timeout
        while coordinator.poll() is None and time.monotonic() < deadline:
            peak = max(peak, peak_rss_mib_of(coordinator.pid))
            await asyncio.sleep(0.2)
        if coordinator.returncode != 0:
            raise RuntimeError(
                f"the coordinator exited with {coordinator.returncode}: {log.read_text()[-3000:]}"
            )
        for _ in range(300):  # the last labels and announcements may still be in flight
            if all(len(p.closed_at) >= rounds for p in participants):
                break
            await asyncio.sleep(0.1)
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
        coordinator.wait(30)
        await asyncio.gather(*(p.transport.close() for p in participants), return_exceptions=True)
    return CoordinatorRun(peak_rss_mib=peak, connect_seconds=connected, seconds=time.time() - started)
