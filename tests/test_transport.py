"""One behavioural suite for both transports: the in-memory broker must act like RabbitMQ."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from support.brokers import TransportFactory, participant_url
from support.waiting import eventually

from broker import topology
from broker.amqp import AmqpTransport
from broker.connect import open_transport
from broker.errors import BrokerError, PublishTimeout, QueueFull, TopologyMissing, Unroutable
from broker.local_node import LocalNode
from broker.memory import MemoryBroker, MemoryTransport, binding_matches
from broker.transport import (
    BODY_BYTES_HEADER,
    DEAD_LETTER_BODY_BYTES,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    ORIGINAL_USER_HEADER,
    REASON_HEADER,
    Delivery,
    QueueSpec,
    Topology,
)

GEN = topology.generation_key
TEXT: dict[str, Any] = {"capture_output": True, "text": True, "timeout": 300}
# Any participant's intake queue is a plain work queue for the tests that need one.
ALICE_IN = topology.intake_queue("alice")


def with_limits(topo: Topology, queue: str, **limits: Any) -> Topology:
    """`topo` with `queue` bounded tighter, so that a test fills it with a few messages."""
    return replace(topo, queues=tuple(replace(q, **limits) if q.name == queue else q for q in topo.queues))


class Inbox:
    """A handler that records deliveries (and acks them by returning)."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)

    @property
    def ids(self) -> list[str | None]:
        return [d.message_id for d in self.deliveries]


async def test_round_trip_keeps_body_ids_user_and_routing_key(transport_factory: TransportFactory) -> None:
    f = transport_factory
    coordinator = await f.connect()
    await coordinator.declare(f.topology())
    inbox = Inbox()
    await coordinator.consume(f.name(ALICE_IN), inbox)

    await coordinator.publish(
        f.name(topology.UP_EXCHANGE),
        GEN(1, "alice"),
        b"\x81\xa4kind",
        message_id="m-1",
        headers={"x-round": 3},
    )

    await eventually(lambda: len(inbox.deliveries) == 1)
    delivery = inbox.deliveries[0]
    assert delivery.body == b"\x81\xa4kind"
    assert delivery.message_id == "m-1"
    assert delivery.user_id == topology.COORDINATOR_USER
    assert delivery.exchange == f.name(topology.UP_EXCHANGE)
    assert delivery.routing_key == "gen.1.alice"
    assert delivery.headers["x-round"] == 3
    assert delivery.redelivered is False
    assert delivery.timestamp is not None
    # Returning without settling acked it: nothing is left and nothing comes back.
    await eventually(lambda: delivery.settled)
    await asyncio.sleep(0.1)
    assert len(inbox.deliveries) == 1
    assert await f.depth(coordinator, f.name(ALICE_IN)) == 0


async def test_participant_traffic_reaches_only_its_own_intake_queue(
    transport_factory: TransportFactory,
) -> None:
    f = transport_factory
    transport = await f.connect()
    await transport.declare(f.topology(participants=("alice", "bob")))
    up = f.name(topology.UP_EXCHANGE)
    for shard in (0, 2, 2):
        await transport.publish(up, GEN(shard, "alice"), b"g", message_id=f"g{shard}")
    await transport.publish(up, topology.control_key("alice"), b"c", message_id="c")
    await transport.publish(up, GEN(1, "bob"), b"g", message_id="b1")
    await transport.publish(
        f.name(topology.DIRECT_EXCHANGE), topology.reply_key("alice"), b"r", message_id="r"
    )

    depths = {
        name: await f.depth(transport, f.name(name))
        for name in (
            topology.intake_queue("alice"),
            topology.intake_queue("bob"),
            topology.reply_queue("alice"),
            topology.reply_queue("bob"),
            topology.LOBBY_QUEUE,
            topology.DEAD_LETTER_QUEUE,
        )
    }
    assert depths == {
        "chorus.in.alice": 4,  # every shard's generations and its control messages
        "chorus.in.bob": 1,
        "chorus.reply.alice": 1,
        "chorus.reply.bob": 0,
        "chorus.lobby": 1,  # a copy of alice's control message, as of every Join
        "chorus.dead": 0,
    }


async def test_announcement_fans_out_to_every_reply_queue(transport_factory: TransportFactory) -> None:
    f = transport_factory
    transport = await f.connect()
    await transport.declare(f.topology(participants=("alice", "bob")))
    await transport.publish(f.name(topology.ANNOUNCE_EXCHANGE), "", b"round opened", message_id="a1")
    assert await f.depth(transport, f.name(topology.reply_queue("alice"))) == 1
    assert await f.depth(transport, f.name(topology.reply_queue("bob"))) == 1


