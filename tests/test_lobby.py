"""The lobby on the in-memory broker: a Join pushed out of it still gets through, and what a Join or a
Heartbeat may weigh. (tests/test_attacks.py performs the same attacks on RabbitMQ.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
from support.coordinators import memory_coordinator, write_config
from support.scripted import ScriptedParticipant, consensus_answers
from support.waiting import eventually

from broker.memory import MemoryBroker
from broker.topology import (
    DEAD_LETTER_QUEUE,
    LOBBY_MAX_BYTES,
    LOBBY_QUEUE,
    UP_EXCHANGE,
    control_key,
    full_topology,
    intake_topology,
)
from broker.transport import REASON_HEADER, Delivery, Transport
from coordinator.service import Coordinator
from participant.learner import FunctionLearner
from participant.service import Participant
from participant.settings import ParticipantSettings
from schemas import Join, encode, new_message_id

FEDERATION = "test"  # write_config's


def members(coordinator: Coordinator) -> set[str]:
    return {m.participant_id for m in coordinator.store.members()}


async def push_out_of_the_lobby(broker: MemoryBroker, flooder: str) -> None:
    """Control messages from `flooder` until what the lobby held before them is dropped (drop-head)."""
    transport = broker.connect(flooder)
    for _ in range(LOBBY_MAX_BYTES // (4 * 1024 * 1024) + 1):
        await transport.publish(
            UP_EXCHANGE, control_key(flooder), bytes(4 * 1024 * 1024), message_id=new_message_id()
        )
    assert broker.queue_depth(LOBBY_QUEUE) <= LOBBY_MAX_BYTES // (4 * 1024 * 1024)


async def heartbeat(transport: Transport, participant_id: str, **padding: bytes) -> None:
    beat = {
        "kind": "heartbeat",
        "federation": FEDERATION,
        "round_id": 0,
        "message_id": new_message_id(),
        "participant_id": participant_id,
        "sent_unix": time.time(),
        **padding,
    }
    body = msgspec.msgpack.encode(beat)
    await transport.publish(
        UP_EXCHANGE, control_key(participant_id), body, message_id=str(beat["message_id"])
    )


async def test_a_join_pushed_out_of_the_lobby_is_read_from_the_senders_intake_queue(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.declare(full_topology(["olga", "mallory"]).merged(intake_topology(["olga"])))  # olga provisioned
    coordinator = memory_coordinator(write_config(tmp_path, min_participants=1, quorum=1), broker)
    await coordinator.start()
    await coordinator.stop_intake()  # away while olga joins and mallory fills the lobby
    olga = ScriptedParticipant("olga", broker.connect("olga"), consensus_answers)
    await olga.join()  # one Join, as a client written from PROTOCOL.md's first text sends
    await push_out_of_the_lobby(broker, "mallory")
    await coordinator.start()
    await asyncio.sleep(0.2)
    assert "olga" not in members(coordinator)  # her Join is only in her own intake queue now
    await heartbeat(olga.transport, "olga")  # her next heartbeat rings the bell
    await eventually(lambda: "olga" in members(coordinator), timeout=5.0)
    await coordinator.stop_intake()


async def test_the_participant_service_sends_its_join_again_until_a_round_expects_it(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.declare(full_topology(["nina", "mallory"]))  # no intake queue: her Join is in the lobby alone
    coordinator = memory_coordinator(write_config(tmp_path, min_participants=1, quorum=1, rounds=1), broker)
    await coordinator.start()
    await coordinator.stop_intake()
    settings = ParticipantSettings(
        federation=FEDERATION, participant_id="nina", state_dir=str(tmp_path / "nina"), progress=False
    )
    learner = FunctionLearner(lambda prompt: f"The answer to {prompt} is the standard one.", model_id="box")
    nina = Participant(settings, broker.connect("nina"), learner)
    await nina.start()
    try:
        await push_out_of_the_lobby(broker, "mallory")
        await coordinator.start()
        await eventually(lambda: "nina" in members(coordinator), timeout=5.0)  # sent again after 1 s
        await asyncio.wait_for(coordinator.drive(), 10.0)
        await eventually(lambda: nina._rejoin is not None and nina._rejoin.done(), timeout=5.0)
    finally:
        await nina.stop()
        await coordinator.stop_intake()


async def test_a_join_or_a_heartbeat_over_4_kib_is_refused_unread(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.declare(full_topology(["alice"]))
    coordinator = memory_coordinator(write_config(tmp_path, min_participants=1, quorum=1), broker)
    dead: list[Delivery] = []

    async def collect(delivery: Delivery) -> None:
        dead.append(delivery)

    await broker.connect("inspector").consume(DEAD_LETTER_QUEUE, collect)
    await coordinator.start()
    alice = broker.connect("alice")
    # A Join at its field limits (ids and model of 4-byte code points) is well under the limit.
    join = Join(
        federation=FEDERATION,
        round_id=2**63 - 1,
        message_id="\U0001f600" * 128,
        participant_id="alice",
        model_id="\U0001f600" * 256,
    )
    assert len(encode(join)) < 2048
    await alice.publish(UP_EXCHANGE, control_key("alice"), encode(join), message_id="join")
    await eventually(lambda: "alice" in members(coordinator), timeout=5.0)
    await heartbeat(alice, "alice", pad=b"p" * 4096)  # valid, padded with a key no decoder knows
    await eventually(lambda: len(dead) == 1, timeout=5.0)
    reason = str(dead[0].headers[REASON_HEADER])
    assert reason.startswith("schema too_large: a heartbeat body is at most 4096 bytes"), reason
    await coordinator.stop_intake()


async def test_what_a_newcomer_sent_before_its_intake_queue_existed_is_judged_once(tmp_path: Path) -> None:
    # Its Join and what follows are in the lobby alone (it has no intake queue yet). Once the Join has
    # the coordinator consume its new queue, the rest of its lobby copies have no twin there: they
    # must still be judged, and each once.
    broker = MemoryBroker()
    broker.declare(full_topology(["dana"]))
    coordinator = memory_coordinator(write_config(tmp_path, min_participants=1, quorum=1), broker)
    dead: list[Delivery] = []

    async def collect(delivery: Delivery) -> None:
        dead.append(delivery)

    await broker.connect("inspector").consume(DEAD_LETTER_QUEUE, collect)
    dana = ScriptedParticipant("dana", broker.connect("dana"), consensus_answers)
    await dana.join()
    for _ in range(200):
        await heartbeat(dana.transport, "dana", federation=b"not a string")  # refused: invalid
    await coordinator.start()
    await eventually(lambda: len(dead) == 200, timeout=5.0)
    await asyncio.sleep(0.2)
    assert len(dead) == coordinator.counters.dead_lettered == 200  # none lost, none twice
    assert "dana" in members(coordinator)
    await coordinator.stop_intake()
