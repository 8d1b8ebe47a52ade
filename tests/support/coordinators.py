"""Coordinators for tests: a small config file, and the service built on either broker.

Every coordinator here embeds with the `hashing` embedder (no model), so a round takes milliseconds
of consensus and gives the same labels on every machine.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from broker.amqp import AmqpTransport
from broker.memory import MemoryBroker
from broker.topology import COORDINATOR_USER
from broker.transport import Transport
from common.embedding import HashingEmbedder
from coordinator.service import Coordinator, build_coordinator
from coordinator.settings import CoordinatorSettings, load_coordinator_settings
from support.scripted import ScriptedParticipant

# One round of 6 prompts in 3 shards; quorum 3 of at least 5 members, a 3 s deadline. No straggler
# bound: tests script their stragglers (a delay, a gate, a restart) and wait for them as the quorum says;
# tests of the bound (test_rounds, test_attacks) set `straggler_factor` themselves.
ROUND: dict[str, object] = {
    "rounds": 1,
    "prompts_per_round": 6,
    "shards": 3,
    "quorum": 3,
    "min_participants": 5,
    "deadline_seconds": 3.0,
    "grace_seconds": 0.2,
    "straggler_factor": 0.0,
}


def write_config(
    directory: Path,
    *,
    federation: str = "test",
    prompts: int = 12,
    top: Mapping[str, object] | None = None,
    recording: Mapping[str, object] | None = None,
    **round_overrides: object,
) -> Path:
    """`directory`/coordinator.toml and the `prompts` questions it reads: `ROUND` with
    `round_overrides`, the hashing embedder, `top` as more top-level keys, a [recording] table when
    given."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "prompts.jsonl").write_text(
        "\n".join(json.dumps({"prompt_id": f"q{i}", "prompt": f"Question {i}?"}) for i in range(prompts))
        + "\n"
    )
    lines = [f"federation = {json.dumps(federation)}", *toml_keys(top or {})]
    lines += ['prompts_path = "prompts.jsonl"', 'state_path = "state.sqlite3"']
    lines += ["[round]", *toml_keys(ROUND | round_overrides)]
    lines += ["[consensus]", 'embedder = "hashing"', "min_confidence = 0.3"]
    if recording is not None:
        lines += ["[recording]", *toml_keys(recording)]
    config = directory / "coordinator.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def toml_keys(values: Mapping[str, object]) -> list[str]:
    """`key = value` lines (strings, numbers and booleans are written alike in JSON and TOML)."""
    return [f"{key} = {json.dumps(value)}" for key, value in values.items()]


def federation_config(directory: Path, federation: str, **round_overrides: Any) -> Path:
    """`write_config` for a federation of its own (tests sharing one RabbitMQ node)."""
    return write_config(directory, federation=federation, **round_overrides)


def hashing_coordinator(config: Path | CoordinatorSettings, transport: Transport) -> Coordinator:
    """The coordinator service for a config file (or loaded settings) on `transport`."""
    if isinstance(config, CoordinatorSettings):
        settings = config
    else:
        settings = load_coordinator_settings(config, env={})
    return build_coordinator(settings, transport, embedder=HashingEmbedder())


def memory_coordinator(config: Path, broker: MemoryBroker) -> Coordinator:
    """The coordinator on the in-memory broker, logged in as the coordinator user."""
    return hashing_coordinator(config, broker.connect(COORDINATOR_USER))


async def coordinator_at(url: str, config: Path, name: str = "test coordinator") -> Coordinator:
    """The coordinator on RabbitMQ at `url`, connected (`name` shows in the management UI)."""
    transport = AmqpTransport(url, connection_name=name)
    await transport.__aenter__()
    return hashing_coordinator(config, transport)


async def run_with_participants(
    coordinator: Coordinator, participants: Sequence[ScriptedParticipant], timeout: float = 20.0
) -> None:
    """Start, let the participants join, drive every round, let the last replies land, stop intake."""
    await coordinator.start()
    for participant in participants:
        await participant.join()
    await asyncio.wait_for(coordinator.drive(), timeout)
    await asyncio.sleep(0.05)  # let the last replies land
    await coordinator.stop_intake()
