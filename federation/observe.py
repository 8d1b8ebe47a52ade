"""What the run's report sees: the messages its services publish, once the broker confirms them.

The report learns of a round from the wire (RoundOpened, PseudoLabels and RoundClosed from the
coordinator, ParticipantReport from each participant), never from a service's store or state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from broker.transport import DEFAULT_PREFETCH, Handler, Subscription, Topology, Transport
from schemas.codec import MAX_BODY_BYTES, Codec
from schemas.messages import Message, ParticipantReport, PseudoLabels, RoundClosed, RoundOpened

Observer = Callable[[Message], None]

REPORTED: tuple[type[Message], ...] = (RoundOpened, PseudoLabels, RoundClosed, ParticipantReport)
_reported_kinds = frozenset(str(k.__struct_config__.tag) for k in REPORTED)
_codec: Codec[Message] = Codec(REPORTED, max_body_bytes=MAX_BODY_BYTES)


class _Kind(msgspec.Struct):
    kind: object = None


# Reads the kind alone, so that generations and adapters are never decoded a second time.
_kind_decoder = msgspec.msgpack.Decoder(_Kind)


def reported_message(body: bytes) -> Message | None:
    """The message in `body` if it is one the report shows, else None."""
    if _kind_decoder.decode(body).kind not in _reported_kinds:
        return None
    return _codec.decode(body)


class ObservedTransport:
    """A `Transport` that hands `observer` every reported message `inner` publishes, once confirmed.

    As an async context manager it enters and leaves `inner`.
    """

    def __init__(self, inner: Transport, observer: Observer) -> None:
        self.inner = inner
        self.observer = observer
        self.user = inner.user

    async def __aenter__(self) -> ObservedTransport:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.inner.__aexit__(*exc_info)

    async def declare(self, topology: Topology) -> None:
        await self.inner.declare(topology)

    async def publish(self, exchange: str, routing_key: str, body: bytes, **options: Any) -> None:
        """`Transport.publish`, its keyword options passed on unchanged."""
        await self.inner.publish(exchange, routing_key, body, **options)
        message = reported_message(body)
        if message is not None:
            self.observer(message)

    async def consume(
        self, queue: str, handler: Handler, *, prefetch: int = DEFAULT_PREFETCH
    ) -> Subscription:
        return await self.inner.consume(queue, handler, prefetch=prefetch)

    def is_connected(self) -> bool:
        return self.inner.is_connected()

    async def close(self) -> None:
        await self.inner.close()
