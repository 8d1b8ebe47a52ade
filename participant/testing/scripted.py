"""A scripted participant: a real transport client that answers with canned text, no model.

It speaks the wire protocol as a real participant does (Join on its control key, one GenerationBatch
per shard of each RoundOpened, then it collects PseudoLabels and RoundClosed), so a coordinator can be
run end to end on either transport: write a coordinator test, a strategy or a foreign learner's
counterpart against it, as FastStream's `TestRabbitBroker` lets one test handlers without a broker.
Subclass it for a participant that misbehaves (override `batch`, `send` or `_answer`).

What it saw and did is kept for the caller to check: the rounds opened, the labels and closings
received (and when), the batches the broker confirmed (and when), and publish errors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from broker.topology import UP_EXCHANGE, control_key, generation_key, reply_queue
from broker.transport import DEFAULT_PREFETCH, DEFAULT_PUBLISH_TIMEOUT, Delivery, Subscription, Transport
from schemas import (
    Answer,
    GenerationBatch,
    Join,
    PromptShard,
    PseudoLabels,
    RoundClosed,
    RoundOpened,
    decode_reply,
    encode,
    new_message_id,
)
from schemas.ids import batch_id

AnswerFn = Callable[[str, str], str]  # (participant, prompt_id) -> answer text
RoundShard = tuple[int, int]  # (round, shard)


async def publish_join(transport: Transport, federation: str, participant_id: str, model_id: str) -> None:
    """A simulated participant's Join, on its own control key (what a real participant sends first)."""
    join = Join(
        federation=federation,
        round_id=0,
        message_id=new_message_id(),
        participant_id=participant_id,
        model_id=model_id,
    )
    await transport.publish(
        UP_EXCHANGE, control_key(participant_id), encode(join), message_id=join.message_id
    )


@dataclass
class ScriptedParticipant:
    """Joins, answers every round once with `answer`'s text, and records what comes back."""

    participant_id: str
    transport: Transport
    answer: AnswerFn
    federation: str = "test"
    delay: float = 0.0  # seconds to wait before answering each round
    protocol_ids: bool = False  # message ids as PROTOCOL.md §7.4 has them, else random ones
    silent: bool = False  # joins and receives, never answers
    concurrent: bool = False  # publish a round's shards all at once (load), else one after another
    model_id: str = "scripted"
    prefetch: int = DEFAULT_PREFETCH
    publish_timeout: float = DEFAULT_PUBLISH_TIMEOUT
    # What it saw:
    opened: list[RoundOpened] = field(default_factory=list)
    labels: dict[RoundShard, PseudoLabels] = field(default_factory=dict)
    labelled_at: dict[RoundShard, float] = field(default_factory=dict)  # first arrival, unix time
    label_deliveries: int = 0
    revisions: list[PseudoLabels] = field(default_factory=list)  # every delivery of a label revision
    revised_at: list[float] = field(default_factory=list)  # unix time of each
    closed: list[RoundClosed] = field(default_factory=list)  # every delivery, duplicates included
    closed_at: dict[int, float] = field(default_factory=dict)  # round -> first arrival, unix time
    # What it did:
    published: int = 0  # batches handed to the transport
    confirmed_at: dict[RoundShard, float] = field(default_factory=dict)  # broker confirms, unix time
    errors: list[str] = field(default_factory=list)  # publishes that failed
    _subscription: Subscription | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def join(self) -> None:
        self._subscription = await self.transport.consume(
            reply_queue(self.participant_id), self._on_reply, prefetch=self.prefetch
        )
        await publish_join(self.transport, self.federation, self.participant_id, self.model_id)

    async def leave(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._subscription is not None:
            await self._subscription.cancel()

    @property
    def confirmed(self) -> list[tuple[int, int, str]]:
        """(round, shard, participant) of every batch the broker confirmed."""
        return [(round_id, shard_id, self.participant_id) for round_id, shard_id in self.confirmed_at]

    def closing(self, round_id: int) -> RoundClosed | None:
        """The first RoundClosed received for `round_id`."""
        return next((c for c in self.closed if c.round_id == round_id), None)

    async def _on_reply(self, delivery: Delivery) -> None:
        message = decode_reply(delivery.body)
        if message.federation != self.federation:
            await delivery.ack()  # another federation's leftovers on a shared test broker
            return
        now = time.time()
        if isinstance(message, RoundOpened):
            if all(o.round_id != message.round_id for o in self.opened):
                self.opened.append(message)
                task = asyncio.create_task(self._answer(message))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        elif isinstance(message, PseudoLabels) and message.revision:
            self.revisions.append(message)
            self.revised_at.append(now)
        elif isinstance(message, PseudoLabels):
            self.label_deliveries += 1
            self.labels[(message.round_id, message.shard_id)] = message
            self.labelled_at.setdefault((message.round_id, message.shard_id), now)
        elif isinstance(message, RoundClosed):
            self.closed.append(message)
            self.closed_at.setdefault(message.round_id, now)
        await delivery.ack()

    async def _answer(self, opened: RoundOpened) -> None:
        """Answer every shard of a round (subclasses change what they send, or when)."""
        if self.silent:
            return
        if self.delay:
            await asyncio.sleep(self.delay)
        batches = [self.batch(opened, shard) for shard in opened.shards]
        if self.concurrent:
            await asyncio.gather(*(self.send(batch) for batch in batches))
            return
        for batch in batches:
            if not await self.send(batch):
                return  # one after another: a failed publish ends the round's answers

    def batch(self, opened: RoundOpened, shard: PromptShard) -> GenerationBatch:
        """This participant's answers to one shard."""
        return GenerationBatch(
            federation=self.federation,
            round_id=opened.round_id,
            message_id=(
                batch_id(self.participant_id, opened.round_id, shard.shard_id)
                if self.protocol_ids
                else new_message_id()
            ),
            participant_id=self.participant_id,
            shard_id=shard.shard_id,
            model_id=self.model_id,
            answers=[
                Answer(prompt_id=p.prompt_id, text=self.answer(self.participant_id, p.prompt_id))
                for p in shard.prompts
            ],
        )

    async def send(self, batch: GenerationBatch, bcc: Sequence[str] = ()) -> bool:
        """Publish a batch under this participant's generation key; note its confirm, or the error."""
        self.published += 1
        try:
            await self.publish(batch, bcc)
        except Exception as e:  # noted for the caller, who counts it as lost
            self.errors.append(repr(e))
            return False
        self.confirmed_at[(batch.round_id, batch.shard_id)] = time.time()
        return True

    async def publish(self, batch: GenerationBatch, bcc: Sequence[str] = ()) -> None:
        """One publish, waiting up to `publish_timeout` for the broker's confirm."""
        await self.transport.publish(
            UP_EXCHANGE,
            generation_key(batch.shard_id, self.participant_id),
            encode(batch),
            message_id=batch.message_id,
            timeout=self.publish_timeout,
            bcc=bcc,
        )