async def test_bcc_publish_puts_one_copy_in_each_routed_queue_and_hides_the_keys(
    transport_factory: TransportFactory,
) -> None:
    f = transport_factory
    transport = await f.connect()
    people = ("alice", "bob", "carol")
    await transport.declare(f.topology(participants=people))
    down = f.name(topology.DIRECT_EXCHANGE)
    # alice twice (key and BCC), carol not at all, one key that routes nowhere.
    await transport.publish(
        down,
        topology.reply_key("alice"),
        b"labels",
        message_id="s0.labels",
        headers={"x-round": 2},
        bcc=[topology.reply_key("bob"), topology.reply_key("alice"), topology.reply_key("nobody")],
    )
    depths = {p: await f.depth(transport, f.name(topology.reply_queue(p))) for p in people}
    assert depths == {"alice": 1, "bob": 1, "carol": 0}

    inbox = Inbox()
    await transport.consume(f.name(topology.reply_queue("bob")), inbox)
    await eventually(lambda: len(inbox.deliveries) == 1)
    delivery = inbox.deliveries[0]
    assert (delivery.body, delivery.message_id, delivery.user_id) == (b"labels", "s0.labels", transport.user)
    assert delivery.routing_key == topology.reply_key("alice")  # the publish's own key, not bob's
    assert delivery.headers.get("x-round") == 2
    assert "BCC" not in delivery.headers  # recipients do not learn who else got it

    # A key that routes nowhere, with the recipients in BCC only (how the coordinator sends labels).
    await transport.publish(
        down, topology.SHARED_REPLY_KEY, b"more", message_id="s1.labels", bcc=[topology.reply_key("carol")]
    )
    assert await f.depth(transport, f.name(topology.reply_queue("carol"))) == 1
    with pytest.raises(Unroutable):
        await transport.publish(
            down, topology.SHARED_REPLY_KEY, b"x", message_id="lost", bcc=[topology.reply_key("nobody")]
        )


async def test_unroutable_publish_raises(transport_factory: TransportFactory) -> None:
    f = transport_factory
    transport = await f.connect()
    await transport.declare(f.topology())
    with pytest.raises(Unroutable):
        await transport.publish(
            f.name(topology.DIRECT_EXCHANGE), topology.reply_key("nobody"), b"x", message_id="lost"
        )
    with pytest.raises(Unroutable):
        await transport.publish(
            f.name(topology.DEAD_LETTER_EXCHANGE), "not-the-dead-key", b"x", message_id="l2"
        )
    # The transport stays usable after a return.
    await transport.publish(f.name(topology.UP_EXCHANGE), GEN(0, "alice"), b"x", message_id="kept")
    assert await f.depth(transport, f.name(ALICE_IN)) == 1


async def test_missing_exchange_and_queue_are_errors(transport_factory: TransportFactory) -> None:
    f = transport_factory
    transport = await f.connect()
    with pytest.raises(BrokerError):
        await transport.publish(f.name("no.such.exchange"), "k", b"x", message_id="x")
    with pytest.raises(TopologyMissing):
        await transport.consume(f.name("no.such.queue"), Inbox())
    # Still usable afterwards (a 404 closes an AMQP channel; it must not be the one we publish on).
    await transport.declare(f.topology())
    await transport.publish(f.name(topology.UP_EXCHANGE), GEN(0, "alice"), b"x", message_id="after")
    assert await f.depth(transport, f.name(ALICE_IN)) == 1


async def test_requeued_message_comes_back_redelivered(transport_factory: TransportFactory) -> None:
    f = transport_factory
    transport = await f.connect()
    await transport.declare(f.topology())
    seen: list[Delivery] = []

    async def requeue_first(delivery: Delivery) -> None:
        seen.append(delivery)
        if len(seen) == 1:
            await delivery.requeue()

    await transport.consume(f.name(ALICE_IN), requeue_first)
    await transport.publish(f.name(topology.UP_EXCHANGE), GEN(0, "alice"), b"x", message_id="again")
    await eventually(lambda: len(seen) == 2)
    assert [d.redelivered for d in seen] == [False, True]
    assert {d.message_id for d in seen} == {"again"}


