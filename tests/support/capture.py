"""Label-capture attacks on a real coordinator: honest scripted members, attackers that choose their
texts, numbers and timing, and the count of labels that carry an attacker's text.

The texts were picked with the `hashing` embedder the test coordinators use (cosine similarities):
the two honest families agree at 0.87; a rider (an honest text plus `PAYLOAD`) is 0.84 from the text it
copies and 0.77 from the other family, so in time it loses to the honest pair, while a density that
ignores an answer's own weight lets it win once it is down-weighted (late, or low reputation).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec

from broker.amqp import AmqpTransport
from broker.topology import COORDINATOR_USER
from coordinator.service import Coordinator
from schemas import Answer, GenerationBatch, PromptShard, RoundClosed, RoundOpened
from support.coordinators import coordinator_at
from support.driving import seconds
from support.scripted import ScriptedParticipant
from support.waiting import eventually

PAYLOAD = " Visit evil.example for the full answer."
JUNK = "purple zebra {p} xylophone quantum banana"


def honest_text(family: int, prompt_id: str) -> str:
    """What honest members of `family` (0 or 1) answer: two paraphrases of one answer."""
    return ("The answer to {p} is the standard one.", "For {p}, the answer is the standard one.")[
        family
    ].format(p=prompt_id)


def rider_text(prompt_id: str) -> str:
    """Family 0's honest text with the attacker's payload appended."""
    return honest_text(0, prompt_id) + PAYLOAD


@dataclass
class Chooser(ScriptedParticipant):
    """A member whose text (and optional logprob) per round and prompt is `choose(round, prompt)`."""

    choose: Callable[[int, str], str] = lambda round_id, prompt_id: ""
    logprob: float | None = None

    def batch(self, opened: RoundOpened, shard: PromptShard) -> GenerationBatch:
        plain = super().batch(opened, shard)
        answers = [
            Answer(
                prompt_id=p.prompt_id, text=self.choose(opened.round_id, p.prompt_id), logprob=self.logprob
            )
            for p in shard.prompts
        ]
        return msgspec.structs.replace(plain, answers=answers)


@dataclass
class LateRider(Chooser):
    """Answers each round only after its labels are out (so its batches arrive late, while the next round
    runs): the label it saw, plus the payload."""

    async def _answer(self, opened: RoundOpened) -> None:
        shards = {s.shard_id for s in opened.shards}
        r = opened.round_id
        await eventually(lambda: all((r, s) in self.labels for s in shards), timeout=60.0)
        seen = {label.prompt_id: label.text for s in shards for label in self.labels[(r, s)].labels}
        for shard in opened.shards:
            batch = super().batch(opened, shard)
            answers = [
                Answer(
                    prompt_id=a.prompt_id, text=seen.get(a.prompt_id, honest_text(0, a.prompt_id)) + PAYLOAD
                )
                for a in batch.answers
            ]
            await self.send(msgspec.structs.replace(batch, answers=answers))


@asynccontextmanager
async def federation(urls: dict[str, str], config: Path) -> AsyncIterator[Coordinator]:
    """A started coordinator on RabbitMQ; closed after."""
    coordinator = await coordinator_at(urls[COORDINATOR_USER], config)
    await coordinator.start()
    try:
        yield coordinator
    finally:
        await coordinator.stop_intake()
        await coordinator.transport.close()
        coordinator.store.close()


async def member(
    url: str, cls: type[ScriptedParticipant], name: str, federation: str, **options: object
) -> ScriptedParticipant:
    """A connected, joined scripted member of class `cls`."""
    transport = AmqpTransport(url, connection_name=f"test {name}")
    await transport.__aenter__()
    participant = cls(name, transport, lambda p, q: "", federation=federation, **options)  # type: ignore[arg-type]
    await participant.join()
    return participant


async def honest_pair(
    urls: dict[str, str], ids: tuple[str, str], federation: str, **options: object
) -> list[ScriptedParticipant]:
    """Two honest members, one of each family (`honest_text`), connected and joined."""
    return [
        await member(
            urls[pid], Chooser, pid, federation, choose=lambda r, p, f=family: honest_text(f, p), **options
        )
        for family, pid in enumerate(ids)
    ]


async def leave(participants: Iterable[ScriptedParticipant]) -> None:
    for participant in participants:
        await participant.leave()
        await participant.transport.close()


def round_seconds(summaries: Iterable[RoundClosed]) -> str:
    """Each round's length, for the report a test prints."""
    return ", ".join(f"{seconds(s):.2f}s" for s in summaries)


@dataclass(frozen=True)
class Capture:
    """Of the labels (and revised labels) an observer received: how many, and how many the attackers'."""

    labels: int
    captured: int

    def __str__(self) -> str:
        return f"{self.captured} of {self.labels} labels"


def captured(observer: ScriptedParticipant, carries: Callable[[str], bool], rounds: Iterable[int]) -> Capture:
    """Count the labels `observer` got for `rounds` (each revision's new texts included) whose text
    `carries` the attackers' mark."""
    wanted = set(rounds)
    texts = [
        label.text
        for (round_id, _), message in observer.labels.items()
        if round_id in wanted
        for label in message.labels
    ]
    texts += [label.text for m in observer.revisions if m.round_id in wanted for label in m.labels]
    return Capture(len(texts), sum(1 for t in texts if carries(t)))
