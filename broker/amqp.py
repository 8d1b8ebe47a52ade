"""`AmqpTransport`: the `Transport` seam over RabbitMQ, through aio-pika.

The only module of Chorus that imports aio_pika. What it guarantees:
- every publish is persistent, mandatory and confirmed, with `user_id` set to
  the login user, under a timeout (it waits out a reconnect until then);
- an unroutable publish raises `Unroutable`, an unconfirmed one `PublishTimeout`;
- each consumer has its own channel with a per-consumer prefetch (quorum queues
  refuse global QoS), and consuming only ever passively declares its queue;
- the robust connection restores channels and consumers after a broker restart;
  deliveries from before the restart cannot be settled and are logged, not raised
  (the broker redelivers them);
- acks that handlers of one consumer ask for in the same event-loop turn go out as few
  frames as is safe (`_AckCoalescer`): one `basic.ack(multiple=True)` covers a run of
  delivery tags only when every lower tag on that channel is settled or acked with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from broker.errors import BrokerError, PublishTimeout, TopologyMissing, Unroutable
from broker.topology import DEAD_LETTER_EXCHANGE, DEAD_LETTER_KEY
from broker.transport import (
    BCC_HEADER,
    DEFAULT_PREFETCH,
    DEFAULT_PUBLISH_TIMEOUT,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    REASON_HEADER,
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

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_RECONNECT_INTERVAL = 1.0
# Pause before retrying a publish that a connection loss interrupted.
PUBLISH_RETRY_DELAY = 0.2

# Errors that mean "the connection or channel went away", not "the broker said no".
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ConnectionClosed,
    aiormq.exceptions.AMQPConnectionError,
    ConnectionError,
)
_DECLARE_HINT = "; only the coordinator declares topology, participants configure nothing"
_CHANNEL_GONE: tuple[type[BaseException], ...] = (*_CONNECTION_LOST, aiormq.exceptions.ChannelClosed)


def queue_arguments(spec: QueueSpec) -> dict[str, str | int]:
    """The `x-` arguments a queue is declared with (also written to definitions.json)."""
    if not spec.quorum:
        return {}
    arguments: dict[str, str | int] = {"x-queue-type": "quorum"}
    if spec.delivery_limit is not None:
        arguments["x-delivery-limit"] = spec.delivery_limit
    if spec.dead_letter_exchange is not None:
        arguments["x-dead-letter-exchange"] = spec.dead_letter_exchange
        if spec.dead_letter_routing_key is not None:
            arguments["x-dead-letter-routing-key"] = spec.dead_letter_routing_key
        # At-least-once dead-lettering keeps a message until the DLX confirms it; it needs reject-publish.
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
    elif spec.max_length is not None or spec.max_length_bytes is not None:
        arguments["x-overflow"] = spec.overflow
    if spec.max_length is not None:
        arguments["x-max-length"] = spec.max_length
    if spec.max_length_bytes is not None:
        arguments["x-max-length-bytes"] = spec.max_length_bytes
    return arguments


def exchange_arguments(spec: ExchangeSpec) -> dict[str, str]:
    """The arguments an exchange is declared with (also written to definitions.json)."""
    if spec.alternate_exchange is None:
        return {}
    return {"alternate-exchange": spec.alternate_exchange}


def describe_url(url: str) -> str:
    """host:port/vhost as user, without the password, for error messages and logs."""
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    return (
        f"{parts.scheme}://{parts.hostname}:{port} vhost {vhost!r} as user {unquote(parts.username or '')!r}"
    )


def broker_headers(raw: Mapping[str, Any] | None) -> dict[str, object]:
    """Delivery headers, with RabbitMQ's own dead-letter headers also exposed as Chorus's reason headers."""
    headers: dict[str, object] = dict(raw or {})
    reason = headers.get("x-first-death-reason")
    if reason is not None and REASON_HEADER not in headers:
        headers[REASON_HEADER] = _text(reason)
        headers[ORIGINAL_EXCHANGE_HEADER] = _text(headers.get("x-first-death-exchange", ""))
        deaths = headers.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
            keys = deaths[0].get("routing-keys")
            if isinstance(keys, list) and keys:
                headers[ORIGINAL_ROUTING_KEY_HEADER] = _text(keys[0])
    return headers


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class AmqpTransport:
    """A robust connection to RabbitMQ as the user named in `url`."""

    def __init__(
        self,
        url: str,
        *,
        connection_name: str = "chorus",
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reconnect_interval: float = DEFAULT_RECONNECT_INTERVAL,
        dead_letter_exchange: str = DEAD_LETTER_EXCHANGE,
        dead_letter_routing_key: str = DEAD_LETTER_KEY,
        coalesce_acks: bool = True,
    ) -> None:
        self.user = unquote(urlsplit(url).username or "guest")
        self._url = url
        self._where = describe_url(url)
        self._connection_name = connection_name
        self._connect_timeout = connect_timeout
        self._reconnect_interval = reconnect_interval
        self._dead_letter_exchange = dead_letter_exchange
        self._dead_letter_routing_key = dead_letter_routing_key
        self._connection: AbstractRobustConnection | None = None
        self._connect_lock = asyncio.Lock()
        self._publisher = _ConfirmedPublisher(self, "publish")
        # Dead-letter copies go on their own channel: a refused one must not close the main publish channel.
        self._dead_letter_publisher = _ConfirmedPublisher(self, "dead-letter")
        self._dead_letter_refused = False
        self._subscriptions: list[AmqpSubscription] = []
        self._closed = False
        # False: one basic.ack frame per delivery, as before acks were coalesced (for comparisons).
        self.coalesce_acks = coalesce_acks
        # basic.ack frames written and deliveries they acked (for tests and benchmarks).
        self.ack_frames = 0
        self.acked = 0

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
        if self._closed:
            raise BrokerError(f"the transport to {self._where} is closed; open a new one")
        async with self._connect_lock:
            if self._connection is None:
                self._connection = await self._open_connection()
            return self._connection

    async def _open_connection(self) -> AbstractRobustConnection:
        try:
            connection = await aio_pika.connect_robust(
                self._url,
                timeout=self._connect_timeout,
                reconnect_interval=self._reconnect_interval,
                client_properties={"connection_name": self._connection_name},
            )
        except aiormq.exceptions.ProbableAuthenticationError as e:
            raise BrokerError(
                f"RabbitMQ refused the login at {self._where}: check the user exists, the password, "
                "and that the user has permissions on the vhost (rabbitmqctl list_permissions -p VHOST)"
            ) from e
        except (aiormq.exceptions.AMQPConnectionError, OSError, TimeoutError) as e:
            tls = (
                " For amqps, check the CA and client certificate files."
                if self._url.startswith("amqps")
                else ""
            )
            raise BrokerError(
                f"cannot connect to RabbitMQ at {self._where} ({type(e).__name__}: {e}); "
                f"is the broker running (chorus-broker status) and is the URL right?{tls}"
            ) from e
        log.debug("connected", broker=self._where)
        return connection

    async def close(self) -> None:
        """Cancel consumers (unsettled deliveries go back to their queues) and close the connection."""
        if self._closed:
            return
        self._closed = True
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            await subscription.abort()
        if self._connection is not None:
            with contextlib.suppress(*_CONNECTION_LOST, aiormq.exceptions.AMQPError):
                await self._connection.close()
            self._connection = None

    async def _channel(self, *, confirms: bool = False) -> AbstractChannel:
        connection = await self.connect()
        try:
            return await connection.channel(publisher_confirms=confirms, on_return_raises=confirms)
        except _CONNECTION_LOST as e:
            raise ChannelUnavailable(f"cannot open a channel to {self._where}: {e}") from e
        except RuntimeError as e:
            # aiormq's way of saying the underlying connection is already closed (the broker went
            # away and the robust connection has not swapped in a new one yet).
            if "closed" not in str(e):
                raise
            raise ChannelUnavailable(f"the connection to {self._where} is closed; reconnecting") from e
        except asyncio.CancelledError as e:
            if not _rpc_cancelled_by_connection_loss():
                raise
            raise ChannelUnavailable(f"lost the connection to {self._where} while opening a channel") from e

    # -- topology ----------------------------------------------------------

    async def declare(self, topology: Topology) -> None:
        # Not robust declarations: after a reconnect the durable topology is still there.
        channel = await self._channel()
        try:
            underlay = await channel.get_underlay_channel()
            for exchange in topology.exchanges:
                await self._guard(
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
                await self._guard(
                    underlay.queue_declare(queue.name, durable=True, arguments=dict(queue_arguments(queue))),
                    f"declare queue {queue.name!r}",
                    _DECLARE_HINT,
                )
            for binding in topology.bindings:
                await self._guard(
                    underlay.queue_bind(binding.queue, binding.exchange, routing_key=binding.routing_key),
                    f"bind queue {binding.queue!r} to {binding.exchange!r} with {binding.routing_key!r}",
                    _DECLARE_HINT,
                )
        finally:
            await _close_quietly(channel)

    async def _guard(self, operation: Any, what: str, hint: str = "") -> Any:
        try:
            return await operation
        except aiormq.exceptions.ChannelAccessRefused as e:
            raise AccessRefused(
                f"user {self.user!r} may not {what} at {self._where}; check its permissions "
                f"(rabbitmqctl list_permissions -p VHOST){hint}"
            ) from e
        except aiormq.exceptions.ChannelPreconditionFailed as e:
            raise BrokerError(
                f"cannot {what}: it exists with different settings ({e}); delete it "
                "(rabbitmqctl delete_queue / delete_exchange) or declare it the same way"
            ) from e
        except aiormq.exceptions.ChannelNotFoundEntity as e:
            raise TopologyMissing(f"cannot {what}: {e}; declare the topology first") from e
        except _CHANNEL_GONE as e:
            raise BrokerError(f"lost the connection to {self._where} while trying to {what}; retry") from e

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
        message = self._message(body, message_id, properties)
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
        message = self._message(body, message_id, dict(headers or {}))
        message.user_id = user_id
        await self._publisher.publish(exchange, routing_key, message, timeout)

    def _message(self, body: bytes, message_id: str | None, headers: dict[str, Any]) -> aio_pika.Message:
        return aio_pika.Message(
            body,
            message_id=message_id,
            user_id=self.user,  # RabbitMQ checks it against the login; the coordinator relies on it
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=datetime.now(UTC),
        )

    # -- consuming ---------------------------------------------------------

    async def consume(
        self, queue: str, handler: Handler, *, prefetch: int = DEFAULT_PREFETCH
    ) -> AmqpSubscription:
        if prefetch < 0:
            raise ValueError(f"prefetch must be 0 (unlimited) or more, got {prefetch}")
        await self._check_queue_exists(queue)
        channel = await self._channel()
        try:
            await channel.set_qos(prefetch_count=prefetch, global_=False)
            amqp_queue = await self._guard(channel.declare_queue(queue, passive=True), f"consume {queue!r}")
            subscription = AmqpSubscription(self, channel, amqp_queue, handler)
            await self._guard(subscription.start(), f"consume from {queue!r}")
        except BaseException:
            await _close_quietly(channel)
            raise
        self._subscriptions.append(subscription)
        return subscription

    async def queue_depth(self, queue: str) -> int:
        """Messages ready in `queue` (not counting unacked ones), from a passive declare."""
        channel = await self._channel()
        try:
            underlay = await channel.get_underlay_channel()
            declared = await self._guard(
                underlay.queue_declare(queue, passive=True), f"inspect queue {queue!r}"
            )
            return int(declared.message_count or 0)
        finally:
            await _close_quietly(channel)

    async def _check_queue_exists(self, queue: str) -> None:
        # Probed on a throwaway channel: a 404 closes the channel it happens on.
        channel = await self._channel()
        try:
            await (await channel.get_underlay_channel()).queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity as e:
            raise TopologyMissing(
                f"queue {queue!r} does not exist at {self._where}; start the broker with the Chorus "
                "topology (chorus-broker up) or have the coordinator declare it"
            ) from e
        finally:
            await _close_quietly(channel)

    async def _check_exchange_exists(self, exchange: str) -> None:
        channel = await self._channel()
        try:
            await (await channel.get_underlay_channel()).exchange_declare(exchange, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity as e:
            raise TopologyMissing(
                f"exchange {exchange!r} does not exist at {self._where}; declare the topology first"
            ) from e
        finally:
            await _close_quietly(channel)

    async def _dead_letter(self, message: AbstractIncomingMessage, delivery: Delivery, reason: str) -> None:
        """Publish a confirmed copy with the reason to the DLX, then ack; if refused, let the queue do it."""
        if not self._dead_letter_refused:
            body, headers = dead_letter_copy(
                message.body,
                message.headers or {},
                exchange=delivery.exchange,
                routing_key=delivery.routing_key,
                user_id=delivery.user_id,
                reason=reason,
            )
            copy = self._message(body, message.message_id, headers)
            try:
                await self._dead_letter_publisher.publish(
                    self._dead_letter_exchange, self._dead_letter_routing_key, copy, DEAD_LETTER_COPY_TIMEOUT
                )
            except AccessRefused as e:
                self._dead_letter_refused = True
                log.warning(
                    "may not publish to the dead-letter exchange; rejecting so the queue dead-letters it",
                    reason=reason,
                    message_id=delivery.message_id,
                    error=str(e),
                )
            except BrokerError as e:
                # Transient (timeout, reconnect): requeue, so the redelivery is judged again and its
                # copy carries the reason; the queue's delivery limit still bounds the retries.
                log.warning(
                    "dead-letter copy not confirmed; requeueing to try again",
                    reason=reason,
                    message_id=delivery.message_id,
                    error=str(e),
                )
                await message.nack(requeue=True)
                return
            else:
                await message.ack()
                self.ack_frames += 1
                self.acked += 1
                return
        await message.nack(requeue=False)


# Confirms can lag when many handlers dead-letter at once on a busy machine; a copy is worth waiting for.
DEAD_LETTER_COPY_TIMEOUT = 30.0


class AccessRefused(BrokerError):
    """The broker refused an operation for lack of permission."""


class ChannelUnavailable(BrokerError):
    """No channel could be opened because the connection is down (a robust one is reconnecting)."""


# A publish that fails with one of these is retried once the connection is back (until its timeout).
_PUBLISH_INTERRUPTED: tuple[type[BaseException], ...] = (
    *_CHANNEL_GONE,
    ChannelUnavailable,
    asyncio.CancelledError,
)


def _rpc_cancelled_by_connection_loss() -> bool:
    """Whether a CancelledError came from aiormq dropping a pending RPC as its connection closed.

    aiormq cancels the futures of RPCs in flight (channel open, declare, publish) when the
    connection dies; that is a lost connection, not a cancellation of the task awaiting it.
    """
    task = asyncio.current_task()
    return task is not None and not task.cancelling()


class _ConfirmedPublisher:
    """One channel with publisher confirms and returns-as-errors, reopened as needed."""

    def __init__(self, transport: AmqpTransport, purpose: str) -> None:
        self._transport = transport
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
                f"within {timeout:.1f}s ({self._transport._where}); it may or may not be stored. "
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
                    f"user {self._transport.user!r} may not publish to {exchange!r} with routing key "
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
                if isinstance(e, asyncio.CancelledError) and not _rpc_cancelled_by_connection_loss():
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
                self._channel = await self._transport._channel(confirms=True)
                self._exchanges = set()
            if exchange not in self._exchanges:
                if exchange != "":
                    # Checked once on a throwaway channel, since a 404 would close this one.
                    await self._transport._check_exchange_exists(exchange)
                self._exchanges.add(exchange)
            return self._channel

    async def _forget_channel(self) -> None:
        # The broker closed it with an error; a fresh one is opened for the next publish.
        channel, self._channel = self._channel, None
        self._exchanges = set()
        if channel is not None:
            await _close_quietly(channel)


class AmqpSubscription:
    """One consumer on its own channel.

    `cancel` drains (running handlers settle first); `abort` closes at once, and the
    broker takes unsettled deliveries back, as with any closed channel.
    """

    def __init__(
        self, transport: AmqpTransport, channel: AbstractChannel, queue: AbstractQueue, handler: Handler
    ) -> None:
        self._transport = transport
        self._channel = channel
        self._queue = queue
        self._handler = handler
        self._tag: str | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._stopped = False
        self._acks = _AckCoalescer(transport)

    async def start(self) -> None:
        self._tag = await self._queue.consume(self._on_message)

    async def cancel(self) -> None:
        """Stop new deliveries, wait for running handlers to settle theirs, then close the channel."""
        if self._stopped:
            return
        self._stopped = True
        if self._tag is not None:
            with contextlib.suppress(*_CONNECTION_LOST, aiormq.exceptions.AMQPError):
                await self._queue.cancel(self._tag)
        current = asyncio.current_task()
        pending = [task for task in self._running if task is not current]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await _close_quietly(self._channel)
        with contextlib.suppress(ValueError):
            self._transport._subscriptions.remove(self)

    async def abort(self) -> None:
        """Close now: running handlers are cancelled and the broker requeues what they held."""
        self._stopped = True
        current = asyncio.current_task()
        pending = [task for task in self._running if task is not current]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await _close_quietly(self._channel)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # aiormq cancels its per-delivery tasks when the connection drops; the handler runs in a task of
        # our own so that it finishes its work (its late ack is then logged, and the broker redelivers).
        task = asyncio.get_running_loop().create_task(self._handle(message))
        self._running.add(task)
        task.add_done_callback(self._handler_done)
        await asyncio.shield(task)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("settling a delivery failed", queue=self._queue.name, exc_info=task.exception())

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        delivery = Delivery(
            body=message.body,
            exchange=message.exchange or "",
            routing_key=message.routing_key or "",
            message_id=message.message_id,
            user_id=message.user_id,
            redelivered=bool(message.redelivered),
            headers=broker_headers(message.headers),
            timestamp=message.timestamp.timestamp() if message.timestamp else None,
        )
        delivery._settle = self._settler(message, delivery)
        try:
            await self._handler(delivery)
        except Exception:
            log.exception(
                "handler failed; requeueing",
                queue=self._queue.name,
                message_id=delivery.message_id,
                routing_key=delivery.routing_key,
            )
            await delivery.requeue()
            return
        await delivery.ack()  # a no-op when the handler settled it already

    def _settler(self, message: AbstractIncomingMessage, delivery: Delivery) -> Settler:
        async def settle(action: Literal["ack", "requeue", "dead_letter"], reason: str) -> None:
            try:
                if action == "ack":
                    await self._acks.ack(message.channel, message.delivery_tag)
                    return
                channel = message.channel
                if action == "requeue":
                    await message.nack(requeue=True)
                else:
                    await self._transport._dead_letter(message, delivery, reason)
                self._acks.settled(channel, message.delivery_tag)
            except _CHANNEL_GONE as e:
                # The channel it came on is gone (reconnect or close); the broker redelivers it.
                log.warning(
                    "cannot settle a delivery from a closed channel; the broker will redeliver it",
                    action=action,
                    queue=self._queue.name,
                    message_id=delivery.message_id,
                    error=repr(e),
                )

        return settle


class _ChannelTags:
    """What is settled of one channel's deliveries: every tag up to `floor`, and `above` it."""

    def __init__(self) -> None:
        self.floor = 0
        self.above: set[int] = set()

    def settle(self, tags: Iterable[int]) -> None:
        self.above.update(t for t in tags if t > self.floor)
        while self.floor + 1 in self.above:
            self.floor += 1
            self.above.discard(self.floor)

    def plan(self, tags: Sequence[int]) -> list[tuple[int, bool]]:
        """Frames (delivery tag, multiple) that ack exactly `tags` (sorted, unsettled) and nothing else.

        Delivery tags of a channel count up from 1, one per delivery, so a tag that is neither settled
        nor in `tags` is a delivery still being handled (or not yet seen): a multiple-ack must stop
        below it. The run of `tags` from the floor up takes one frame; any tag past a gap its own.
        """
        wanted = set(tags)
        top = self.floor
        while top + 1 in wanted or top + 1 in self.above:
            top += 1
        covered = [t for t in tags if t <= top]
        frames: list[tuple[int, bool]] = []
        if covered:
            frames.append((covered[-1], len(covered) > 1))
        frames.extend((t, False) for t in tags if t > top)
        return frames