async def test_failing_handler_ends_in_dead_letter_queue_after_delivery_limit(
    transport_factory: TransportFactory,
) -> None:
    f = transport_factory
    transport = await f.connect()
    await transport.declare(f.topology(participants=("mallory",), delivery_limit=2))
    attempts: list[Delivery] = []

    async def always_fails(delivery: Delivery) -> None:
        attempts.append(delivery)
        raise RuntimeError("poison")

    await transport.consume(f.name(topology.intake_queue("mallory")), always_fails)
    await transport.publish(f.name(topology.UP_EXCHANGE), GEN(0, "mallory"), b"poison", message_id="p1")

    dead = Inbox()
    await transport.consume(f.name(topology.DEAD_LETTER_QUEUE), dead)
    await eventually(lambda: len(dead.deliveries) == 1)
    # Quorum queues dead-letter once the failed deliveries exceed the limit: limit + 1 attempts.
    assert len(attempts) == 3
    assert [d.redelivered for d in attempts] == [False, True, True]
    letter = dead.deliveries[0]
    assert letter.message_id == "p1"
    assert letter.body == b"poison"
    assert letter.headers[REASON_HEADER] == "delivery_limit"
    assert letter.headers[ORIGINAL_EXCHANGE_HEADER] == f.name(topology.UP_EXCHANGE)
    assert letter.headers[ORIGINAL_ROUTING_KEY_HEADER] == "gen.0.mallory"


async def test_dead_letter_with_reason(transport_factory: TransportFactory) -> None:
    f = transport_factory
    transport = await f.connect()
    await transport.declare(f.topology(participants=("bob",)))

    async def reject(delivery: Delivery) -> None:
        await delivery.dead_letter("schema: unknown_kind")

    await transport.consume(f.name(topology.intake_queue("bob")), reject)
    await transport.publish(f.name(topology.UP_EXCHANGE), GEN(1, "bob"), b"junk", message_id="j1")

    dead = Inbox()
    await transport.consume(f.name(topology.DEAD_LETTER_QUEUE), dead)
    await eventually(lambda: len(dead.deliveries) == 1)
    letter = dead.deliveries[0]
    assert letter.message_id == "j1"
    assert letter.body == b"junk"
    assert letter.headers[REASON_HEADER] == "schema: unknown_kind"
    assert letter.headers[ORIGINAL_EXCHANGE_HEADER] == f.name(topology.UP_EXCHANGE)
    assert letter.headers[ORIGINAL_ROUTING_KEY_HEADER] == "gen.1.bob"
    assert letter.headers["x-chorus-user-id"] == topology.COORDINATOR_USER
    assert await f.depth(transport, f.name(topology.intake_queue("bob"))) == 0


async def test_up_traffic_that_matches_no_binding_waits_in_the_lobby(
    transport_factory: TransportFactory,
) -> None:
    f = transport_factory
    transport = await f.connect()
    await transport.declare(f.topology(participants=("alice",)))
    up = f.name(topology.UP_EXCHANGE)
    lobby_queue = f.name(topology.LOBBY_QUEUE)
    # A newcomer has no intake queue yet: what it sends is kept, not returned as unroutable.
    await transport.publish(up, GEN(0, "newcomer"), b"g", message_id="n1")
    await transport.publish(up, GEN(0, "alice"), b"g", message_id="a1")
    assert await f.depth(transport, lobby_queue) == 1
    assert await f.depth(transport, f.name(ALICE_IN)) == 1  # a participant with an intake queue gets its own
    # Control traffic (a Join) also leaves a copy in the lobby, whoever sends it.
    await transport.publish(up, topology.control_key("newcomer"), b"join", message_id="n2")
    await transport.publish(up, topology.control_key("alice"), b"join", message_id="a2")
    assert await f.depth(transport, lobby_queue) == 3
    assert await f.depth(transport, f.name(ALICE_IN)) == 2

    lobby = Inbox()
    await transport.consume(lobby_queue, lobby)
    await eventually(lambda: len(lobby.deliveries) == 3)
    assert lobby.ids == ["n1", "n2", "a2"]
    # Delivered as published: the exchange and key it was sent with, and who sent it.
    unmatched = lobby.deliveries[0]
    assert (unmatched.exchange, unmatched.routing_key, unmatched.user_id, unmatched.body) == (
        up,
        "gen.0.newcomer",
        transport.user,
        b"g",
    )
    # Only chorus.up has a lobby.
    with pytest.raises(Unroutable):
        await transport.publish(
            f.name(topology.DIRECT_EXCHANGE), topology.reply_key("newcomer"), b"r", message_id="r1"
        )


