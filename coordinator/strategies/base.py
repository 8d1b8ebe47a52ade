"""The strategy seam: what makes a federation semantic, FedAvg, majority or anything else.

The coordinator service drives rounds (membership, deadlines, quorum, intake, publishing, restarts)
and asks its `RoundStrategy` only what differs between strategies: the name a round announces, which
reply answers it and how large a body intake reads for it, whether an answer can count, what to send
back once shards close, and which parts of deciding to time. It never names a strategy.

A strategy only decides: `decide` and `revise` return `Decision`s (coordinator.decisions) and never
write the store; the service persists them before it sends their replies, and after a restart re-sends
the stored bytes instead of asking again. A strategy may read the store (answers, announcements,
summaries of earlier rounds). One module with a `build(context)` function, registered by one line in
`coordinator/strategies/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from common.embedding import Embedder
from coordinator.decisions import Decision, Outgoing
from coordinator.prompts import PublicPrompt
from coordinator.rounds import ShardClosing
from coordinator.settings import CoordinatorSettings
from coordinator.store import CoordinatorStore
from schemas.codec import MAX_ADAPTER_BODY_BYTES, MAX_SMALL_CONTROL_BYTES
from schemas.messages import AdapterUpdate, GenerationBatch, PromptShard

__all__ = [
    "ADAPTER_ANSWERS",
    "TEXT_ANSWERS",
    "AnswerRules",
    "Decision",
    "Observe",
    "Outgoing",
    "RoundStrategy",
    "StrategyContext",
]

# (part, seconds): how long one timed part of deciding took, e.g. ("embedding", 0.03).
Observe = Callable[[str, float], None]


@dataclass(frozen=True)
class AnswerRules:
    """What answers a strategy's rounds, declared so that intake and restarts need not name it."""

    kind: type[GenerationBatch] | type[AdapterUpdate]
    # The largest control body intake reads; a larger one is refused unread (PROTOCOL.md §8.3).
    max_control_bytes: int


# Members answer the round's prompts with text (GenerationBatch); control bodies stay small.
TEXT_ANSWERS = AnswerRules(GenerationBatch, MAX_SMALL_CONTROL_BYTES)
# Members answer with their adapter weights (AdapterUpdate), a control body of up to 128 MiB.
ADAPTER_ANSWERS = AnswerRules(AdapterUpdate, MAX_ADAPTER_BODY_BYTES)


@dataclass(frozen=True)
class StrategyContext:
    """What a strategy may use: the settings, the coordinator's store (to read), the public prompts,
    and an embedder chosen by the caller (None: the one the settings name)."""

    settings: CoordinatorSettings
    store: CoordinatorStore
    prompts: Sequence[PublicPrompt]
    embedder: Embedder | None = None


class RoundStrategy(Protocol):
    """In the spirit of Flower's `Strategy`: configure a round, judge a reply, decide closed shards."""

    # What `RoundOpened.strategy` announces: participants act on it (PROTOCOL.md §5.4 lists the names
    # and what each asks of a member); by convention the name the strategy is registered under.
    announces: str
    answers: AnswerRules

    def shards(self, round_id: int) -> list[PromptShard]:
        """The prompt shards round `round_id` announces (none for a strategy without prompts)."""
        ...

    def answer_slots(self, shards: Sequence[PromptShard]) -> dict[int, list[str]]:
        """Shard id -> prompt ids: where the round's state records answers (at least one shard)."""
        ...

    def answer_problem(self, round_id: int, answer: GenerationBatch | AdapterUpdate) -> str | None:
        """Why an answer that passed intake's checks still cannot count (None: it can)."""
        ...

    def decide(
        self, round_id: int, closings: Sequence[ShardClosing], slots: Mapping[int, Sequence[str]]
    ) -> list[Decision]:
        """Decide the labelled shards among `closings`, which closed together with the answer sets
        they froze (`slots`: every shard's prompt ids). At most one decision per shard.

        Runs in a worker thread; writes nothing (the service stores what it returns, and a shard
        decided before a restart is not asked again).
        """
        ...

    def revise(self, round_id: int, decided: Mapping[int, Decision]) -> list[Decision]:
        """Once the round after `round_id` closes: decisions that revise `decided` (`round_id`'s, by
        shard) with the late answers it got (none if nothing changed, or the strategy does not
        revise). Asked once per round, in a worker thread; stored like `decide`'s."""
        ...

    def time_parts(self, observe: Observe) -> None:
        """From now on call `observe(part, seconds)` for each timed part of deciding ("embedding":
        each call to the sentence embedder). A strategy with nothing to time ignores it."""
        ...
