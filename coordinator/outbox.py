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
from coordinator.decisions import Outgoing
from coordinator.settings import CoordinatorSettings
from coordinator.store import CoordinatorStore

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
        self.published_bytes = 0  # body bytes of every confirmed publish, once per publish
        self._declaring: dict[str, asyncio.Future[None]] = {}  # participant -> its declaration under way

    async def declare_participants(self, participant_ids: Sequence[str]) -> None:
        """Declare these participants' reply and intake queues, once each; return once they all exist.

        A declaration another caller started (a Join, say) is waited for, not skipped: a round opening
        meanwhile must not announce to a member whose queues are still being declared, or what that
        member sends at once would find no intake queue.
        """
        wanted = set(participant_ids)
        while missing := wanted - self.declared:
            in_flight = {self._declaring[p] for p in missing if p in self._declaring}
            new = sorted(p for p in missing if p not in self._declaring)
            if new:
                await self._declare(new)
            if in_flight:
                await asyncio.wait(in_flight)  # a failed one is declared again by this loop

    async def _declare(self, participant_ids: list[str]) -> None:
        done = asyncio.get_running_loop().create_future()
        self._declaring.update((p, done) for p in participant_ids)
        try:
            await self.transport.declare(participant_topology(participant_ids))
            await self.on_new_members(participant_ids)
            self.declared.update(participant_ids)
        finally:
            for p in participant_ids:
                del self._declaring[p]
            done.set_result(None)

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
        self.published_bytes += len(body)
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
                    self.published_bytes += len(reply.body)
                    for participant_id in participant_ids:
                        key = f"{reply.message_id}@{participant_id}"
                        self.store.record_publication(
                            key, round_id, [participant_id], reply.kind, len(reply.body)
                        )
        if failure is not None:
            raise failure