async def test_a_full_lobby_drops_its_oldest_and_never_refuses(transport_factory: TransportFactory) -> None:
    f = transport_factory
    transport = await f.connect()
    lobby_queue = f.name(topology.LOBBY_QUEUE)
    await transport.declare(with_limits(f.topology(), lobby_queue, max_length=3))
    # A flood of Joins from unknown participants: no publish is refused, so nobody else's is either.
    for i in range(5):
        await transport.publish(
            f.name(topology.UP_EXCHANGE), topology.control_key(f"stranger{i}"), b"j", message_id=f"j{i}"
        )
    assert await f.depth(transport, lobby_queue) == 3
    lobby = Inbox()
    await transport.consume(lobby_queue, lobby)
    await eventually(lambda: len(lobby.deliveries) == 3)
    assert lobby.ids == ["j2", "j3", "j4"]


@pytest.mark.parametrize("limits", [{"max_length": 3}, {"max_length_bytes": 3 * 7}], ids=["count", "bytes"])
async def test_a_full_intake_queue_refuses_its_owner_only_and_keeps_what_it_holds(
    transport_factory: TransportFactory, limits: dict[str, int]
) -> None:
    f = transport_factory
    transport = await f.connect()
    await transport.declare(
        with_limits(f.topology(participants=("alice", "bob")), f.name(ALICE_IN), **limits)
    )
    up = f.name(topology.UP_EXCHANGE)
    # The memory broker refuses at once; RabbitMQ nacks, and the transport retries until its timeout.
    refusal: type[BrokerError] | tuple[type[BrokerError], ...] = {
        "memory": QueueFull,
        "amqp": PublishTimeout,
    }.get(f.kind, (QueueFull, PublishTimeout))
    accepted: list[tuple[str, bytes]] = []
    for i in range(6):
        body = f"batch {i}".encode()  # 7 bytes
        try:
            await transport.publish(up, GEN(i, "alice"), body, message_id=f"a{i}", timeout=1.0)
        except refusal:
            break
        accepted.append((f"a{i}", body))
    else:
        raise AssertionError("the bounded queue never refused a publish")
    # A quorum queue blocks publishers once an enqueue takes it past its limit: it holds one more.
    assert 3 <= len(accepted) <= 4, accepted

    # alice's flood delays nobody else: bob's own queue still takes his.
    await transport.publish(up, GEN(0, "bob"), b"b", message_id="b0", timeout=5.0)
    assert await f.depth(transport, f.name(topology.intake_queue("bob"))) == 1
    # What alice's queue held is intact, and nothing refused was kept anywhere.
    assert await f.depth(transport, f.name(ALICE_IN)) == len(accepted)
    assert await f.depth(transport, f.name(topology.DEAD_LETTER_QUEUE)) == 0
    assert await f.depth(transport, f.name(topology.LOBBY_QUEUE)) == 0
    inbox = Inbox()
    await transport.consume(f.name(ALICE_IN), inbox)
    await eventually(lambda: len(inbox.deliveries) == len(accepted))
    assert [(d.message_id, d.body) for d in inbox.deliveries] == accepted
    # Once drained, it takes messages again.
    await transport.publish(up, GEN(0, "alice"), b"later", message_id="later")
    await eventually(lambda: inbox.ids[-1] == "later")


async def test_a_full_dead_letter_queue_keeps_the_newest(transport_factory: TransportFactory) -> None:
    f = transport_factory
    transport = await f.connect()
    dead_queue = f.name(topology.DEAD_LETTER_QUEUE)
    await transport.declare(with_limits(f.topology(), dead_queue, max_length=3))

    rejected: list[str | None] = []

    async def reject(delivery: Delivery) -> None:
        await delivery.dead_letter(f"bad {delivery.message_id}")
        rejected.append(delivery.message_id)  # its copy is confirmed by now

    # prefetch 1: one rejection at a time, so the dead letters arrive in publish order.
    await transport.consume(f.name(ALICE_IN), reject, prefetch=1)
    for i in range(5):
        await transport.publish(f.name(topology.UP_EXCHANGE), GEN(0, "alice"), b"x", message_id=f"p{i}")
    await eventually(lambda: len(rejected) == 5)
    assert await f.depth(transport, dead_queue) == 3
    dead = Inbox()
    await transport.consume(dead_queue, dead)
    await eventually(lambda: len(dead.deliveries) == 3)
    assert dead.ids == ["p2", "p3", "p4"]  # the oldest two were dropped to make room
    assert [d.headers[REASON_HEADER] for d in dead.deliveries] == ["bad p2", "bad p3", "bad p4"]


