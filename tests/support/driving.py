"""Driving a coordinator's rounds from a test: ids for one test, run N rounds, say where it stands."""

from __future__ import annotations

import asyncio
import secrets

import msgspec

from coordinator.service import Coordinator
from schemas import RoundClosed


def names(*roles: str) -> list[str]:
    """Participant ids for one test: `role-<tag>`, so ids sort by role."""
    tag = secrets.token_hex(3)
    return [f"{role}-{tag}" for role in roles]


async def drive(coordinator: Coordinator, rounds: int, timeout: float = 60.0) -> list[RoundClosed]:
    """Run the coordinator until `rounds` rounds in all are closed; summaries of those this call closed."""
    settings = coordinator.settings
    coordinator.settings = msgspec.structs.replace(
        settings, round=msgspec.structs.replace(settings.round, rounds=rounds)
    )
    before = len(coordinator.closed_rounds)
    try:
        await asyncio.wait_for(coordinator.drive(), timeout)
    except TimeoutError:
        raise AssertionError(f"rounds did not close in {timeout} s: {progress(coordinator)}") from None
    return coordinator.closed_rounds[before:]


def progress(coordinator: Coordinator) -> str:
    """Where the open round stands, and what intake did: for a failure message."""
    state = coordinator.round
    shards = {} if state is None else {s: sorted(shard.answered) for s, shard in state.shards.items()}
    round_id = None if state is None else state.round_id
    return f"round {round_id} answered {shards}, intake {coordinator.counters}"


def seconds(summary: RoundClosed) -> float:
    return summary.closed_unix - summary.opened_unix