class _AckCoalescer:
    """Acks of one subscription's deliveries, written as few `basic.ack` frames as is safe.

    An ack waits for the end of the current event-loop turn, so that the acks of handlers woken
    together (the coordinator's intake group commit wakes a whole group at once) share frames; it
    returns once its frame is written. Nacks and rejects go out at once, and are then noted as settled
    so that later multiple-acks may cover their tags. Tags are per channel: after a reconnect the
    robust channel has a new underlying channel whose tags start again from 1.
    """

    def __init__(self, transport: AmqpTransport) -> None:
        self._transport = transport
        self._tags: dict[aiormq.abc.AbstractChannel, _ChannelTags] = {}
        self._pending: dict[aiormq.abc.AbstractChannel, dict[int, asyncio.Future[None]]] = {}
        self._flushing: asyncio.Task[None] | None = None

    async def ack(self, channel: aiormq.abc.AbstractChannel, tag: int | None) -> None:
        if tag is None:
            return
        if not self._transport.coalesce_acks:
            await channel.basic_ack(tag)
            self._transport.ack_frames += 1
            self._transport.acked += 1
            self.settled(channel, tag)
            return
        future = asyncio.get_running_loop().create_future()
        self._pending.setdefault(channel, {})[tag] = future
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())
        await future

    def settled(self, channel: aiormq.abc.AbstractChannel, tag: int | None) -> None:
        """`tag` was nacked or rejected (or acked other than through `ack`)."""
        if tag is not None:
            self._tags.setdefault(channel, _ChannelTags()).settle((tag,))

    async def _flush(self) -> None:
        # Runs from the loop turn after the first ack was asked for: by then every handler woken in
        # that turn has asked for its own.
        try:
            while self._pending:
                pending, self._pending = self._pending, {}
                for channel, waiters in pending.items():
                    await self._ack_on(channel, waiters)
                for channel in [c for c in self._tags if c.is_closed and c not in self._pending]:
                    del self._tags[channel]
        finally:
            self._flushing = None

    async def _ack_on(
        self, channel: aiormq.abc.AbstractChannel, waiters: dict[int, asyncio.Future[None]]
    ) -> None:
        tags = self._tags.setdefault(channel, _ChannelTags())
        frames = tags.plan(sorted(waiters))
        try:
            for index, (tag, multiple) in enumerate(frames):
                # Frames of a connection are written in order: waiting for the last one's drain is enough.
                await channel.basic_ack(tag, multiple=multiple, wait=index == len(frames) - 1)
                self._transport.ack_frames += 1
        except BaseException as e:
            for future in waiters.values():
                if not future.done():
                    if isinstance(e, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        tags.settle(waiters)
        self._transport.acked += len(waiters)
        for future in waiters.values():
            if not future.done():
                future.set_result(None)


async def _close_quietly(channel: AbstractChannel) -> None:
    if channel.is_closed:
        return
    with contextlib.suppress(*_CONNECTION_LOST, aiormq.exceptions.AMQPError):
        await channel.close()
