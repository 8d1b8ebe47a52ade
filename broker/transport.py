"""The transport seam: what services need from a message broker, and nothing more.

Two implementations: `broker.memory.MemoryTransport` (embedded, in-process) and
`broker.amqp.AmqpTransport` (RabbitMQ via aio-pika). Services only see this.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Protocol

HeaderValue = str | int | float | bool
Headers = Mapping[str, HeaderValue]

# Header the dead-letter queue's messages carry to say why they were rejected.
REASON_HEADER = "x-chorus-reason"
ORIGINAL_EXCHANGE_HEADER = "x-chorus-exchange"
ORIGINAL_ROUTING_KEY_HEADER = "x-chorus-routing-key"
DEFAULT_PUBLISH_TIMEOUT = 10.0
# RabbitMQ's header for sender-selected distribution; the broker removes it before delivery.
BCC_HEADER = "BCC"
DEFAULT_PREFETCH = 200
# Who published a message that a consumer later dead-lettered: the copy in the
# dead-letter queue carries the dead-lettering user's `user_id` (the broker insists).
ORIGINAL_USER_HEADER = "x-chorus-user-id"
# Set by quorum queues on a redelivered message: how many deliveries failed so far.
DELIVERY_COUNT_HEADER = "x-delivery-count"
# A dead-letter copy keeps at most this much of the body, so that a flood of large rejected bodies
# cannot fill the dead-letter queue; the original size is in BODY_BYTES_HEADER.
DEAD_LETTER_BODY_BYTES = 4096
BODY_BYTES_HEADER = "x-chorus-body-bytes"
# Headers a publisher could set to mislead whoever reads a dead letter or re-routes it: our own
# x-chorus-* (the reason, the original user...) and RabbitMQ's sender-selected distribution keys.
_UNTRUSTED_HEADERS = ("CC", "BCC")
_UNTRUSTED_PREFIX = "x-chorus-"


@dataclass(frozen=True)
class ExchangeSpec:
    """A durable exchange; what matches no binding goes to `alternate_exchange`, when one is named."""

    name: str
    type: Literal["topic", "direct", "fanout"]
    alternate_exchange: str | None = None


@dataclass(frozen=True)
class QueueSpec:
    """A durable queue. Quorum queues carry their delivery limit and dead-letter target.

    `max_length` (messages) and `max_length_bytes` (bodies) bound the queue; once full, a queue with
    `overflow = "reject-publish"` nacks new publishes, one with `"drop-head"` drops its oldest.
    """

    name: str
    quorum: bool = True
    delivery_limit: int | None = None
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None
    max_length: int | None = None
    max_length_bytes: int | None = None
    overflow: Literal["reject-publish", "drop-head"] = "reject-publish"

    def __post_init__(self) -> None:
        if self.dead_letter_exchange is not None and self.overflow != "reject-publish":
            # At-least-once dead-lettering, which Chorus's work queues use, needs reject-publish.
            raise ValueError(
                f"queue {self.name!r}: a queue with a dead-letter exchange must use reject-publish"
            )


@dataclass(frozen=True)
class BindingSpec:
    queue: str
    exchange: str
    routing_key: str


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[ExchangeSpec, ...] = ()
    queues: tuple[QueueSpec, ...] = ()
    bindings: tuple[BindingSpec, ...] = ()

    def merged(self, other: Topology) -> Topology:
        def union(a: tuple[object, ...], b: tuple[object, ...]) -> tuple[object, ...]:
            return a + tuple(x for x in b if x not in a)

        return Topology(
            exchanges=union(self.exchanges, other.exchanges),  # type: ignore[arg-type]
            queues=union(self.queues, other.queues),  # type: ignore[arg-type]
            bindings=union(self.bindings, other.bindings),  # type: ignore[arg-type]
        )


@dataclass
class Delivery:
    """One message handed to a consumer. Settle it exactly once: ack, requeue or dead_letter."""

    body: bytes
    exchange: str
    routing_key: str
    message_id: str | None
    user_id: str | None
    redelivered: bool
    headers: Mapping[str, object] = field(default_factory=dict)
    timestamp: float | None = None
    _settle: Settler | None = field(default=None, repr=False)
    settled: bool = False

    async def ack(self) -> None:
        """Acknowledge. A transport may write the acks of deliveries settled in the same event-loop turn
        as one frame (`AmqpTransport` does, only where no unsettled delivery is covered by it)."""
        await self._do("ack", "")

    async def requeue(self) -> None:
        await self._do("requeue", "")

    async def dead_letter(self, reason: str) -> None:
        """Move the message to the dead-letter queue with `reason` in its headers."""
        await self._do("dead_letter", reason)

    async def _do(self, action: Literal["ack", "requeue", "dead_letter"], reason: str) -> None:
        if self.settled:
            return  # settling twice is a programming slip, never worth a crash
        assert self._settle is not None, "delivery has no settler"
        await self._settle(action, reason)
        self.settled = True
        # The settler closes over this delivery: drop it, or the cycle keeps the body alive until the
        # cyclic garbage collector happens to run (a refused 100 MiB body held for no reason).
        self._settle = None


def dead_letter_copy(
    body: bytes,
    headers: Mapping[str, object],
    *,
    exchange: str,
    routing_key: str,
    user_id: str | None,
    reason: str,
) -> tuple[bytes, dict[str, object]]:
    """Body and headers of the copy a consumer puts in the dead-letter queue.

    The publisher's own `x-chorus-*`, `CC` and `BCC` headers are dropped (they would forge the audit
    trail or re-route the copy), the reason and the original exchange, key and user are added, and
    the body is cut to `DEAD_LETTER_BODY_BYTES`.
    """
    kept = {
        k: v
        for k, v in headers.items()
        if k not in _UNTRUSTED_HEADERS and not k.lower().startswith(_UNTRUSTED_PREFIX)
    }
    kept.pop(DELIVERY_COUNT_HEADER, None)
    kept[REASON_HEADER] = reason
    kept[ORIGINAL_EXCHANGE_HEADER] = exchange
    kept[ORIGINAL_ROUTING_KEY_HEADER] = routing_key
    if user_id is not None:
        kept[ORIGINAL_USER_HEADER] = user_id
    kept[BODY_BYTES_HEADER] = len(body)
    return body[:DEAD_LETTER_BODY_BYTES], kept


Settler = Callable[[Literal["ack", "requeue", "dead_letter"], str], Awaitable[None]]
Handler = Callable[[Delivery], Awaitable[None]]


class Subscription(Protocol):
    async def cancel(self) -> None: ...


class Transport(Protocol):
    """A connection to a broker as one user. Use it as an async context manager."""

    user: str

    async def __aenter__(self) -> Transport: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def declare(self, topology: Topology) -> None:
        """Create exchanges, queues and bindings (idempotent). Needs configure rights."""
        ...

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
        """Publish persistently and wait for the broker's confirm.

        The message carries `user_id` = this connection's user. Raises `Unroutable`
        when no queue takes it and `PublishTimeout` when unconfirmed in time.

        `bcc` adds routing keys on the same exchange (RabbitMQ's sender-selected distribution): one
        publish and one confirm put a copy in every queue that `routing_key` or any of these keys
        routes to, never two copies in one queue. The keys are not delivered, and `Unroutable` then
        means that no key routed anywhere: a key that alone routes nowhere goes unreported.
        """
        ...

    async def consume(
        self, queue: str, handler: Handler, *, prefetch: int = DEFAULT_PREFETCH
    ) -> Subscription:
        """Deliver messages of an existing queue to `handler` (passive: never declares).

        A handler that returns without settling acks; one that raises requeues,
        and the queue's delivery limit dead-letters a message that keeps failing.
        """
        ...

    def is_connected(self) -> bool:
        """Whether the link to the broker is up now (False before the first connection and after
        `close`). Cheap and safe to call from another thread (a health endpoint's)."""
        ...

    async def close(self) -> None: ...
