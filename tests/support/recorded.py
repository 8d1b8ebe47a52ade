"""A small federation run with recording on: scripted participants, a coordinator on the memory broker.

Shared by tests/test_recorder.py and tests/test_replay.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.memory import MemoryBroker
from broker.topology import COORDINATOR_USER, UP_EXCHANGE, full_topology, generation_key
from coordinator.replay.recording import with_recording
from coordinator.service import Coordinator
from coordinator.settings import CoordinatorSettings, load_coordinator_settings
from schemas import Answer, GenerationBatch, encode, new_message_id
from support import coordinators
from support.scripted import ScriptedParticipant, consensus_answers

NAMES = ["alice", "bob", "carol", "dave", "erin"]
SHARDS = 3


def write_config(directory: Path, *, rotate_bytes: int = 1 << 20, **round_overrides: Any) -> Path:
    """Two rounds of all five `NAMES`, recording into directory/records (files rotated at `rotate_bytes`)."""
    rounds: dict[str, Any] = {
        "rounds": 2,
        "quorum": len(NAMES),
        "min_participants": len(NAMES),
        "deadline_seconds": 5.0,
    }
    return coordinators.write_config(
        directory,
        prompts=24,
        top={"broker_url": "amqp://coordinator:secret@localhost:5672/chorus"},
        recording={"directory": "records", "rotate_bytes": rotate_bytes},
        **(rounds | round_overrides),
    )


def answers(participant_id: str, prompt_id: str) -> str:
    """Like `consensus_answers`, but bob and carol disagree on some prompts, so labels vary."""
    number = int(prompt_id.lstrip("q"))
    if participant_id in ("bob", "carol") and number % 3 == 0:
        return f"Honestly {prompt_id} depends on context, nobody can say."
    if participant_id == "erin":
        return f"The answer to {prompt_id} is the usual standard one, as always."
    return consensus_answers(participant_id, prompt_id)


@dataclass
class RecordedRun:
    settings: CoordinatorSettings
    records: Path
    labels: dict[tuple[int, int], bytes]  # (round, shard) -> the PseudoLabels body published
    rejected_reasons: list[str] = field(default_factory=list)


def coordinator_for(settings: CoordinatorSettings, broker: MemoryBroker) -> Coordinator:
    return coordinators.hashing_coordinator(
        settings, with_recording(broker.connect(COORDINATOR_USER), settings)
    )


def published_labels(coordinator: Coordinator) -> dict[tuple[int, int], bytes]:
    return {
        (row.round_id, closing.shard_id): closing.labels
        for row in coordinator.store.rounds()
        for closing in coordinator.store.closings(row.round_id)
        if closing.labels is not None
    }


async def record_federation(
    directory: Path, *, delay: float = 0.0, rotate_bytes: int = 1 << 20, **round_overrides: object
) -> RecordedRun:
    """Two rounds of five scripted participants; mallory sends garbage and a forgery in round 1."""
    config = write_config(directory, rotate_bytes=rotate_bytes, **round_overrides)
    settings = load_coordinator_settings(config, env={})
    broker = MemoryBroker()
    broker.declare(full_topology([*NAMES, "mallory"]))
    coordinator = coordinator_for(settings, broker)
    async with coordinator.transport:
        await coordinator.start()
        participants = [ScriptedParticipant(n, broker.connect(n), answers, delay=delay) for n in NAMES]
        for participant in participants:
            await participant.join()
        drive = asyncio.create_task(coordinator.drive())
        await asyncio.wait_for(round_opened(coordinator), 5.0)
        await send_bad_traffic(broker, coordinator)
        await asyncio.wait_for(drive, 20.0)
        await asyncio.sleep(0.05)
        await coordinator.stop_intake()
        for participant in participants:
            await participant.leave()
    labels = published_labels(coordinator)
    coordinator.store.close()
    return RecordedRun(settings=settings, records=Path(settings.recording.directory), labels=labels)


async def round_opened(coordinator: Coordinator) -> None:
    while coordinator.round is None:  # noqa: ASYNC110 - the service exposes no event for it
        await asyncio.sleep(0.005)


async def send_bad_traffic(broker: MemoryBroker, coordinator: Coordinator) -> None:
    assert coordinator.round is not None
    prompt_id = coordinator.round.shards[0].prompt_ids[0]
    mallory = broker.connect("mallory")
    forged = GenerationBatch(
        federation="test",
        round_id=coordinator.round.round_id,
        message_id=new_message_id(),
        participant_id="alice",
        shard_id=0,
        model_id="x",
        answers=[Answer(prompt_id=prompt_id, text="forged")],
    )
    await mallory.publish(
        UP_EXCHANGE, generation_key(0, "mallory"), b"\x93garbage", message_id=new_message_id()
    )
    # Under her own routing key (RabbitMQ's topic permission would refuse another), claiming to be alice.
    await mallory.publish(
        UP_EXCHANGE, generation_key(0, "mallory"), encode(forged), message_id=forged.message_id
    )
