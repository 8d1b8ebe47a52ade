"""Scripted participants: real transport clients that answer with canned text, no models.

They speak the wire protocol exactly as a real participant does (join, answer
each RoundOpened shard by shard, collect PseudoLabels and RoundClosed), so the
coordinator can be tested end to end on either transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.common import publish_join
from broker.amqp import AmqpTransport
from broker.topology import UP_EXCHANGE, generation_key, reply_queue
from broker.transport import Delivery, Subscription, Transport
from schemas import (
    Answer,
    GenerationBatch,
    PseudoLabels,
    RoundClosed,
    RoundOpened,
    decode_reply,
    encode,
    new_message_id,
)

AnswerFn = Callable[[str, str], str]  # (participant, prompt_id) -> answer text


@dataclass
class ScriptedParticipant:
    participant_id: str
    transport: Transport
    answer: AnswerFn
    federation: str = "test"
    delay: float = 0.0  # seconds to wait before answering each round
    protocol_ids: bool = False  # message ids as PROTOCOL.md §7.4 has them, else random ones
    silent: bool = False  # joins and receives, never answers
    opened: list[RoundOpened] = field(default_factory=list)
    labels: dict[tuple[int, int], PseudoLabels] = field(default_factory=dict)
    label_deliveries: int = 0
    closed: list[RoundClosed] = field(default_factory=list)
    _subscription: Subscription | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def join(self) -> None:
        self._subscription = await self.transport.consume(reply_queue(self.participant_id), self._on_reply)
        await publish_join(self.transport, self.federation, self.participant_id, "scripted")

    async def _on_reply(self, delivery: Delivery) -> None:
        message = decode_reply(delivery.body)
        if message.federation != self.federation:
            await delivery.ack()  # another federation's leftovers on a shared test broker
            return
        if isinstance(message, RoundOpened):
            if all(o.round_id != message.round_id for o in self.opened):
                self.opened.append(message)
                task = asyncio.create_task(self._answer(message))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        elif isinstance(message, PseudoLabels):
            self.label_deliveries += 1
            self.labels[(message.round_id, message.shard_id)] = message
        elif isinstance(message, RoundClosed):
            self.closed.append(message)
        await delivery.ack()

    async def _answer(self, opened: RoundOpened) -> None:
        if self.silent:
            return
        if self.delay:
            await asyncio.sleep(self.delay)
        for shard in opened.shards:
            message_id = (
                f"{self.participant_id}.r{opened.round_id}.s{shard.shard_id}.gen"
                if self.protocol_ids
                else new_message_id()
            )
            batch = GenerationBatch(
                federation=self.federation,
                round_id=opened.round_id,
                message_id=message_id,
                participant_id=self.participant_id,
                shard_id=shard.shard_id,
                model_id="scripted",
                answers=[
                    Answer(prompt_id=p.prompt_id, text=self.answer(self.participant_id, p.prompt_id))
                    for p in shard.prompts
                ],
            )
            await self.transport.publish(
                UP_EXCHANGE,
                generation_key(shard.shard_id, self.participant_id),
                encode(batch),
                message_id=batch.message_id,
            )

    async def leave(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._subscription is not None:
            await self._subscription.cancel()


def consensus_answers(participant_id: str, prompt_id: str) -> str:
    """Most participants agree on a paraphrase family; 'mallory' answers nonsense."""
    if participant_id == "mallory":
        return f"purple zebra {prompt_id} xylophone quantum banana"
    variants = ["The answer to {p} is the standard one.", "For {p}, the answer is the standard one."]
    return variants[hash(participant_id) % 2].format(p=prompt_id)


async def participant_at(url: str, name: str, federation: str, **options: object) -> ScriptedParticipant:
    """A scripted participant with `consensus_answers`, logged in to RabbitMQ at `url` (connected)."""
    transport = AmqpTransport(url, connection_name=f"test {name}")
    await transport.__aenter__()
    return ScriptedParticipant(name, transport, consensus_answers, federation=federation, **options)  # type: ignore[arg-type]