async def test_a_dead_letter_keeps_none_of_the_publishers_own_audit_headers(
    transport_factory: TransportFactory,
) -> None:
    f = transport_factory
    consumer = await f.connect()
    await consumer.declare(f.topology())
    # On RabbitMQ (and a transport of your own) the factory logs in as the coordinator only; the memory
    # broker takes any user.
    publisher = await f.connect("mallory") if f.kind == "memory" else consumer
    body = bytes(range(256)) * 40  # 10 KiB
    forged: dict[str, Any] = {
        ORIGINAL_USER_HEADER: "victim",
        REASON_HEADER: "forged",
        ORIGINAL_EXCHANGE_HEADER: "forged",
        ORIGINAL_ROUTING_KEY_HEADER: "forged",
        BODY_BYTES_HEADER: 1,
        "x-chorus-verdict": "forged",
        "CC": ["cc.nowhere"],
        "BCC": ["bcc.nowhere"],
        "x-round": 7,
    }
    await publisher.publish(
        f.name(topology.UP_EXCHANGE), GEN(0, "alice"), body, message_id="f1", headers=forged
    )

    async def reject(delivery: Delivery) -> None:
        await delivery.dead_letter("schema: bad batch")

    await consumer.consume(f.name(ALICE_IN), reject)
    dead = Inbox()
    await consumer.consume(f.name(topology.DEAD_LETTER_QUEUE), dead)
    await eventually(lambda: len(dead.deliveries) == 1)
    letter = dead.deliveries[0]
    assert letter.message_id == "f1"
    assert letter.headers[REASON_HEADER] == "schema: bad batch"
    assert letter.headers[ORIGINAL_USER_HEADER] == publisher.user
    assert letter.headers[ORIGINAL_EXCHANGE_HEADER] == f.name(topology.UP_EXCHANGE)
    assert letter.headers[ORIGINAL_ROUTING_KEY_HEADER] == "gen.0.alice"
    assert letter.headers[BODY_BYTES_HEADER] == len(body)
    assert letter.body == body[:DEAD_LETTER_BODY_BYTES]
    assert "x-chorus-verdict" not in letter.headers
    assert "CC" not in letter.headers and "BCC" not in letter.headers
    assert "forged" not in letter.headers.values() and "victim" not in letter.headers.values()
    assert letter.headers["x-round"] == 7  # headers of its own the publisher may keep


async def test_duplicates_are_delivered_and_share_their_message_id(
    transport_factory: TransportFactory,
) -> None:
    f = transport_factory
    transport = await f.connect()
    await transport.declare(f.topology())
    inbox = Inbox()
    await transport.consume(f.name(ALICE_IN), inbox)
    for _ in range(2):  # a republish after a lost confirm looks exactly like this
        await transport.publish(f.name(topology.UP_EXCHANGE), GEN(0, "alice"), b"same", message_id="dup")
    await eventually(lambda: len(inbox.deliveries) == 2)
    assert inbox.ids == ["dup", "dup"]


async def test_prefetch_bounds_unsettled_deliveries(transport_factory: TransportFactory) -> None:
    f = transport_factory
    transport = await f.connect()
    await transport.declare(f.topology())
    release = asyncio.Event()
    in_flight = 0
    peak = 0
    done: list[str | None] = []

    async def slow(delivery: Delivery) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await release.wait()
        in_flight -= 1
        done.append(delivery.message_id)

    for i in range(10):
        await transport.publish(f.name(topology.UP_EXCHANGE), GEN(0, "alice"), b"x", message_id=f"m{i}")
    await transport.consume(f.name(ALICE_IN), slow, prefetch=3)
    await eventually(lambda: in_flight == 3)
    await asyncio.sleep(0.2)  # give the broker every chance to overshoot
    assert peak == 3
    release.set()
    await eventually(lambda: len(done) == 10)
    assert peak == 3


async def test_consumers_of_one_queue_share_the_work(transport_factory: TransportFactory) -> None:
    f = transport_factory
    transport = await f.connect()
    await transport.declare(f.topology())
    got: dict[str, list[str | None]] = {"a": [], "b": []}

    def worker(name: str) -> Callable[[Delivery], Awaitable[None]]:
        async def handle(delivery: Delivery) -> None:
            await asyncio.sleep(0.01)
            got[name].append(delivery.message_id)

        return handle

    await transport.consume(f.name(ALICE_IN), worker("a"), prefetch=1)
    await transport.consume(f.name(ALICE_IN), worker("b"), prefetch=1)
    for i in range(20):
        await transport.publish(f.name(topology.UP_EXCHANGE), GEN(0, "alice"), b"x", message_id=f"w{i}")
    await eventually(lambda: len(got["a"]) + len(got["b"]) == 20)
    assert len(got["a"]) >= 5 and len(got["b"]) >= 5, got


