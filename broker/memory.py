"""An in-process broker with the RabbitMQ semantics Chorus relies on.

`MemoryBroker` holds exchanges, queues and bindings; `MemoryBroker.connect(user)`
gives a `MemoryTransport`, one connection as one user. What it mimics, because
services depend on it: topic/direct/fanout routing, unroutable publishes as
errors, manual acks with per-consumer prefetch, requeues that come back
redelivered, quorum-queue delivery limits that dead-letter a poison message,
explicit dead-lettering with a reason, `user_id` stamped from the publishing
connection, and fair round-robin among the consumers of one queue.

Everything runs on the caller's event loop; there are no threads and no I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import structlog

from broker.errors import BrokerError, QueueFull, TopologyMissing, Unroutable
from broker.topology import DEAD_LETTER_EXCHANGE, DEAD_LETTER_KEY
from broker.transport import (
    DEFAULT_PREFETCH,
    DEFAULT_PUBLISH_TIMEOUT,
    DELIVERY_COUNT_HEADER,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    REASON_HEADER,
    BindingSpec,
    Delivery,
    ExchangeSpec,
    Handler,
    Headers,
    QueueSpec,
    Settler,
    Topology,
    dead_letter_copy,
)

log = structlog.get_logger(__name__)

# RabbitMQ's own dead-letter headers (set when the broker dead-letters a message).
FIRST_DEATH_REASON_HEADER = "x-first-death-reason"
FIRST_DEATH_QUEUE_HEADER = "x-first-death-queue"
FIRST_DEATH_EXCHANGE_HEADER = "x-first-death-exchange"

DEFAULT_EXCHANGE = ""


@dataclass
class _Message:
    body: bytes
    exchange: str
    routing_key: str
    message_id: str | None
    user_id: str | None
    headers: dict[str, object]
    timestamp: float
    # Failed deliveries so far (requeues and returns from a closed consumer), as quorum queues count them.
    delivery_count: int = 0
    delivered_before: bool = False


@dataclass(eq=False)
class _Queue:
    spec: QueueSpec
    ready: deque[_Message] = field(default_factory=deque)
    # Returned messages are served before fresh ones, like a quorum queue does.
    returned: deque[_Message] = field(default_factory=deque)
    consumers: list[_Consumer] = field(default_factory=list)
    next_consumer: int = 0

    def depth(self) -> int:
        return len(self.ready) + len(self.returned)

    def is_over_limit(self) -> bool:
        """Beyond its length limit (in messages or body bytes), as RabbitMQ counts ready messages: a
        quorum queue refuses (reject-publish) only once it is over, so it holds one more than the limit."""
        spec = self.spec
        if spec.max_length is not None and self.depth() > spec.max_length:
            return True
        if spec.max_length_bytes is None:
            return False
        held = sum(len(m.body) for m in self.ready) + sum(len(m.body) for m in self.returned)
        return held > spec.max_length_bytes

    def take(self) -> _Message:
        return self.returned.popleft() if self.returned else self.ready.popleft()


class MemoryBroker:
    """Broker state shared by every `MemoryTransport` connected to it."""

    def __init__(self) -> None:
        self._exchanges: dict[str, ExchangeSpec] = {}
        self._queues: dict[str, _Queue] = {}
        self._bindings: dict[str, list[BindingSpec]] = {}

    def connect(self, user: str) -> MemoryTransport:
        """A new connection that publishes and consumes as `user`."""
        return MemoryTransport(self, user)

    def declare(self, topology: Topology) -> None:
        """Create exchanges, queues and bindings; redeclaring the same thing is a no-op."""
        for exchange in topology.exchanges:
            self._declare_exchange(exchange)
        for queue in topology.queues:
            self._declare_queue(queue)
        for binding in topology.bindings:
            self._bind(binding)

    def queue_depth(self, name: str) -> int:
        """Messages waiting in `name`, not counting those delivered and not yet settled."""
        return self._queue(name).depth()

    # -- topology ----------------------------------------------------------

    def _declare_exchange(self, spec: ExchangeSpec) -> None:
        existing = self._exchanges.get(spec.name)
        if existing is not None and existing != spec:
            raise BrokerError(
                f"exchange {spec.name!r} already exists as {existing.type}, cannot redeclare as {spec.type}"
            )
        self._exchanges[spec.name] = spec
        self._bindings.setdefault(spec.name, [])

    def _declare_queue(self, spec: QueueSpec) -> None:
        existing = self._queues.get(spec.name)
        if existing is None:
            self._queues[spec.name] = _Queue(spec)
        elif existing.spec != spec:
            raise BrokerError(
                f"queue {spec.name!r} already exists with different arguments ({existing.spec}); "
                "delete it or declare it the same way"
            )

    def _bind(self, binding: BindingSpec) -> None:
        if binding.exchange not in self._exchanges:
            raise TopologyMissing(f"cannot bind to exchange {binding.exchange!r}: it is not declared")
        if binding.queue not in self._queues:
            raise TopologyMissing(f"cannot bind queue {binding.queue!r}: it is not declared")
        bindings = self._bindings[binding.exchange]
        if binding not in bindings:
            bindings.append(binding)

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            raise TopologyMissing(f"queue {name!r} does not exist; declare the topology first")
        return queue

    # -- routing -----------------------------------------------------------

    def _route(self, exchange: str, routing_key: str) -> list[_Queue]:
        if exchange == DEFAULT_EXCHANGE:
            queue = self._queues.get(routing_key)
            return [queue] if queue is not None else []
        spec = self._exchanges.get(exchange)
        if spec is None:
            raise TopologyMissing(f"exchange {exchange!r} does not exist; declare the topology first")
        names: dict[str, None] = {}  # ordered set: one copy per queue however many bindings match
        for binding in self._bindings[exchange]:
            if binding_matches(spec.type, binding.routing_key, routing_key):
                names[binding.queue] = None
        if not names and spec.alternate_exchange is not None:
            return self._route(spec.alternate_exchange, routing_key)
        return [self._queues[name] for name in names]

    def _publish(self, message: _Message, bcc: Sequence[str] = ()) -> None:
        routed: dict[str, _Queue] = {}  # one copy per queue, however many keys route to it
        for key in (message.routing_key, *bcc):
            routed.update((queue.spec.name, queue) for queue in self._route(message.exchange, key))
        queues = list(routed.values())
        if not queues:
            keys = f"routing key {message.routing_key!r}" + (f" or any of {len(bcc)} BCC keys" if bcc else "")
            raise Unroutable(
                f"no queue is bound to exchange {message.exchange!r} for {keys}; the message was not stored"
            )
        refused = []
        for queue in queues:
            if queue.spec.overflow == "reject-publish" and queue.is_over_limit():
                refused.append(queue.spec.name)
                continue
            copy = _Message(
                body=message.body,
                exchange=message.exchange,
                routing_key=message.routing_key,
                message_id=message.message_id,
                user_id=message.user_id,
                headers=dict(message.headers),
                timestamp=message.timestamp,
            )
            queue.ready.append(copy)
            while queue.spec.overflow == "drop-head" and queue.is_over_limit():
                queue.take()  # the oldest goes
            self._dispatch(queue)
        if refused:
            raise QueueFull(
                f"queue {refused[0]!r} is at its length limit and refused the message (reject-publish); "
                "retry later"
            )

    # -- delivery ----------------------------------------------------------

    def _dispatch(self, queue: _Queue) -> None:
        """Hand waiting messages to consumers with room under their prefetch, in turn."""
        while queue.depth():
            consumer = self._next_consumer(queue)
            if consumer is None:
                return
            consumer.deliver(queue.take())

    @staticmethod
    def _next_consumer(queue: _Queue) -> _Consumer | None:
        count = len(queue.consumers)
        for step in range(count):
            index = (queue.next_consumer + step) % count
            consumer = queue.consumers[index]
            if consumer.has_room():
                queue.next_consumer = (index + 1) % count
                return consumer
        return None

    def _return(self, queue: _Queue, message: _Message) -> None:
        """A delivery failed (requeue, or its consumer went away): count it, retry or dead-letter."""
        message.delivery_count += 1
        limit = queue.spec.delivery_limit if queue.spec.quorum else None
        if limit is not None and message.delivery_count > limit:
            log.warning(
                "delivery limit reached, dead-lettering",
                queue=queue.spec.name,
                message_id=message.message_id,
                deliveries=message.delivery_count,
                limit=limit,
            )
            self._dead_letter_by_broker(queue, message, "delivery_limit")
        else:
            queue.returned.append(message)

    def _dead_letter_by_broker(self, queue: _Queue, message: _Message, reason: str) -> None:
        """What RabbitMQ does: republish to the queue's dead-letter exchange, saying why."""
        exchange = queue.spec.dead_letter_exchange
        if exchange is None:
            log.warning("message dropped: queue has no dead-letter exchange", queue=queue.spec.name)
            return
        headers = dict(message.headers)
        headers.pop(DELIVERY_COUNT_HEADER, None)
        death = {
            "count": 1,
            "reason": reason,
            "queue": queue.spec.name,
            "exchange": message.exchange,
            "routing-keys": [message.routing_key],
            "time": time.time(),
        }
        previous = headers.get("x-death")
        headers["x-death"] = [death, *previous] if isinstance(previous, list) else [death]
        headers.setdefault(FIRST_DEATH_REASON_HEADER, reason)
        headers.setdefault(FIRST_DEATH_QUEUE_HEADER, queue.spec.name)
        headers.setdefault(FIRST_DEATH_EXCHANGE_HEADER, message.exchange)
        headers.setdefault(REASON_HEADER, reason)
        headers.setdefault(ORIGINAL_EXCHANGE_HEADER, message.exchange)
        headers.setdefault(ORIGINAL_ROUTING_KEY_HEADER, message.routing_key)
        routing_key = queue.spec.dead_letter_routing_key or message.routing_key
        self._publish_dead_letter(
            _Message(
                body=message.body,
                exchange=exchange,
                routing_key=routing_key,
                message_id=message.message_id,
                user_id=message.user_id,
                headers=headers,
                timestamp=message.timestamp,
            )
        )

    def _dead_letter_by_consumer(self, queue: _Queue, message: _Message, reason: str, user: str) -> None:
        """What `AmqpTransport` does: publish a copy with the reason to the DLX, then ack."""
        body, headers = dead_letter_copy(
            message.body,
            message.headers,
            exchange=message.exchange,
            routing_key=message.routing_key,
            user_id=message.user_id,
            reason=reason,
        )
        self._publish_dead_letter(
            _Message(
                body=body,
                exchange=queue.spec.dead_letter_exchange or DEAD_LETTER_EXCHANGE,
                routing_key=queue.spec.dead_letter_routing_key or DEAD_LETTER_KEY,
                message_id=message.message_id,
                user_id=user,
                headers=headers,
                timestamp=time.time(),
            )
        )

    def _publish_dead_letter(self, message: _Message) -> None:
        try:
            self._publish(message)
        except BrokerError as e:
            log.error("dead-lettered message lost", message_id=message.message_id, error=str(e))


