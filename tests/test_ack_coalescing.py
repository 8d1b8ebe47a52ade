"""Coalesced acks: the acks of deliveries settled together go out as few `basic.ack` frames as is safe.

A multiple-ack for tag T acks every unacked tag up to T on its channel, so `AmqpTransport` only sends
one up to a tag below which every delivery is settled or acked with it. Against a real RabbitMQ node.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from support.brokers import TransportFactory
from support.waiting import eventually

from broker import topology
from broker.amqp import AmqpTransport
from broker.amqp.subscription import ChannelTags
from broker.local_node import LocalNode
from broker.transport import Delivery

GEN = topology.generation_key
# Any participant's intake queue serves as the work queue.
ALICE_IN = topology.intake_queue("alice")


def test_plan_coalesces_only_up_to_the_first_unsettled_tag() -> None:
    tags = ChannelTags()
    assert tags.plan([1, 2, 3, 4]) == [(4, True)]
    assert tags.plan([1]) == [(1, False)]
    # Tag 3 is still being handled: one frame for 1-2, then one each past it.
    assert tags.plan([1, 2, 4, 5]) == [(2, True), (4, False), (5, False)]
    # Nothing below the first asked-for tag is settled: no multiple-ack at all.
    assert tags.plan([2, 3]) == [(2, False), (3, False)]
    tags.settle([1, 2, 5])
    assert tags.floor == 2 and tags.above == {5}
    # Tags settled another way (nacked, dead-lettered) may be covered; 7 is unsettled.
    assert tags.plan([3, 4, 6, 8]) == [(6, True), (8, False)]
    tags.settle([3, 4, 6, 7])
    assert tags.floor == 7 and tags.above == set()


class Group:
    """A handler that holds each delivery until its group is released, then acks by returning;
    the delivery named `held` waits for `release_held` instead."""

    def __init__(self, held: str | None = None) -> None:
        self.held = held
        self.seen: list[Delivery] = []
        self.done: list[str] = []  # message ids (str() of a missing one: 'None')
        self.release = asyncio.Event()
        self.release_held = asyncio.Event()

    async def __call__(self, delivery: Delivery) -> None:
        self.seen.append(delivery)
        await (self.release_held if delivery.message_id == self.held else self.release).wait()
        self.done.append(str(delivery.message_id))


@pytest.fixture
async def f(rabbit_node: LocalNode) -> AsyncIterator[TransportFactory]:
    factory = TransportFactory("amqp", rabbit_node)
    try:
        yield factory
    finally:
        await factory.close()


async def _connect(f: TransportFactory) -> AmqpTransport:
    transport = await f.connect()
    assert isinstance(transport, AmqpTransport)
    return transport


async def _filled(f: TransportFactory, count: int) -> tuple[list[str], AmqpTransport]:
    """`count` messages (m00, m01, ...) in alice's intake queue, and a fresh connection to consume them."""
    publisher = await _connect(f)
    await publisher.declare(f.topology())
    ids = [f"m{i:02d}" for i in range(count)]
    for message_id in ids:
        await publisher.publish(f.name(topology.UP_EXCHANGE), GEN(0, "alice"), b"x", message_id=message_id)
    return ids, await _connect(f)


async def _consume_again(f: TransportFactory) -> Group:
    """What a new consumer on a new connection gets from alice's intake queue (acked as it arrives)."""
    again = Group()
    again.release.set()
    await (await _connect(f)).consume(f.name(ALICE_IN), again)
    return again


@pytest.mark.amqp
async def test_a_group_settled_together_takes_one_ack_frame(f: TransportFactory) -> None:
    ids, consumer = await _filled(f, 20)
    group = Group()
    subscription = await consumer.consume(f.name(ALICE_IN), group, prefetch=50)
    await eventually(lambda: len(group.seen) == 20)
    group.release.set()
    await eventually(lambda: len(group.done) == 20)
    await eventually(lambda: consumer.acked == 20)
    assert consumer.ack_frames == 1  # was 20: one per delivery
    await subscription.cancel()
    # Every delivery was acked: nothing comes back to a new consumer.
    redelivered = await _consume_again(f)
    await asyncio.sleep(0.5)
    assert redelivered.seen == []
    assert sorted(group.done) == ids


@pytest.mark.amqp
async def test_a_later_group_never_acks_an_unsettled_lower_tag(f: TransportFactory) -> None:
    ids, consumer = await _filled(f, 12)
    group = Group(held="m05")  # tag 6 on the consumer's channel
    await consumer.consume(f.name(ALICE_IN), group, prefetch=50)
    await eventually(lambda: len(group.seen) == 12)
    group.release.set()
    await eventually(lambda: consumer.acked == 11)
    # Tags 1-5 in one multiple-ack; 7-12 one by one, since a multiple-ack would take tag 6 too.
    assert consumer.ack_frames == 1 + 6
    await consumer.close()  # as a crash would: the held delivery goes back to the queue

    redelivered = await _consume_again(f)
    await eventually(lambda: len(redelivered.done) == 1)
    await asyncio.sleep(0.5)
    assert [d.message_id for d in redelivered.seen] == ["m05"]
    assert redelivered.seen[0].redelivered is True
    assert sorted({*group.done, *redelivered.done}) == ids


@pytest.mark.amqp
async def test_nacked_and_dead_lettered_tags_let_a_later_multiple_ack_cover_them(
    f: TransportFactory,
) -> None:
    ids, consumer = await _filled(f, 10)
    settled_first = asyncio.Event()
    release = asyncio.Event()
    done: list[str] = []
    seen: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery)
        if delivery.message_id == "m02" and not delivery.redelivered:
            await delivery.requeue()
            return
        if delivery.message_id == "m04":
            await delivery.dead_letter("test: bad batch")
            settled_first.set()
            return
        await release.wait()
        done.append(str(delivery.message_id))

    await consumer.consume(f.name(ALICE_IN), handler, prefetch=50)
    await asyncio.wait_for(settled_first.wait(), 10)
    await eventually(lambda: len(seen) >= 10)
    frames_before = consumer.ack_frames  # the dead-letter copy's own ack
    release.set()
    # The requeued m02 comes back (tag 11) and is acked on its own.
    await eventually(lambda: len(done) == 9)
    await eventually(lambda: consumer.acked == 10)
    # Tags 1-10 but 3 (requeued) and 5 (dead-lettered): one multiple-ack; then tag 11, the redelivery.
    assert consumer.ack_frames - frames_before <= 2
    assert sorted(done) == sorted(i for i in ids if i != "m04")
    dead = await _connect(f)
    got: list[Delivery] = []

    async def collect(delivery: Delivery) -> None:
        got.append(delivery)

    await dead.consume(f.name(topology.DEAD_LETTER_QUEUE), collect)
    await eventually(lambda: len(got) == 1)
    assert got[0].message_id == "m04"