async def test_close_gives_unsettled_deliveries_back_as_redelivered(
    transport_factory: TransportFactory,
) -> None:
    f = transport_factory
    first = await f.connect()
    await first.declare(f.topology())
    started = asyncio.Event()

    async def stuck(delivery: Delivery) -> None:
        started.set()
        await asyncio.Event().wait()

    await first.consume(f.name(ALICE_IN), stuck)
    await first.publish(f.name(topology.UP_EXCHANGE), GEN(0, "alice"), b"x", message_id="held")
    await asyncio.wait_for(started.wait(), 10)
    await first.close()

    second = await f.connect()
    inbox = Inbox()
    await second.consume(f.name(ALICE_IN), inbox)
    await eventually(lambda: len(inbox.deliveries) == 1)
    assert inbox.deliveries[0].message_id == "held"
    assert inbox.deliveries[0].redelivered is True


async def test_cancel_lets_running_handlers_finish_and_ack(transport_factory: TransportFactory) -> None:
    f = transport_factory
    transport = await f.connect()
    await transport.declare(f.topology())
    started = asyncio.Event()
    finished: list[str | None] = []

    async def slowish(delivery: Delivery) -> None:
        started.set()
        await asyncio.sleep(0.2)
        finished.append(delivery.message_id)

    subscription = await transport.consume(f.name(ALICE_IN), slowish, prefetch=1)
    await transport.publish(f.name(topology.UP_EXCHANGE), GEN(0, "alice"), b"x", message_id="one")
    await transport.publish(f.name(topology.UP_EXCHANGE), GEN(0, "alice"), b"x", message_id="two")
    await asyncio.wait_for(started.wait(), 10)
    await subscription.cancel()
    assert finished == ["one"]
    # The second was never delivered to the cancelled consumer: it waits in the queue.
    assert await f.depth(transport, f.name(ALICE_IN)) == 1


@pytest.mark.amqp
async def test_participant_user_id_comes_from_the_login(
    rabbit_node: LocalNode, rabbit_participants: dict[str, str]
) -> None:
    name = rabbit_participants["dave"]
    inbox = Inbox()
    async with open_transport(rabbit_node.coordinator_url) as coordinator:
        # As the coordinator does for a member: declare its intake queue, then consume it.
        await coordinator.declare(topology.intake_topology([name]))
        await coordinator.consume(topology.intake_queue(name), inbox)
        async with open_transport(participant_url(rabbit_node, name)) as participant:
            assert participant.user == name
            await participant.publish(
                topology.UP_EXCHANGE, topology.control_key(name), b"hi", message_id="u1"
            )
        await eventually(lambda: "u1" in inbox.ids)
    delivery = next(d for d in inbox.deliveries if d.message_id == "u1")
    assert delivery.user_id == name


@pytest.mark.amqp
@pytest.mark.slow
async def test_consumer_survives_broker_kill_and_loses_no_confirmed_message(rabbit_node: LocalNode) -> None:
    f = TransportFactory("amqp", rabbit_node)
    try:
        await _kill_and_restart_mid_stream(f, rabbit_node)
    finally:
        await f.close()


async def _kill_and_restart_mid_stream(f: TransportFactory, node: LocalNode) -> None:
    publisher = await f.connect()
    consumer = await f.connect()
    await publisher.declare(f.topology(participants=("alice", "bob")))
    # RabbitMQ 3.10.8 can lose the quorum queue declared last before a SIGKILL (its Ra server is not
    # registered on disk yet and never restarts): a throwaway queue takes that place.
    await publisher.declare(Topology(queues=(QueueSpec(f.name("last-declared")),)))
    received: set[str | None] = set()

    async def handler(delivery: Delivery) -> None:
        received.add(delivery.message_id)

    await consumer.consume(f.name(ALICE_IN), handler)
    held = HeldDelivery()
    await consumer.consume(f.name(topology.intake_queue("bob")), held)
    confirmed: list[str] = []

    async def publish(i: int, timeout: float) -> None:
        with contextlib.suppress(PublishTimeout):
            await publisher.publish(
                f.name(topology.UP_EXCHANGE), GEN(0, "alice"), b"x", message_id=f"k{i}", timeout=timeout
            )
            confirmed.append(f"k{i}")

    for i in range(20):
        await publish(i, 5.0)
    await publisher.publish(f.name(topology.UP_EXCHANGE), GEN(1, "bob"), b"h", message_id="held")
    await eventually(lambda: len(received) == 20 and len(held.seen) == 1)

    node.kill()
    with pytest.raises(PublishTimeout):
        await publisher.publish(
            f.name(topology.UP_EXCHANGE), GEN(0, "alice"), b"x", message_id="late", timeout=0.5
        )
    # Publishes made while the broker is down wait for the reconnect, then get confirmed.
    during = [asyncio.create_task(publish(i, 60.0)) for i in range(20, 30)]
    await asyncio.to_thread(node.start)
    held.release.set()  # its ack goes to a channel that died with the broker: logged, not raised
    await asyncio.gather(*during)
    for i in range(30, 40):
        await publish(i, 20.0)

    assert len(confirmed) == 40
    # The consumer was restored by the robust connection and gets every confirmed message,
    await eventually(lambda: set(confirmed) <= received, timeout=30.0)
    # and the delivery that could not be acked comes back, redelivered.
    await eventually(lambda: len(held.seen) == 2, timeout=30.0)
    assert [d.redelivered for d in held.seen] == [False, True]
    assert held.errors == []


