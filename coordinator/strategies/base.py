"""The strategy seam: what makes a federation semantic, FedAvg or anything else.

The coordinator service drives rounds (membership, deadlines, quorum, intake, publishing, restarts)
and asks its `RoundStrategy` only what differs between strategies: what a round announces, which
reply answers it, whether an answer can count, and what to send back once shards close. It never
names a strategy. A strategy is one module with a `build(context)` function, registered by one line
in `coordinator/strategies/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from common.embedding import Embedder
from coordinator.prompts import PublicPrompt
from coordinator.rounds import ShardClosing
from coordinator.settings import CoordinatorSettings
from coordinator.store import ClosingRow, CoordinatorStore
from schemas.messages import AdapterUpdate, GenerationBatch, PromptShard

# What `RoundOpened.strategy` tells participants to do: answer prompts, or send adapters.
Announced = Literal["semantic", "fedavg"]


@dataclass(frozen=True)
class Outgoing:
    """One reply for every member of a round (labels, an averaged adapter...), encoded once."""

    message_id: str
    body: bytes
    kind: str  # how its publication is recorded, e.g. "pseudo_labels"


@dataclass(frozen=True)
class StrategyContext:
    """What a strategy may use: the settings, the coordinator's store, the public prompts, and an
    embedder chosen by the caller (None: the one the settings name)."""

    settings: CoordinatorSettings
    store: CoordinatorStore
    prompts: Sequence[PublicPrompt]
    embedder: Embedder | None = None


class RoundStrategy(Protocol):
    """In the spirit of Flower's `Strategy`: configure a round, judge a reply, close shards."""

    announces: Announced
    answer_kind: type[GenerationBatch] | type[AdapterUpdate]  # the reply that answers a round

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
    ) -> list[Outgoing]:
        """Decide the labelled shards that closed together, persist the decisions, return the replies.

        Runs in a worker thread. A decision persisted before a restart must come back as it was, so
        that a re-sent reply is byte for byte the one sent before.
        """
        ...

    def counts(self, closing: ClosingRow) -> tuple[int, int]:
        """(labelled, abstained) prompts of a closed shard, from its stored closing, for `RoundClosed`."""
        ...

    def revise(self, round_id: int) -> list[Outgoing]:
        """Once the round after `round_id` closes: replies that revise `round_id`'s decisions with the
        late answers it got (none if nothing changed, or the strategy does not revise). Persisted like
        `decide`'s, and runs in a worker thread."""
        ...
