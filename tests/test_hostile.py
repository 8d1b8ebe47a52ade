"""Hostile input: 10,000 Hypothesis-drawn bad payloads at a coordinator on RabbitMQ, among good traffic.

Every bad payload goes through a participant's own broker user (only they may publish on
`chorus.up` under their keys), so the broker lets it in and the coordinator must judge it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import pytest
import structlog
import structlog.testing
from support.coordinators import coordinator_at, federation_config, memory_coordinator, run_with_participants
from support.hostile import Hostile, Target, draw_hostile, oversized_bodies
from support.scripted import ScriptedParticipant, consensus_answers
from support.waiting import eventually

from broker.amqp import AmqpTransport
from broker.local_node import LocalNode
from broker.memory import MemoryBroker
from broker.topology import COORDINATOR_USER, DEAD_LETTER_QUEUE, UP_EXCHANGE, full_topology, generation_key
from broker.transport import REASON_HEADER, Delivery
from schemas import Answer, GenerationBatch, encode
from schemas.codec import decode_control, decode_generation, decode_reply
from schemas.errors import SchemaError

HOSTILE = 10_000
ROLES = ("alice", "bob", "carol", "dave")
ROUND = {"min_participants": 4, "quorum": 4, "shards": 4, "prompts_per_round": 8, "deadline_seconds": 120.0}
IN_FLIGHT = 256  # concurrent unconfirmed publishes per connection


@pytest.mark.parametrize(
    "body",
    [
        b"\xa2\xb5\xb5",  # a str that is not UTF-8
        b"\x82\xa4kind\xb0generation_batch\xa5model\xa2\xff\xfe",
        b"\x91" * 5_000 + b"\x01",  # nested deeper than msgspec decodes
        b"\x82\xa4kind\xb0generation_batch\xa5model" + b"\x91" * 5_000 + b"\x01",
    ],
)
def test_the_codec_turns_every_decoder_failure_into_a_schema_error(body: bytes) -> None:
    # These once escaped as UnicodeDecodeError / RecursionError: the handler then failed and requeued
    # the message until the delivery limit, instead of dead-lettering it with its reason.
    for decode in (decode_generation, decode_control, decode_reply):
        with pytest.raises(SchemaError) as caught:
            decode(body)
        assert caught.value.problem in ("malformed", "too_large")


async def clean_run(tmp_path: Path, federation: str, names: list[str]) -> list[ScriptedParticipant]:
    """The same round on the in-memory broker, with no hostile traffic: the labels to match."""
    broker = MemoryBroker()
    broker.declare(full_topology(names))
    coordinator = memory_coordinator(federation_config(tmp_path, federation, **ROUND), broker)
    participants = [ScriptedParticipant(n, broker.connect(n), consensus_answers, federation) for n in names]
    await run_with_participants(coordinator, participants)
    coordinator.store.close()
    return participants


async def flood(connections: dict[str, AmqpTransport], payloads: list[Hostile], ids: list[str]) -> None:
    limits = {user: asyncio.Semaphore(IN_FLIGHT) for user in connections}

    async def send(payload: Hostile, message_id: str) -> None:
        transport = connections[payload.user]
        async with limits[payload.user]:
            if payload.without_user_id:
                await transport.publish_with_user_id_for_tests(
                    UP_EXCHANGE,
                    payload.routing_key,
                    payload.body,
                    message_id=message_id,
                    user_id=None,
                    timeout=60,
                )
            else:
                await transport.publish(
                    UP_EXCHANGE, payload.routing_key, payload.body, message_id=message_id, timeout=60
                )

    await asyncio.gather(*(send(p, i) for p, i in zip(payloads, ids, strict=True)))


@pytest.mark.amqp
@pytest.mark.timeout(240)
# Hypothesis draws the payloads once, in bulk; it warns that their repr (kept for failure reports) is large.
@pytest.mark.filterwarnings("ignore:Generating overly large repr")
async def test_ten_thousand_hostile_payloads_are_dead_lettered_and_the_round_is_unchanged(
    tmp_path: Path, rabbit_node: LocalNode
) -> None:
    tag = secrets.token_hex(3)
    federation = f"f{tag}"
    names = [f"h{role}-{tag}" for role in ROLES]
    outsider = f"hmallory-{tag}"  # a broker user that never joins
    (tmp_path / "live").mkdir()
    (tmp_path / "clean").mkdir()
    reference = await clean_run(tmp_path / "clean", federation, names)

    started = time.monotonic()
    target = Target(federation, round_id=1, shards=4, members=tuple(names), outsider=outsider)
    payloads = draw_hostile(target, HOSTILE) + oversized_bodies(target, names[0])
    generated = time.monotonic() - started
    assert len({(p.user, p.routing_key, p.body, p.without_user_id) for p in payloads}) >= HOSTILE
    assert {p.category for p in payloads} >= {
        "random_bytes", "truncated", "wrong_type", "huge_text", "huge_list", "huge_body", "unknown_kind",
        "wrong_version", "unknown_round", "foreign_participant", "missing_user_id", "not_expected",
        "deep_nesting",
    }  # fmt: skip
    ids = [f"hostile-{tag}-{i}" for i in range(len(payloads))]

    urls = rabbit_node.add_vhost(f"hostile-{tag}", (*names, outsider))
    capture = structlog.testing.capture_logs()
    logs = capture.__enter__()
    config = federation_config(tmp_path / "live", federation, **ROUND)
    coordinator = await coordinator_at(urls[COORDINATOR_USER], config, "test hostile coordinator")
    inspector = AmqpTransport(urls[COORDINATOR_USER], connection_name="test hostile inspector")
    connections = {
        user: AmqpTransport(urls[user], connection_name=f"test hostile {user}") for user in (*names, outsider)
    }
    participants: list[ScriptedParticipant] = []
    dead: dict[str, Delivery] = {}

    async def collect(delivery: Delivery) -> None:
        dead[delivery.message_id or ""] = delivery

    try:
        await inspector.connect()
        await inspector.consume(DEAD_LETTER_QUEUE, collect)
        for transport in connections.values():
            await transport.connect()
        await coordinator.start()
        for name in names:
            transport = AmqpTransport(urls[name], connection_name=f"test good {name}")
            await transport.connect()
            # dave answers only once the flood is judged: until then the round stays open (quorum 4)
            delay = 0.5 if name != names[3] else 3600.0
            participants.append(
                ScriptedParticipant(name, transport, consensus_answers, federation, delay=delay)
            )
        for participant in participants:
            await participant.join()
        drive = asyncio.create_task(coordinator.drive())
        await eventually(lambda: coordinator.round is not None)
        assert coordinator.round is not None and coordinator.round.round_id == 1
        assert sorted(coordinator.round.shards) == [0, 1, 2, 3]

        flood_started = time.monotonic()
        await flood(connections, payloads, ids)  # alice, bob and carol answer meanwhile
        published = time.monotonic() - flood_started
        await eventually(lambda: len(dead) >= len(payloads), timeout=120)
        judged = time.monotonic() - flood_started
        assert not drive.done()  # the driver survived
        assert coordinator.round is not None and coordinator.round.round_id == 1  # still open, for dave

        refused = [e for e in logs if e["event"].startswith("cannot publish to the dead-letter")]
        assert not refused, f"{len(refused)} dead-letter copies failed, e.g. {refused[0]['error']}"
        reasons = {p.category: 0 for p in payloads}
        for payload, message_id in zip(payloads, ids, strict=True):
            reason = str(dead[message_id].headers.get(REASON_HEADER))
            assert payload.matches(reason), (payload.category, payload.expected, reason)
            reasons[payload.category] += 1
        assert set(dead) == set(ids)
        assert coordinator.counters.dead_lettered == len(payloads)
        assert coordinator.counters.accepted == 3 * 4  # alice, bob, carol: one batch per shard each

        dave = participants[3]
        dave.delay = 0.0
        await dave._answer(dave.opened[0])  # intake still works: the last good batches close the round
        await asyncio.wait_for(drive, 30)
        # after the close, round 1 is a closed round
        closed = [
            GenerationBatch(
                federation=federation,
                round_id=1,
                message_id=f"late-{tag}-{s}",
                participant_id=names[0],
                shard_id=s,
                model_id="m",
                answers=[Answer(prompt_id="q0", text="late")],
            )
            for s in range(4)
        ]
        for batch in closed:
            await connections[names[0]].publish(
                UP_EXCHANGE,
                generation_key(batch.shard_id, names[0]),
                encode(batch),
                message_id=batch.message_id,
            )
        await eventually(lambda: all(b.message_id in dead for b in closed))
        for batch in closed:
            assert dead[batch.message_id].headers[REASON_HEADER] == "round 1 is not open (open round: none)"
        assert coordinator.counters.dead_lettered == len(payloads) + len(closed)
        await eventually(lambda: all(len(p.closed) == 1 for p in participants))

        (summary,) = coordinator.closed_rounds
        assert summary.answered == sorted(names) and summary.missing == [] and summary.late == []
        for live, clean in zip(participants, reference, strict=True):
            assert live.participant_id == clean.participant_id
            assert live.labels.keys() == clean.labels.keys() == {(1, s) for s in range(4)}
            for key in clean.labels:
                assert live.labels[key].labels == clean.labels[key].labels
                assert live.labels[key].abstained == clean.labels[key].abstained
            assert live.label_deliveries == 4
        sizes = sum(len(p.body) for p in payloads)
        print(
            f"\nhostile: {len(payloads)} payloads ({sizes / 1e6:.1f} MB), drawn in {generated:.1f}s, "
            f"published in {published:.1f}s, all dead-lettered {judged:.1f}s after the first: "
            f"{len(payloads) / judged:.0f} payloads/s; by category {reasons}"
        )
    finally:
        capture.__exit__(None, None, None)
        await coordinator.stop_intake()
        for participant in participants:
            await participant.leave()
            await participant.transport.close()
        for transport in connections.values():
            await transport.close()
        await inspector.close()
        await coordinator.transport.close()
        coordinator.store.close()