class HeldDelivery:
    """A handler that holds its first delivery until released, then acks it."""

    def __init__(self) -> None:
        self.seen: list[Delivery] = []
        self.errors: list[BaseException] = []
        self.release = asyncio.Event()

    async def __call__(self, delivery: Delivery) -> None:
        self.seen.append(delivery)
        if len(self.seen) == 1:
            await self.release.wait()
        try:
            await delivery.ack()
        except BaseException as e:  # the test asserts that nothing escapes a late ack
            self.errors.append(e)
            raise


@pytest.mark.amqp
async def test_consumer_resumes_after_the_broker_drops_connections(rabbit_node: LocalNode) -> None:
    f = TransportFactory("amqp", rabbit_node)
    try:
        transport = await f.connect()
        await transport.declare(f.topology())
        held = HeldDelivery()
        await transport.consume(f.name(ALICE_IN), held)
        await transport.publish(f.name(topology.UP_EXCHANGE), GEN(0, "alice"), b"x", message_id="first")
        await eventually(lambda: len(held.seen) == 1)

        await asyncio.to_thread(rabbit_node.close_all_connections, "test: network failure")
        held.release.set()
        # The broker requeued the unacked delivery; the restored consumer gets it again.
        await eventually(lambda: len(held.seen) == 2, timeout=20.0)
        assert held.seen[1].message_id == "first" and held.seen[1].redelivered
        await transport.publish(f.name(topology.UP_EXCHANGE), GEN(0, "alice"), b"x", message_id="second")
        await eventually(lambda: [d.message_id for d in held.seen][-1] == "second", timeout=20.0)
        assert held.errors == []
    finally:
        await f.close()


@pytest.mark.amqp
async def test_fresh_vhost_has_the_real_topology_and_isolates_tests(
    rabbit_vhost: Callable[..., dict[str, str]],
) -> None:
    urls = rabbit_vhost(participants=("frank",))
    async with open_transport(urls["coordinator"]) as coordinator, open_transport(urls["frank"]) as frank:
        depth: Callable[[str], Awaitable[int]] = coordinator.queue_depth  # type: ignore[attr-defined]
        # Until the coordinator declares frank's intake queue, what frank sends waits in the lobby.
        await frank.publish(topology.UP_EXCHANGE, GEN(3, "frank"), b"g", message_id="f0")
        assert await depth(topology.LOBBY_QUEUE) == 1
        await coordinator.declare(topology.intake_topology(["frank"]))
        await frank.publish(topology.UP_EXCHANGE, GEN(3, "frank"), b"g", message_id="f1")
        assert (await depth(topology.intake_queue("frank")), await depth(topology.LOBBY_QUEUE)) == (1, 1)
        inbox = Inbox()
        await frank.consume(topology.reply_queue("frank"), inbox)
        await coordinator.publish(
            topology.DIRECT_EXCHANGE, topology.reply_key("frank"), b"r", message_id="r1"
        )
        await eventually(lambda: inbox.ids == ["r1"])


@pytest.mark.amqp
async def test_connection_errors_say_what_to_check(rabbit_node: LocalNode, unused_tcp_port: int) -> None:
    with pytest.raises(BrokerError, match="refused the login"):
        async with open_transport(rabbit_node.url_for("coordinator", "wrong password")):
            pass
    with pytest.raises(BrokerError, match="is the broker running"):
        async with open_transport(f"amqp://coordinator:pw@127.0.0.1:{unused_tcp_port}/chorus"):
            pass