def binding_matches(
    exchange_type: Literal["topic", "direct", "fanout"], pattern: str, routing_key: str
) -> bool:
    """Whether a binding with `pattern` takes `routing_key` on an exchange of `exchange_type`."""
    if exchange_type == "fanout":
        return True
    if exchange_type == "direct":
        return pattern == routing_key
    return _topic_matches(_words(pattern), _words(routing_key))


def _words(key: str) -> list[str]:
    # RabbitMQ treats the empty key as zero words, so only `#` matches it.
    return key.split(".") if key else []


def _topic_matches(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        # `#` takes zero or more words: try every split.
        return any(_topic_matches(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _topic_matches(rest, words[1:])


class _Consumer:
    """One consumer of one queue: tracks its unsettled deliveries and runs a task per delivery."""

    def __init__(
        self, broker: MemoryBroker, queue: _Queue, handler: Handler, prefetch: int, user: str
    ) -> None:
        self.broker = broker
        self.queue = queue
        self.handler = handler
        self.prefetch = prefetch
        self.user = user
        self.unacked: dict[int, _Message] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._tags = itertools.count(1)

    def has_room(self) -> bool:
        return self.prefetch == 0 or len(self.unacked) < self.prefetch

    def deliver(self, message: _Message) -> None:
        tag = next(self._tags)
        self.unacked[tag] = message
        headers = dict(message.headers)
        if message.delivery_count:
            headers[DELIVERY_COUNT_HEADER] = message.delivery_count
        delivery = Delivery(
            body=message.body,
            exchange=message.exchange,
            routing_key=message.routing_key,
            message_id=message.message_id,
            user_id=message.user_id,
            redelivered=message.delivered_before,
            headers=headers,
            timestamp=message.timestamp,
        )
        delivery._settle = self._settler(tag)
        message.delivered_before = True
        task = asyncio.get_running_loop().create_task(self._run(delivery))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _settler(self, tag: int) -> Settler:
        async def settle(action: Literal["ack", "requeue", "dead_letter"], reason: str) -> None:
            message = self.unacked.pop(tag, None)
            if message is None:
                # Its consumer was closed and the broker took the message back, as a closed channel does.
                log.warning("settling a delivery whose consumer is closed; ignored", action=action)
                return
            if action == "requeue":
                self.broker._return(self.queue, message)
            elif action == "dead_letter":
                self.broker._dead_letter_by_consumer(self.queue, message, reason, self.user)
            self.broker._dispatch(self.queue)

        return settle

    async def _run(self, delivery: Delivery) -> None:
        try:
            await self.handler(delivery)
        except Exception:
            log.exception(
                "handler failed; requeueing",
                queue=self.queue.spec.name,
                message_id=delivery.message_id,
                routing_key=delivery.routing_key,
            )
            await delivery.requeue()
            return
        await delivery.ack()  # a no-op when the handler settled it already

    def stop_intake(self) -> None:
        if self in self.queue.consumers:
            self.queue.consumers.remove(self)
            self.queue.next_consumer = 0

    async def drain(self) -> None:
        """Wait for running handlers (but not the one calling us) to finish and settle."""
        current = asyncio.current_task()
        pending = [t for t in self.tasks if t is not current]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def abort(self) -> None:
        """Like a closed channel: stop handlers and give every unsettled delivery back, redelivered."""
        self.stop_intake()
        current = asyncio.current_task()
        pending = [t for t in self.tasks if t is not current]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for tag in sorted(self.unacked):
            self.broker._return(self.queue, self.unacked.pop(tag))
        self.broker._dispatch(self.queue)


class MemorySubscription:
    def __init__(self, transport: MemoryTransport, consumer: _Consumer) -> None:
        self._transport = transport
        self._consumer = consumer

    async def cancel(self) -> None:
        """Stop new deliveries, then wait for the handlers already running to settle theirs."""
        self._consumer.stop_intake()
        await self._consumer.drain()
        self._transport._forget(self._consumer)


class MemoryTransport:
    """A connection to a `MemoryBroker` as one user; implements `broker.transport.Transport`."""

    def __init__(self, broker: MemoryBroker, user: str) -> None:
        self.user = user
        self._broker = broker
        self._consumers: list[_Consumer] = []
        self._closed = False

    @property
    def broker(self) -> MemoryBroker:
        return self._broker

    async def __aenter__(self) -> MemoryTransport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def declare(self, topology: Topology) -> None:
        self._check_open()
        self._broker.declare(topology)

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: Headers | None = None,
        timeout: float = DEFAULT_PUBLISH_TIMEOUT,
        bcc: Sequence[str] = (),
    ) -> None:
        self._check_open()
        self._broker._publish(
            _Message(
                body=bytes(body),
                exchange=exchange,
                routing_key=routing_key,
                message_id=message_id,
                user_id=self.user,
                headers=dict(headers or {}),
                timestamp=time.time(),
            ),
            bcc,
        )
        await asyncio.sleep(0)  # a publish is a suspension point on a real broker too

    async def consume(
        self, queue: str, handler: Handler, *, prefetch: int = DEFAULT_PREFETCH
    ) -> MemorySubscription:
        self._check_open()
        if prefetch < 0:
            raise ValueError(f"prefetch must be 0 (unlimited) or more, got {prefetch}")
        target = self._broker._queue(queue)
        consumer = _Consumer(self._broker, target, handler, prefetch, self.user)
        target.consumers.append(consumer)
        self._consumers.append(consumer)
        self._broker._dispatch(target)
        await asyncio.sleep(0)
        return MemorySubscription(self, consumer)

    async def queue_depth(self, queue: str) -> int:
        """Messages waiting in `queue` (ready, not delivered), as a passive declare reports them."""
        self._check_open()
        return self._broker.queue_depth(queue)

    def is_connected(self) -> bool:
        return not self._closed  # in process: no link to lose

    async def close(self) -> None:
        """Cancel consumers; deliveries not yet settled go back to their queues as redelivered."""
        if self._closed:
            return
        self._closed = True
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            await consumer.abort()

    def _forget(self, consumer: _Consumer) -> None:
        with contextlib.suppress(ValueError):
            self._consumers.remove(consumer)

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerError(f"the connection of user {self.user!r} is closed; open a new transport")
