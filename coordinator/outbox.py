"""Outbox: what the coordinator sends, and the records that make re-sending after a restart exact.

Participants' queues are declared before anything is sent to them. Announcements go to every
participant through the fanout exchange; replies for members (labels, averaged adapters) go to all
recipients in one confirmed publish per body, their reply keys in RabbitMQ's BCC header. Each
delivery is recorded per recipient, so that a restart re-sends only what is missing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import structlog

from broker.errors import Unroutable
from broker.topology import (
    ANNOUNCE_EXCHANGE,
    DIRECT_EXCHANGE,
    MAX_BCC_KEYS,
    SHARED_REPLY_KEY,
    participant_topology,
    reply_key,
)
from broker.transport import Transport
from coordinator.settings import CoordinatorSettings
from coordinator.store import CoordinatorStore
from coordinator.strategies.base import Outgoing

log = structlog.get_logger(__name__)


class Outbox:
    """Declares participants' queues and publishes to them. `on_new_members(pids)` is called once
    new participants' queues exist (the service starts taking their intake then)."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        transport: Transport,
        store: CoordinatorStore,
        on_new_members: Callable[[Sequence[str]], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.transport = transport
        self.store = store
        self.on_new_members = on_new_members
        self.declared: set[str] = set()

    async def declare_participants(self, participant_ids: Sequence[str]) -> None:
        """Declare these participants' reply and intake queues, once each."""
        new = sorted({p for p in participant_ids if p not in self.declared})
        if not new:
            return
        self.declared.update(new)  # before the awaits: a concurrent Join does not repeat it
        try:
            await self.transport.declare(participant_topology(new))
            await self.on_new_members(new)
        except BaseException:
            self.declared.difference_update(new)
            raise

    async def announce(
        self, round_id: int, message_id: str, body: bytes, recipients: Sequence[str], kind: str
    ) -> None:
        """To every participant (the fanout), once: a publication already recorded is not repeated."""
        if self.store.was_published(message_id):
            return
        await self.declare_participants(recipients)
        await self.transport.publish(
            ANNOUNCE_EXCHANGE, "", body, message_id=message_id, timeout=self.settings.publish_timeout_seconds
        )
        self.store.record_publication(message_id, round_id, recipients, kind, len(body))

    async def send_to_members(
        self, round_id: int, replies: Sequence[Outgoing], recipients: Sequence[str]
    ) -> None:
        """Send each reply to each recipient that has not had it yet.

        One confirmed publish per reply carries it to all its recipients (their reply keys in BCC), so
        closing a shard costs one broker round trip, not one per participant.
        """
        # Declared first: a BCC publish reports only a message that reached no queue at all.
        await self.declare_participants(recipients)
        pending: list[tuple[Outgoing, list[str]]] = []
        for reply in replies:
            unsent = [p for p in recipients if not self.store.was_published(f"{reply.message_id}@{p}")]
            for start in range(0, len(unsent), MAX_BCC_KEYS):
                pending.append((reply, unsent[start : start + MAX_BCC_KEYS]))

        async def publish(reply: Outgoing, participant_ids: list[str]) -> None:
            keys = [reply_key(p) for p in participant_ids]
            routing_key, bcc = (keys[0], []) if len(keys) == 1 else (SHARED_REPLY_KEY, keys)
            await self.transport.publish(
                DIRECT_EXCHANGE,
                routing_key,
                reply.body,
                message_id=reply.message_id,
                timeout=self.settings.publish_timeout_seconds,
                bcc=bcc,
            )

        # Concurrently, each confirmed on its own; the confirmed ones are recorded in one transaction.
        outcomes = await asyncio.gather(*(publish(*p) for p in pending), return_exceptions=True)
        failure: BaseException | None = None
        with self.store.transaction():
            for (reply, participant_ids), outcome in zip(pending, outcomes, strict=True):
                if isinstance(outcome, Unroutable):
                    log.warning(
                        "no_reply_queue", round=round_id, participants=participant_ids, kind=reply.kind
                    )
                elif isinstance(outcome, BaseException):
                    failure = failure or outcome
                else:
                    for participant_id in participant_ids:
                        key = f"{reply.message_id}@{participant_id}"
                        self.store.record_publication(
                            key, round_id, [participant_id], reply.kind, len(reply.body)
                        )
        if failure is not None:
            raise failure