def test_open_transport_rejects_what_it_cannot_open(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="needs the MemoryBroker"):
        open_transport("memory://alice")
    with pytest.raises(BrokerError, match="needs a user"):
        open_transport("memory://", memory_broker=MemoryBroker())
    with pytest.raises(BrokerError, match="has no user"):
        open_transport("amqp://localhost:5672/chorus")
    with pytest.raises(BrokerError, match="does not match"):
        open_transport("amqp://alice:pw@localhost/chorus", user="bob")
    with pytest.raises(BrokerError, match="use amqps://"):
        open_transport("amqp://alice:pw@localhost/chorus", ca_file=tmp_path / "ca.pem")
    with pytest.raises(BrokerError, match="does not exist"):
        open_transport("amqps://alice:pw@localhost/chorus", ca_file=tmp_path / "ca.pem")
    with pytest.raises(BrokerError, match="unsupported"):
        open_transport("http://alice:pw@localhost/")


def test_open_transport_picks_the_implementation(tmp_path: Path) -> None:
    memory = open_transport("memory://alice", memory_broker=MemoryBroker())
    assert isinstance(memory, MemoryTransport) and memory.user == "alice"
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until connecting")
    amqps = open_transport("amqps://bob:pw@broker.example:5671/chorus", ca_file=ca)
    assert isinstance(amqps, AmqpTransport) and amqps.user == "bob"
    assert f"cafile={ca}".replace("/", "%2F") in amqps.connection.url


SHIPPED_PACKAGES = ("schemas", "common", "broker", "coordinator", "participant", "federation", "bench")


def test_only_broker_amqp_imports_aio_pika() -> None:
    root = Path(__file__).resolve().parents[1]
    offenders: list[str] = []
    for package in SHIPPED_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if path.is_relative_to(root / "broker" / "amqp"):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                else:
                    continue
                if any(name.split(".")[0] in ("aio_pika", "aiormq") for name in names):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []


def test_the_node_definitions_and_cli_load_no_amqp_client() -> None:
    code = (
        "import json, sys\n"
        "import broker.definitions, broker.local_node, broker.cli\n"
        "import broker.node_admin, broker.node_network, broker.node_state\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout.splitlines()[-1])
    amqp = [m for m in loaded if m.split(".")[0] in ("aio_pika", "aiormq") or m.startswith("broker.amqp")]
    assert amqp == []


@pytest.mark.parametrize(
    ("kind", "pattern", "key", "matches"),
    [
        ("topic", "gen.1.*", "gen.1.alice", True),
        ("topic", "gen.1.*", "gen.10.alice", False),
        ("topic", "gen.1.*", "gen.1.alice.x", False),
        ("topic", "gen.#", "gen", True),
        ("topic", "gen.#", "gen.1.alice", True),
        ("topic", "#.alice", "gen.1.alice", True),
        ("topic", "#", "", True),
        ("topic", "*", "", False),
        ("topic", "ctl.*", "ctl.", True),
        ("direct", "reply.a", "reply.a", True),
        ("direct", "reply.a", "reply.b", False),
        ("fanout", "", "anything", True),
    ],
)
def test_memory_binding_matches_like_rabbitmq(kind: str, pattern: str, key: str, matches: bool) -> None:
    assert binding_matches(kind, pattern, key) is matches  # type: ignore[arg-type]


@pytest.mark.amqp
async def test_is_connected_says_whether_the_link_is_up(rabbit_node: LocalNode) -> None:
    transport = AmqpTransport(rabbit_node.coordinator_url, connection_name="test is_connected")
    assert not transport.is_connected()  # nothing opened yet
    async with transport:
        await transport.connection.connect()
        assert transport.is_connected()
    assert not transport.is_connected()
    memory = MemoryBroker().connect("alice")
    assert memory.is_connected()
    await memory.close()
    assert not memory.is_connected()


def test_the_suite_runs_on_a_transport_named_on_the_command_line() -> None:
    """`--transport package.module:connect` runs every transport_factory test on that transport alone."""
    # Only the parametrized tests: this one (not parametrized) would otherwise run itself again.
    command = [
        sys.executable,
        "-m",
        "pytest",
        __file__,
        "-m",
        "not amqp",
        "-k",
        "custom",
        "-v",
        "-p",
        "no:cacheprovider",
    ]
    tests = Path(__file__).parent
    ran = subprocess.run([*command, "--transport", "support.brokers:memory_connect"], cwd=tests, **TEXT)
    assert ran.returncode == 0, ran.stdout[-3000:]
    passed = [line for line in ran.stdout.splitlines() if " PASSED" in line]
    assert len(passed) >= 15 and all("custom" in line for line in passed), ran.stdout[-3000:]
    assert "memory]" not in ran.stdout and "amqp]" not in ran.stdout
    refused = subprocess.run([*command, "--transport", "support.brokers"], cwd=tests, **TEXT)
    assert refused.returncode == pytest.ExitCode.USAGE_ERROR
    assert "expected package.module:connect" in refused.stderr
