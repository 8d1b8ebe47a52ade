"""`AmqpSubscription`: one consumer on its own channel, and how its deliveries are settled.

- Each delivery's handler runs in a task of its own, so a connection lost meanwhile does not cut it
  short; a settle on a channel that is gone is logged, not raised (the broker redelivers).
- Acks that handlers ask for in the same event-loop turn go out as few frames as is safe
  (`AckCoalescer`): one `basic.ack(multiple=True)` covers a run of delivery tags only when every
  lower tag on that channel is settled or acked with it (`ChannelTags`).
- A dead-lettered delivery gets a confirmed copy in the dead-letter exchange with the reason, then
  an ack (`DeadLetterer`); where the user may not publish there, the queue dead-letters it instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from broker.amqp.connection import CHANNEL_GONE, CONNECTION_LOST, close_quietly
from broker.amqp.publisher import ConfirmedPublisher, persistent_message
from broker.errors import AccessRefused, BrokerError
from broker.transport import (
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    REASON_HEADER,
    Delivery,
    Handler,
    Settler,
    dead_letter_copy,
)

log = structlog.get_logger(__name__)

# Confirms can lag when many handlers dead-letter at once on a busy machine; a copy is worth waiting for.
DEAD_LETTER_COPY_TIMEOUT = 30.0


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


@dataclass
class AckCounts:
    """`basic.ack` frames written and deliveries they acked, over all consumers of a connection
    (for tests and benchmarks)."""

    frames: int = 0
    acked: int = 0


class DeadLetterer:
    """Moves deliveries to the dead-letter exchange: a confirmed copy with the reason, then an ack.

    One per connection: once the broker refuses this user a copy, later dead letters go straight to
    `nack(requeue=False)`, and the queue's own dead-lettering (without the reason) takes them.
    """

    def __init__(
        self,
        publisher: ConfirmedPublisher,
        *,
        user: str,
        exchange: str,
        routing_key: str,
        counts: AckCounts,
    ) -> None:
        self._publisher = publisher
        self._user = user
        self._exchange = exchange
        self._routing_key = routing_key
        self._counts = counts
        self._refused = False

    async def dead_letter(self, message: AbstractIncomingMessage, delivery: Delivery, reason: str) -> None:
        """Publish a confirmed copy with the reason to the DLX, then ack; if refused, let the queue do it."""
        if not self._refused:
            body, headers = dead_letter_copy(
                message.body,
                message.headers or {},
                exchange=delivery.exchange,
                routing_key=delivery.routing_key,
                user_id=delivery.user_id,
                reason=reason,
            )
            copy = persistent_message(
                body, message_id=message.message_id, user_id=self._user, headers=headers
            )
            try:
                await self._publisher.publish(
                    self._exchange, self._routing_key, copy, DEAD_LETTER_COPY_TIMEOUT
                )
            except AccessRefused as e:
                self._refused = True
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
                self._counts.frames += 1
                self._counts.acked += 1
                return
        await message.nack(requeue=False)


class AmqpSubscription:
    """One consumer on its own channel.

    `cancel` drains (running handlers settle first); `abort` closes at once, and the
    broker takes unsettled deliveries back, as with any closed channel. `on_cancel` is told once
    `cancel` has closed the channel (the transport then forgets the subscription).
    """

    def __init__(
        self,
        channel: AbstractChannel,
        queue: AbstractQueue,
        handler: Handler,
        *,
        dead_letters: DeadLetterer,
        counts: AckCounts,
        coalesce_acks: bool = True,
        on_cancel: Callable[[AmqpSubscription], None] | None = None,
    ) -> None:
        self._channel = channel
        self._queue = queue
        self._handler = handler
        self._dead_letters = dead_letters
        self._on_cancel = on_cancel
        self._tag: str | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._stopped = False
        self._acks = AckCoalescer(counts, coalesce=coalesce_acks)

    async def start(self) -> None:
        self._tag = await self._queue.consume(self._on_message)

    async def cancel(self) -> None:
        """Stop new deliveries, wait for running handlers to settle theirs, then close the channel."""
        if self._stopped:
            return
        self._stopped = True
        if self._tag is not None:
            with contextlib.suppress(*CONNECTION_LOST, aiormq.exceptions.AMQPError):
                await self._queue.cancel(self._tag)
        current = asyncio.current_task()
        pending = [task for task in self._running if task is not current]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await close_quietly(self._channel)
        if self._on_cancel is not None:
            self._on_cancel(self)

    async def abort(self) -> None:
        """Close now: running handlers are cancelled and the broker requeues what they held."""
        self._stopped = True
        current = asyncio.current_task()
        pending = [task for task in self._running if task is not current]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await close_quietly(self._channel)

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
                    await self._dead_letters.dead_letter(message, delivery, reason)
                self._acks.settled(channel, message.delivery_tag)
            except CHANNEL_GONE as e:
                # The channel it came on is gone (reconnect or close); the broker redelivers it.
                log.warning(
                    "cannot settle a delivery from a closed channel; the broker will redeliver it",
                    action=action,
                    queue=self._queue.name,
                    message_id=delivery.message_id,
                    error=repr(e),
                )

        return settle


class ChannelTags:
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


class AckCoalescer:
    """Acks of one subscription's deliveries, written as few `basic.ack` frames as is safe.

    An ack waits for the end of the current event-loop turn, so that the acks of handlers woken
    together (the coordinator's intake group commit wakes a whole group at once) share frames; it
    returns once its frame is written. Nacks and rejects go out at once, and are then noted as settled
    so that later multiple-acks may cover their tags. Tags are per channel: after a reconnect the
    robust channel has a new underlying channel whose tags start again from 1.

    With `coalesce=False`, one `basic.ack` frame per delivery (as before acks were coalesced, for
    comparisons).
    """

    def __init__(self, counts: AckCounts, *, coalesce: bool = True) -> None:
        self._counts = counts
        self._coalesce = coalesce
        self._tags: dict[aiormq.abc.AbstractChannel, ChannelTags] = {}
        self._pending: dict[aiormq.abc.AbstractChannel, dict[int, asyncio.Future[None]]] = {}
        self._flushing: asyncio.Task[None] | None = None

    async def ack(self, channel: aiormq.abc.AbstractChannel, tag: int | None) -> None:
        if tag is None:
            return
        if not self._coalesce:
            await channel.basic_ack(tag)
            self._counts.frames += 1
            self._counts.acked += 1
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
            self._tags.setdefault(channel, ChannelTags()).settle((tag,))

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
        tags = self._tags.setdefault(channel, ChannelTags())
        frames = tags.plan(sorted(waiters))
        try:
            for index, (tag, multiple) in enumerate(frames):
                # Frames of a connection are written in order: waiting for the last one's drain is enough.
                await channel.basic_ack(tag, multiple=multiple, wait=index == len(frames) - 1)
                self._counts.frames += 1
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
        self._counts.acked += len(waiters)
        for future in waiters.values():
            if not future.done():
                future.set_result(None)
