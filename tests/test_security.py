"""What a participant's broker user cannot do, proven against the real RabbitMQ node.

Each test works in a vhost of its own (`LocalNode.add_vhost`, with the same least-privilege
grants as `chorus-broker add-participant`), so queue depths are exactly what these tests did.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support.coordinators import federation_config, hashing_coordinator
from support.waiting import eventually

from broker.amqp import AccessRefused, AmqpTransport
from broker.errors import BrokerError
from broker.local_node import LocalNode
from broker.topology import (
    ANNOUNCE_EXCHANGE,
    COORDINATOR_USER,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DIRECT_EXCHANGE,
    LOBBY_QUEUE,
    UP_EXCHANGE,
    control_key,
    generation_key,
    intake_queue,
    intake_topology,
    reply_key,
    reply_queue,
)
from broker.transport import (
    ORIGINAL_USER_HEADER,
    REASON_HEADER,
    BindingSpec,
    Delivery,
    ExchangeSpec,
    QueueSpec,
    Topology,
)
from coordinator.settings import load_coordinator_settings
from schemas import Answer, GenerationBatch, Heartbeat, encode, new_message_id

pytestmark = pytest.mark.amqp


@dataclass
class Federation:
    vhost: str
    urls: dict[str, str]  # user -> URL on the vhost
    alice: str
    bob: str


@pytest.fixture(scope="module")
def federation(rabbit_node: LocalNode) -> Iterator[Federation]:
    tag = secrets.token_hex(3)
    alice, bob = f"sec-alice-{tag}", f"sec-bob-{tag}"
    vhost = f"security-{tag}"
    yield Federation(vhost, rabbit_node.add_vhost(vhost, (alice, bob)), alice, bob)


@pytest.fixture
async def connections(federation: Federation) -> AsyncIterator[dict[str, AmqpTransport]]:
    opened = {
        user: AmqpTransport(url, connection_name=f"test security {user}")
        for user, url in federation.urls.items()
    }
    for transport in opened.values():
        await transport.connect()
    # The coordinator's part: the participants' intake queues, which only it declares.
    await opened[COORDINATOR_USER].declare(intake_topology([federation.alice, federation.bob]))
    try:
        yield opened
    finally:
        for transport in opened.values():
            await transport.close()


def heartbeat(participant_id: str) -> tuple[bytes, str]:
    message = Heartbeat(
        federation="sec",
        round_id=0,
        message_id=new_message_id(),
        participant_id=participant_id,
        sent_unix=1.0,
    )
    return encode(message), message.message_id


def batch(participant_id: str, federation: str = "sec") -> tuple[bytes, str]:
    message = GenerationBatch(
        federation=federation,
        round_id=1,
        message_id=new_message_id(),
        participant_id=participant_id,
        shard_id=0,
        model_id="m",
        answers=[Answer(prompt_id="q0", text="hello")],
    )
    return encode(message), message.message_id


async def depths(coordinator: AmqpTransport, queues: list[str]) -> dict[str, int]:
    return {queue: await coordinator.queue_depth(queue) for queue in queues}


async def drain(coordinator: AmqpTransport, queue: str) -> list[Delivery]:
    """Take every message now in `queue` (acked), so the next test starts from an empty queue."""
    taken: list[Delivery] = []

    async def take(delivery: Delivery) -> None:
        taken.append(delivery)

    expected = await coordinator.queue_depth(queue)
    subscription = await coordinator.consume(queue, take)
    await eventually(lambda: len(taken) >= expected)
    await subscription.cancel()
    return taken


async def test_a_participant_cannot_publish_under_another_participants_key(
    federation: Federation, connections: dict[str, AmqpTransport]
) -> None:
    alice, bob = federation.alice, federation.bob
    mallory = connections[alice]  # alice's login, acting against bob
    coordinator = connections[COORDINATOR_USER]
    watched = [intake_queue(alice), intake_queue(bob), LOBBY_QUEUE]
    before = await depths(coordinator, watched)
    assert before == dict.fromkeys(watched, 0)

    refused = [
        (UP_EXCHANGE, generation_key(0, bob), batch(bob)),
        (UP_EXCHANGE, generation_key(1, bob), batch(alice)),
        (UP_EXCHANGE, control_key(bob), heartbeat(bob)),
        (UP_EXCHANGE, control_key(alice) + ".x", heartbeat(alice)),  # the pattern is anchored
        (UP_EXCHANGE, f"gen.x.{alice}", batch(alice)),  # shard must be digits
        (DIRECT_EXCHANGE, reply_key(bob), heartbeat(alice)),  # write only on chorus.up
        (ANNOUNCE_EXCHANGE, "", heartbeat(alice)),
        (DEAD_LETTER_EXCHANGE, "dead", heartbeat(alice)),
        ("", reply_queue(bob), heartbeat(alice)),  # the default exchange
    ]
    for exchange, key, (body, message_id) in refused:
        with pytest.raises(AccessRefused, match="may not publish") as caught:
            await mallory.publish(exchange, key, body, message_id=message_id)
        assert isinstance(caught.value, BrokerError)
        assert "ACCESS_REFUSED" in str(caught.value.__cause__)
    # the refusals stored nothing, and the same connection can still publish under its own keys
    assert await depths(coordinator, watched) == before
    assert await coordinator.queue_depth(reply_queue(bob)) == 0
    for key, (body, message_id) in [
        (generation_key(0, alice), batch(alice)),
        (control_key(alice), heartbeat(alice)),
    ]:
        await mallory.publish(UP_EXCHANGE, key, body, message_id=message_id)
    # Both land in alice's own intake queue; the lobby gets a copy of the control message.
    assert await depths(coordinator, watched) == {
        intake_queue(alice): 2,
        intake_queue(bob): 0,
        LOBBY_QUEUE: 1,
    }
    for queue in (intake_queue(alice), LOBBY_QUEUE):
        assert {d.user_id for d in await drain(coordinator, queue)} == {alice}


async def test_the_broker_refuses_a_forged_user_id(
    federation: Federation, connections: dict[str, AmqpTransport]
) -> None:
    alice, bob = federation.alice, federation.bob
    mallory = connections[alice]
    coordinator = connections[COORDINATOR_USER]
    for forged in (bob, COORDINATOR_USER, "guest", f"{alice}x"):
        body, message_id = batch(forged)
        with pytest.raises(BrokerError, match="refused the publish") as caught:
            await mallory.publish_with_user_id_for_tests(
                UP_EXCHANGE, generation_key(0, alice), body, message_id=message_id, user_id=forged
            )
        assert "PRECONDITION_FAILED" in str(caught.value.__cause__)
        assert "user_id property set to" in str(caught.value.__cause__)
    assert await coordinator.queue_depth(intake_queue(alice)) == 0
    # the raw path is no loophole: user_id = the login is accepted, as from `publish`
    body, message_id = batch(alice)
    await mallory.publish_with_user_id_for_tests(
        UP_EXCHANGE, generation_key(0, alice), body, message_id=message_id, user_id=alice
    )
    (delivery,) = await drain(coordinator, intake_queue(alice))
    assert delivery.user_id == alice and delivery.message_id == message_id


async def test_a_participant_cannot_read_another_participants_reply_queue(
    federation: Federation, connections: dict[str, AmqpTransport]
) -> None:
    alice, bob = federation.alice, federation.bob
    coordinator = connections[COORDINATOR_USER]
    body, message_id = heartbeat(COORDINATOR_USER)
    await coordinator.publish(DIRECT_EXCHANGE, reply_key(bob), body, message_id=message_id)
    got: list[Delivery] = []

    async def steal(delivery: Delivery) -> None:
        got.append(delivery)

    for queue in (reply_queue(bob), intake_queue(bob), intake_queue(alice), LOBBY_QUEUE, DEAD_LETTER_QUEUE):
        with pytest.raises(AccessRefused, match="may not consume"):
            await connections[alice].consume(queue, steal)
    assert got == []
    assert await coordinator.queue_depth(reply_queue(bob)) == 1  # still there, for bob
    # bob reads it; alice may read her own queue
    (delivery,) = await drain(connections[bob], reply_queue(bob))
    assert delivery.message_id == message_id
    subscription = await connections[alice].consume(reply_queue(alice), steal)
    await subscription.cancel()


async def test_a_participant_cannot_declare_bind_delete_or_purge(
    federation: Federation, connections: dict[str, AmqpTransport]
) -> None:
    alice, bob = federation.alice, federation.bob
    mallory = connections[alice]
    coordinator = connections[COORDINATOR_USER]
    own = reply_queue(alice)
    attempts = [
        Topology(queues=(QueueSpec(f"chorus.reply.{alice}-2"),)),
        Topology(queues=(QueueSpec(own),)),  # even its own queue, non-passively
        Topology(exchanges=(ExchangeSpec("chorus.evil", "topic"),)),
        Topology(exchanges=(ExchangeSpec(UP_EXCHANGE, "topic"),)),
        Topology(bindings=(BindingSpec(own, UP_EXCHANGE, "gen.0.*"),)),  # eavesdrop on shard 0
        Topology(bindings=(BindingSpec(own, DIRECT_EXCHANGE, reply_key(bob)),)),  # bob's labels
        Topology(bindings=(BindingSpec(own, ANNOUNCE_EXCHANGE, "x"),)),
    ]
    for topo in attempts:
        with pytest.raises(AccessRefused, match=r"may not (declare|bind)"):
            await mallory.declare(topo)

    body, message_id = heartbeat(COORDINATOR_USER)
    await coordinator.publish(DIRECT_EXCHANGE, reply_key(bob), body, message_id=message_id)

    async def raw(operation: str, **arguments: Any) -> None:
        channel = await mallory.connection.channel()
        underlay = await channel.get_underlay_channel()
        await mallory.connection.guard(getattr(underlay, operation)(**arguments), operation)

    for operation, arguments in [
        ("queue_delete", {"queue": reply_queue(bob)}),
        ("queue_delete", {"queue": own}),
        ("queue_delete", {"queue": intake_queue(bob)}),
        ("queue_purge", {"queue": reply_queue(bob)}),
        ("queue_purge", {"queue": intake_queue(bob)}),
        (
            "queue_unbind",
            {"queue": reply_queue(bob), "exchange": DIRECT_EXCHANGE, "routing_key": reply_key(bob)},
        ),
        ("exchange_delete", {"exchange": UP_EXCHANGE}),
        ("exchange_bind", {"destination": UP_EXCHANGE, "source": DIRECT_EXCHANGE, "routing_key": "#"}),
    ]:
        with pytest.raises(AccessRefused, match=f"may not {operation}"):
            await raw(operation, **arguments)

    # everything is still in place: the queues, bob's waiting message, the binding that delivers to bob
    assert await coordinator.queue_depth(reply_queue(bob)) == 1
    for queue in (own, intake_queue(bob), LOBBY_QUEUE):
        assert await coordinator.queue_depth(queue) == 0
    body, second = heartbeat(COORDINATOR_USER)
    await coordinator.publish(DIRECT_EXCHANGE, reply_key(bob), body, message_id=second)
    assert {d.message_id for d in await drain(coordinator, reply_queue(bob))} == {message_id, second}


async def test_the_coordinator_dead_letters_a_generation_without_user_id(
    tmp_path: Path, federation: Federation, connections: dict[str, AmqpTransport]
) -> None:
    """The broker lets an absent user_id through; the coordinator must not."""
    alice = federation.alice
    name = f"f{secrets.token_hex(3)}"
    settings = load_coordinator_settings(federation_config(tmp_path, name, min_participants=9), env={})
    # alice is on the roster: the coordinator takes her intake queue (declared above) from the start.
    settings = msgspec.structs.replace(settings, roster=[alice])
    coordinator_transport = AmqpTransport(
        federation.urls[COORDINATOR_USER], connection_name="test coordinator"
    )
    coordinator = hashing_coordinator(settings, coordinator_transport)
    await coordinator_transport.connect()
    await coordinator.start()
    try:
        without, forged_body = batch(alice, federation=name), heartbeat(alice)
        body, message_id = without
        await connections[alice].publish_with_user_id_for_tests(
            UP_EXCHANGE, generation_key(0, alice), body, message_id=message_id, user_id=None
        )
        hb_body, hb_id = forged_body
        await connections[alice].publish_with_user_id_for_tests(
            UP_EXCHANGE, control_key(alice), hb_body, message_id=hb_id, user_id=None
        )
        inspector = connections[COORDINATOR_USER]
        await eventually(lambda: coordinator.counters.dead_lettered == 2)
        await eventually(lambda: _depth_is(inspector, DEAD_LETTER_QUEUE, 2))
        dead = {d.message_id: d for d in await drain(inspector, DEAD_LETTER_QUEUE)}
        assert dead.keys() == {message_id, hb_id}
        for delivery in dead.values():
            reason = str(delivery.headers[REASON_HEADER])
            assert reason == f"user_id is missing; participant {alice!r} must publish with its own login"
            assert ORIGINAL_USER_HEADER not in delivery.headers
            assert delivery.user_id == COORDINATOR_USER
        assert dead[message_id].body == body
        assert coordinator.store.members() == []  # the heartbeat did not count as alice's
        assert coordinator.counters.accepted == 0
    finally:
        await coordinator.stop_intake()
        await coordinator_transport.close()
        coordinator.store.close()


async def _depth_is(transport: AmqpTransport, queue: str, depth: int) -> bool:
    return await transport.queue_depth(queue) == depth
