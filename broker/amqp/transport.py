"""`AmqpTransport`: the `Transport` seam over RabbitMQ, a thin front over the connection, the confirmed
publishers and the subscriptions.

What it guarantees:
- every publish is persistent, mandatory and confirmed, with `user_id` set to
  the login user, under a timeout (it waits out a reconnect until then);
- an unroutable publish raises `Unroutable`, an unconfirmed one `PublishTimeout`;
- each consumer has its own channel with a per-consumer prefetch (quorum queues
  refuse global QoS), and consuming only ever passively declares its queue;
- the robust connection restores channels and consumers after a broker restart;
  deliveries from before the restart cannot be settled and are logged, not raised
  (the broker redelivers them);
- acks that handlers of one consumer ask for in the same event-loop turn go out as few frames as is
  safe (see `broker.amqp.subscription`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

from aio_pika.abc import AbstractRobustConnection

from broker.addresses import BrokerUrls
from broker.amqp.connection import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RECONNECT_INTERVAL,
    AmqpConnection,
    close_quietly,
)
from broker.amqp.publisher import ConfirmedPublisher, persistent_message
from broker.amqp.subscription import AckCounts, AmqpSubscription, DeadLetterer
from broker.topology import DEAD_LETTER_EXCHANGE, DEAD_LETTER_KEY, exchange_arguments, queue_arguments
from broker.transport import (
    BCC_HEADER,
    DEFAULT_PREFETCH,
    DEFAULT_PUBLISH_TIMEOUT,
    Handler,
    Headers,
    Topology,
)

_DECLARE_HINT = "; only the coordinator declares topology, participants configure nothing"


class AmqpTransport:
    """A robust connection to RabbitMQ as the user named in `url` (one address, or several nodes of a
    cluster: see `broker.addresses`; the first reachable one is used, and a lost one fails over)."""

    def __init__(
        self,
        url: BrokerUrls,
        *,
        connection_name: str = "chorus",
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reconnect_interval: float = DEFAULT_RECONNECT_INTERVAL,
        dead_letter_exchange: str = DEAD_LETTER_EXCHANGE,
        dead_letter_routing_key: str = DEAD_LETTER_KEY,
        coalesce_acks: bool = True,
    ) -> None:
        self.connection = AmqpConnection(
            url,
            connection_name=connection_name,
            connect_timeout=connect_timeout,
            reconnect_interval=reconnect_interval,
        )
        self.user = self.connection.user
        self._publisher = ConfirmedPublisher(self.connection, "publish")
        self._ack_counts = AckCounts()
        # Dead-letter copies go on their own channel: a refused one must not close the main publish channel.
        self._dead_letters = DeadLetterer(
            ConfirmedPublisher(self.connection, "dead-letter"),
            user=self.user,
            exchange=dead_letter_exchange,
            routing_key=dead_letter_routing_key,
            counts=self._ack_counts,
        )
        self._subscriptions: list[AmqpSubscription] = []
        self._closed = False
        # False: one basic.ack frame per delivery, as before acks were coalesced (for comparisons);
        # read by each `consume`.
        self.coalesce_acks = coalesce_acks

    @property
    def ack_frames(self) -> int:
        """`basic.ack` frames written so far (for tests and benchmarks)."""
        return self._ack_counts.frames

    @property
    def acked(self) -> int:
        """Deliveries those frames acked."""
        return self._ack_counts.acked

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> AmqpTransport:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> AbstractRobustConnection:
        """Open the robust connection (once); later calls return it."""
        return await self.connection.connect()

    def is_connected(self) -> bool:
        return not self._closed and self.connection.is_connected()

    async def close(self) -> None:
        """Cancel consumers (unsettled deliveries go back to their queues) and close the connection."""
        if self._closed:
            return
        self._closed = True
        self.connection.refuse_new_use()
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            await subscription.abort()
        await self.connection.close()

    # -- topology ----------------------------------------------------------

    async def declare(self, topology: Topology) -> None:
        # Not robust declarations: after a reconnect the durable topology is still there.
        guard = self.connection.guard
        channel = await self.connection.channel()
        try:
            underlay = await channel.get_underlay_channel()
            for exchange in topology.exchanges:
                await guard(
                    underlay.exchange_declare(
                        exchange.name,
                        exchange_type=exchange.type,
                        durable=True,
                        arguments=dict(exchange_arguments(exchange)),
                    ),
                    f"declare exchange {exchange.name!r}",
                    _DECLARE_HINT,
                )
            for queue in topology.queues:
                await guard(
                    underlay.queue_declare(queue.name, durable=True, arguments=dict(queue_arguments(queue))),
                    f"declare queue {queue.name!r}",
                    _DECLARE_HINT,
                )
            for binding in topology.bindings:
                await guard(
                    underlay.queue_bind(binding.queue, binding.exchange, routing_key=binding.routing_key),
                    f"bind queue {binding.queue!r} to {binding.exchange!r} with {binding.routing_key!r}",
                    _DECLARE_HINT,
                )
        finally:
            await close_quietly(channel)

    # -- publishing --------------------------------------------------------

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
        properties: dict[str, Any] = dict(headers or {})
        if bcc:
            properties[BCC_HEADER] = list(bcc)  # RabbitMQ routes by these keys too, then drops the header
        # user_id: RabbitMQ checks it against the login; the coordinator relies on it.
        message = persistent_message(body, message_id=message_id, user_id=self.user, headers=properties)
        await self._publisher.publish(exchange, routing_key, message, timeout)

    async def publish_with_user_id_for_tests(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        user_id: str | None,
        timeout: float = DEFAULT_PUBLISH_TIMEOUT,
        headers: Headers | None = None,
    ) -> None:
        """TEST ONLY: publish with any `user_id` property, or none (`None`), and any headers, as a hostile
        client could.

        Services never call this; `publish` always stamps the login. The security tests use it to show
        that RabbitMQ refuses a forged `user_id` and that the coordinator dead-letters a missing one.
        """
        message = persistent_message(body, message_id=message_id, user_id=user_id, headers=headers or {})
        await self._publisher.publish(exchange, routing_key, message, timeout)

    # -- consuming ---------------------------------------------------------

    async def consume(
        self, queue: str, handler: Handler, *, prefetch: int = DEFAULT_PREFETCH
    ) -> AmqpSubscription:
        if prefetch < 0:
            raise ValueError(f"prefetch must be 0 (unlimited) or more, got {prefetch}")
        await self.connection.check_queue_exists(queue)
        channel = await self.connection.channel()
        try:
            await channel.set_qos(prefetch_count=prefetch, global_=False)
            amqp_queue = await self.connection.guard(
                channel.declare_queue(queue, passive=True), f"consume {queue!r}"
            )
            subscription = AmqpSubscription(
                channel,
                amqp_queue,
                handler,
                dead_letters=self._dead_letters,
                counts=self._ack_counts,
                coalesce_acks=self.coalesce_acks,
                on_cancel=self._forget,
            )
            await self.connection.guard(subscription.start(), f"consume from {queue!r}")
        except BaseException:
            await close_quietly(channel)
            raise
        self._subscriptions.append(subscription)
        return subscription

    def _forget(self, subscription: AmqpSubscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    async def queue_depth(self, queue: str) -> int:
        """Messages ready in `queue` (not counting unacked ones), from a passive declare."""
        channel = await self.connection.channel()
        try:
            underlay = await channel.get_underlay_channel()
            declared = await self.connection.guard(
                underlay.queue_declare(queue, passive=True), f"inspect queue {queue!r}"
            )
            return int(declared.message_count or 0)
        finally:
            await close_quietly(channel)
