"""`ConfirmedPublisher`: publishes on one channel with publisher confirms, waiting out reconnects.

Every publish is mandatory and awaits the broker's confirm under a timeout: an unroutable message
raises `Unroutable`, an unconfirmed one `PublishTimeout`. A nack (a full queue, a quorum queue that
lost its leader) and a connection lost mid-publish are retried on a fresh channel until then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustChannel

from broker.amqp.connection import (
    CHANNEL_GONE,
    AmqpConnection,
    close_quietly,
    rpc_cancelled_by_connection_loss,
)
from broker.errors import (
    AccessRefused,
    BrokerError,
    ChannelUnavailable,
    PublishTimeout,
    TopologyMissing,
    Unroutable,
)
from broker.transport import BCC_HEADER

log = structlog.get_logger(__name__)

# Pause before retrying a publish that a connection loss interrupted.
PUBLISH_RETRY_DELAY = 0.2

# A publish that fails with one of these is retried once the connection is back (until its timeout).
_PUBLISH_INTERRUPTED: tuple[type[BaseException], ...] = (
    *CHANNEL_GONE,
    ChannelUnavailable,
    asyncio.CancelledError,
)


def persistent_message(
    body: bytes, *, message_id: str | None, user_id: str | None, headers: Mapping[str, Any]
) -> aio_pika.Message:
    """A persistent message stamped with `user_id` (RabbitMQ checks it against the login) and the time."""
    return aio_pika.Message(
        body,
        message_id=message_id,
        user_id=user_id,
        headers=dict(headers),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        timestamp=datetime.now(UTC),
    )


class ConfirmedPublisher:
    """One channel with publisher confirms and returns-as-errors, reopened as needed.

    `purpose` names it in logs (a connection has one for publishes and one for dead-letter copies,
    so that a refused copy cannot close the channel of ordinary publishes).
    """

    def __init__(self, connection: AmqpConnection, purpose: str) -> None:
        self._connection = connection
        self._purpose = purpose
        self._channel: AbstractChannel | None = None
        self._exchanges: set[str] = set()  # checked to exist, on the current channel
        self._lock = asyncio.Lock()

    async def publish(
        self, exchange: str, routing_key: str, message: aio_pika.Message, timeout: float
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._publish_until_done(exchange, routing_key, message)
        except TimeoutError as e:
            raise PublishTimeout(
                f"RabbitMQ did not confirm message {message.message_id} to {exchange!r}/{routing_key!r} "
                f"within {timeout:.1f}s ({self._connection.where}); it may or may not be stored. "
                "Is the broker up (chorus-broker status), and are its queues below their length limits? "
                "Republishing is safe: consumers dedupe by message_id"
            ) from e

    async def _publish_until_done(self, exchange: str, routing_key: str, message: aio_pika.Message) -> None:
        interrupted = False
        nacks = 0
        while True:
            try:
                channel = await self._channel_for(exchange)
                # Straight to aiormq (what aio-pika's Exchange.publish does, less its per-call overhead);
                # wait=False: the channel lock is not held until the frame is written, so concurrent
                # publishes pipeline; the broker's confirm is still awaited.
                await channel.basic_publish(
                    message.body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=message.properties,
                    mandatory=True,
                    wait=False,
                )
                return
            except aiormq.exceptions.PublishError as e:
                also = " or its BCC keys" if BCC_HEADER in (message.headers or {}) else ""
                raise Unroutable(
                    f"no queue is bound to exchange {exchange!r} for routing key {routing_key!r}{also}; "
                    "the message was not stored"
                ) from e
            except aiormq.exceptions.DeliveryError:
                # A nack: a full queue (reject-publish) or a quorum queue that lost its leader. Both
                # pass; a fresh channel picks up the new leader. The caller's timeout bounds the retries.
                nacks += 1
                (log.debug if nacks > 1 else log.info)(
                    "publish nacked, retrying on a fresh channel",
                    purpose=self._purpose,
                    message_id=message.message_id,
                    exchange=exchange,
                    routing_key=routing_key,
                )
                await self._forget_channel()
                await asyncio.sleep(min(2.0, PUBLISH_RETRY_DELAY * 2**nacks))
            except aiormq.exceptions.ChannelAccessRefused as e:
                await self._forget_channel()
                raise AccessRefused(
                    f"user {self._connection.user!r} may not publish to {exchange!r} with routing key "
                    f"{routing_key!r}: check its write and topic permissions (rabbitmqctl list_permissions, "
                    "list_topic_permissions)"
                ) from e
            except aiormq.exceptions.ChannelNotFoundEntity as e:
                await self._forget_channel()
                raise TopologyMissing(
                    f"exchange {exchange!r} does not exist; declare the topology first"
                ) from e
            except aiormq.exceptions.ChannelPreconditionFailed as e:
                await self._forget_channel()
                raise BrokerError(f"RabbitMQ refused the publish: {e}") from e
            except _PUBLISH_INTERRUPTED as e:
                if isinstance(e, asyncio.CancelledError) and not rpc_cancelled_by_connection_loss():
                    raise
                # A reconnect is under way (or another publish closed the channel): wait and try again.
                (log.debug if interrupted else log.info)(
                    "publish interrupted, retrying once reconnected",
                    purpose=self._purpose,
                    message_id=message.message_id,
                    error=repr(e),
                )
                interrupted = True
                await self._wait_until_ready()

    async def _wait_until_ready(self) -> None:
        channel = self._channel
        await asyncio.sleep(PUBLISH_RETRY_DELAY)
        if isinstance(channel, AbstractRobustChannel):
            await channel.ready()  # returns once the robust connection has restored the channel

    async def _channel_for(self, exchange: str) -> aiormq.Channel:
        """The confirming channel's current aiormq channel, once `exchange` is known to exist."""
        channel = self._channel
        if channel is None or exchange not in self._exchanges:
            channel = await self._open_for(exchange)
        if channel.is_closed:  # a reconnect is under way
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)  # its basic_publish takes wait=
        return underlay

    async def _open_for(self, exchange: str) -> AbstractChannel:
        async with self._lock:
            # A robust channel reopens itself after a reconnect; only an error we saw replaces it.
            if self._channel is None:
                self._channel = await self._connection.channel(confirms=True)
                self._exchanges = set()
            if exchange not in self._exchanges:
                if exchange != "":
                    # Checked once on a throwaway channel, since a 404 would close this one.
                    await self._connection.check_exchange_exists(exchange)
                self._exchanges.add(exchange)
            return self._channel

    async def _forget_channel(self) -> None:
        # The broker closed it with an error; a fresh one is opened for the next publish.
        channel, self._channel = self._channel, None
        self._exchanges = set()
        if channel is not None:
            await close_quietly(channel)
