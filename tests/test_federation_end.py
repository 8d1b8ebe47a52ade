"""The end of a federation, on the real broker: participants learn it from the wire (RoundClosed.final)
and stop by themselves, and the coordinator reads the last round's reports before it stops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from support.coordinators import coordinator_at
from support.scripted import participant_at
from support.tiny_models import coordinator_config, tiny_participant

from broker.amqp import AmqpTransport

pytestmark = pytest.mark.amqp

NAMES = {"llama": "tiny-llama", "gpt2": "tiny-gpt2"}


async def test_the_last_round_is_marked_final_and_its_reports_are_read_before_the_coordinator_stops(
    tmp_path: Path, rabbit_vhost: Callable[..., dict[str, str]]
) -> None:
    urls = rabbit_vhost(participants=tuple(NAMES))
    coordinator = await coordinator_at(urls["coordinator"], coordinator_config(tmp_path, rounds=2))
    participants = [
        tiny_participant(AmqpTransport(urls[name], connection_name=f"test {name}"), tmp_path, name, spec)
        for name, spec in NAMES.items()
    ]
    try:
        # Participants are told nothing about the number of rounds: they serve until the wire says so.
        runs = [asyncio.create_task(p.run_until()) for p in participants]
        await asyncio.wait_for(coordinator.run(), 180)
        # run() returned only once both had reported the last round.
        assert sorted(p for r, p, _ in coordinator.store.reports() if r == 2) == sorted(NAMES)
        await asyncio.wait_for(asyncio.gather(*runs), 60)  # each stopped on its own
        assert [s.final for s in coordinator.closed_rounds] == [False, True]
        for participant in participants:
            assert participant.federation_ended and participant.rounds_done == [1, 2]
    finally:
        for participant in participants:
            await participant.transport.close()
        await coordinator.transport.close()
        coordinator.store.close()


async def test_the_wait_for_the_last_reports_is_bounded(
    tmp_path: Path, rabbit_vhost: Callable[..., dict[str, str]]
) -> None:
    """Scripted members never report: the coordinator stops after final_reports_seconds anyway."""
    urls = rabbit_vhost(participants=("alice", "bob"))
    coordinator = await coordinator_at(urls["coordinator"], coordinator_config(tmp_path, rounds=1))
    settings = coordinator.settings
    coordinator.settings = msgspec.structs.replace(
        settings, round=msgspec.structs.replace(settings.round, final_reports_seconds=1.5)
    )
    members = [await participant_at(urls[name], name, "t") for name in ("alice", "bob")]
    try:
        run = asyncio.create_task(coordinator.run())
        for member in members:
            await member.join()
        await asyncio.wait_for(run, 60)
        waited = time.time() - coordinator.closed_rounds[-1].closed_unix
        assert coordinator.closed_rounds[-1].final
        assert 1.4 < waited < 10
    finally:
        for member in members:
            await member.leave()
            await member.transport.close()
        await coordinator.transport.close()
        coordinator.store.close()
