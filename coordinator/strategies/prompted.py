"""What every strategy whose members answer the round's prompts with text shares: which prompts a
round asks (the previous round's failed shards first), where answers are recorded, and the batches a
shard closed with. Semantic consensus and the majority baseline build on it."""

from __future__ import annotations

from collections.abc import Sequence

from coordinator import stored
from coordinator.prompts import PromptSampler, split_into_shards
from coordinator.strategies.base import TEXT_ANSWERS, AnswerRules, Observe, StrategyContext
from schemas.codec import decode_generation
from schemas.messages import AdapterUpdate, GenerationBatch, PromptShard


class PromptedStrategy:
    """The prompt-answering half of a `RoundStrategy`; a subclass adds `announces`, `decide` and
    `revise`."""

    answers: AnswerRules = TEXT_ANSWERS

    def __init__(self, context: StrategyContext) -> None:
        self.settings = context.settings
        self.store = context.store
        self._sampler = PromptSampler(context.prompts, context.settings.round.seed)

    def shards(self, round_id: int) -> list[PromptShard]:
        rounds = self.settings.round
        chosen = self._sampler.sample(round_id, rounds.prompts_per_round, self._carried_prompt_ids(round_id))
        return split_into_shards(chosen, rounds.shards)

    def _carried_prompt_ids(self, round_id: int) -> list[str]:
        """Prompts of the previous round's failed shards go first into this round."""
        if round_id <= 1:
            return []
        failed = {c.shard_id for c in self.store.closings(round_id - 1) if c.status == "failed"}
        body = self.store.announcement(round_id - 1)
        if not failed or body is None:
            return []
        previous = stored.announcement.decode(body)
        return [p.prompt_id for s in previous.shards if s.shard_id in failed for p in s.prompts]

    def answer_slots(self, shards: Sequence[PromptShard]) -> dict[int, list[str]]:
        return {s.shard_id: [p.prompt_id for p in s.prompts] for s in shards}

    def answer_problem(self, round_id: int, answer: GenerationBatch | AdapterUpdate) -> str | None:
        return None  # intake already checked the batch's shard and prompt ids

    def answered_batches(
        self, round_id: int, shard_id: int, answered: Sequence[str]
    ) -> list[GenerationBatch]:
        """The batches a shard closed with: in time, from its answered set."""
        members = set(answered)
        return [
            decode_generation(row.body)
            for row in self.store.batches(round_id, shard_id)
            if not row.late and row.participant_id in members
        ]

    def time_parts(self, observe: Observe) -> None:
        return None  # nothing timed unless a subclass says so
