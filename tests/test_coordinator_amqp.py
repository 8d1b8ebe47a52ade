"""The coordinator on a real RabbitMQ node, with scripted participants logged in as themselves."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest
from support.brokers import participant_url
from support.coordinators import coordinator_at, federation_config
from support.scripted import participant_at
from support.waiting import eventually

from broker.amqp import AmqpTransport
from broker.local_node import LocalNode
from broker.topology import DEAD_LETTER_QUEUE, UP_EXCHANGE, generation_key
from broker.transport import REASON_HEADER, Delivery
from schemas import Answer, GenerationBatch, encode, new_message_id

pytestmark = pytest.mark.amqp


async def test_round_with_a_straggler_and_a_forger_on_rabbitmq(
    tmp_path: Path, rabbit_node: LocalNode, rabbit_participants: dict[str, str]
) -> None:
    federation = f"f{secrets.token_hex(3)}"
    config = federation_config(tmp_path, federation, min_participants=4, quorum=3, grace_seconds=0.5)
    coordinator = await coordinator_at(rabbit_node.coordinator_url, config)
    names = [rabbit_participants[r] for r in ("alice", "bob", "carol", "dave")]
    dead: list[Delivery] = []

    async def collect(delivery: Delivery) -> None:
        if federation in delivery.body.decode("latin-1"):
            dead.append(delivery)

    inspector = AmqpTransport(rabbit_node.coordinator_url, connection_name="test inspector")
    await inspector.__aenter__()
    await inspector.consume(DEAD_LETTER_QUEUE, collect)
    await coordinator.start()
    participants = [
        await participant_at(
            participant_url(rabbit_node, n), n, federation, delay=6.0 if n == names[3] else 0.0
        )
        for n in names
    ]
    for participant in participants:
        await participant.join()
    drive = asyncio.create_task(coordinator.drive())
    await eventually(lambda: coordinator.round is not None)
    assert coordinator.round is not None
    # dave (logged in as dave) claims to be alice: the broker stamps user_id=dave, the coordinator refuses
    forged = GenerationBatch(
        federation=federation,
        round_id=coordinator.round.round_id,
        message_id=new_message_id(),
        participant_id=names[0],
        shard_id=0,
        model_id="x",
        answers=[Answer(prompt_id=coordinator.round.shards[0].prompt_ids[0], text="forged")],
    )
    await participants[3].transport.publish(
        UP_EXCHANGE, generation_key(0, names[3]), encode(forged), message_id=forged.message_id
    )
    await asyncio.wait_for(drive, 30)
    await asyncio.sleep(0.3)
    (summary,) = coordinator.closed_rounds
    assert summary.answered == sorted(names[:3])
    assert summary.missing == [names[3]]
    assert sum(o.labelled for o in summary.shards) == 6
    for participant in participants[:3]:
        assert len(participant.labels) == 3
    assert any("does not match participant_id" in str(d.headers.get(REASON_HEADER)) for d in dead)
    await coordinator.stop_intake()
    for participant in participants:
        await participant.leave()
        await participant.transport.close()
    await inspector.close()
    await coordinator.transport.close()


async def test_coordinator_killed_mid_round_resumes_on_rabbitmq(
    tmp_path: Path, rabbit_node: LocalNode, rabbit_participants: dict[str, str]
) -> None:
    federation = f"f{secrets.token_hex(3)}"
    names = [rabbit_participants[r] for r in ("alice", "bob", "carol")]
    config = federation_config(tmp_path, federation, min_participants=3, quorum=3)
    first = await coordinator_at(rabbit_node.coordinator_url, config)
    await first.start()
    participants = [
        await participant_at(
            participant_url(rabbit_node, n), n, federation, delay=0.0 if n != names[2] else 1.0
        )
        for n in names
    ]
    for participant in participants:
        await participant.join()
    drive = asyncio.create_task(first.drive())
    await asyncio.sleep(0.5)  # two of three answered
    drive.cancel()
    await first.transport.close()  # the crash: unacked deliveries go back to the queues
    first.store.close()

    second = await coordinator_at(rabbit_node.coordinator_url, config)
    await second.start()
    await asyncio.wait_for(second.drive(), 30)
    await asyncio.sleep(0.3)
    (summary,) = second.closed_rounds
    assert summary.answered == sorted(names)
    for participant in participants:
        assert len(participant.labels) == 3
        assert participant.label_deliveries == 3  # none published twice
    await second.stop_intake()
    for participant in participants:
        await participant.leave()
        await participant.transport.close()
    await second.transport.close()
