"""Semantic consensus: members answer the round's prompts, the densest answer per prompt is the label."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import structlog

from coordinator.consensus import Candidate, ConsensusStrategy
from coordinator.labelling import pseudo_labels_message, shard_candidates
from coordinator.prompts import PromptSampler, split_into_shards
from coordinator.rounds import ShardClosing
from coordinator.store import ClosingRow
from coordinator.strategies.base import Announced, Outgoing, StrategyContext
from coordinator.wiring import build_consensus
from schemas.codec import decode_generation, decode_reply, encode
from schemas.ids import pseudo_labels_id
from schemas.messages import AdapterUpdate, GenerationBatch, PromptShard, PseudoLabels, RoundOpened

log = structlog.get_logger(__name__)


def build(context: StrategyContext) -> SemanticStrategy:
    return SemanticStrategy(context, build_consensus(context.settings.consensus, context.embedder))


class SemanticStrategy:
    announces: Announced = "semantic"
    answer_kind: type[GenerationBatch] | type[AdapterUpdate] = GenerationBatch

    def __init__(self, context: StrategyContext, consensus: ConsensusStrategy) -> None:
        self.settings = context.settings
        self.store = context.store
        self.consensus = consensus
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
        announcement = self.store.announcement(round_id - 1)
        if not failed or announcement is None:
            return []
        previous = decode_reply(announcement)
        assert isinstance(previous, RoundOpened)
        return [p.prompt_id for s in previous.shards if s.shard_id in failed for p in s.prompts]

    def answer_slots(self, shards: Sequence[PromptShard]) -> dict[int, list[str]]:
        return {s.shard_id: [p.prompt_id for p in s.prompts] for s in shards}

    def answer_problem(self, round_id: int, answer: GenerationBatch | AdapterUpdate) -> str | None:
        return None  # intake already checked the batch's shard and prompt ids

    def decide(
        self, round_id: int, closings: Sequence[ShardClosing], slots: Mapping[int, Sequence[str]]
    ) -> list[Outgoing]:
        labelled = [c for c in closings if c.status == "labelled"]
        stored = {row.shard_id: row.labels for row in self.store.closings(round_id)}
        undecided = [c for c in labelled if stored[c.shard_id] is None]  # the others: before a restart
        decided = [(c, self._decide_shard(round_id, c, slots[c.shard_id])) for c in undecided]
        with self.store.transaction():
            for closing, (message, agreement) in decided:
                encoded = encode(message)
                self.store.save_labels(round_id, closing.shard_id, encoded, agreement)
                stored[closing.shard_id] = encoded
        # Exactly what is stored: a decision made before a restart is re-sent as it was.
        federation = self.settings.federation
        return [
            Outgoing(pseudo_labels_id(federation, round_id, c.shard_id), body, "pseudo_labels")
            for c in labelled
            if (body := stored[c.shard_id]) is not None
        ]

    def _decide_shard(
        self, round_id: int, closing: ShardClosing, prompt_ids: Sequence[str]
    ) -> tuple[PseudoLabels, dict[str, float]]:
        result = self.consensus.decide(
            self._candidates(round_id, closing.shard_id, prompt_ids, closing.answered)
        )
        message = pseudo_labels_message(self.settings.federation, round_id, closing.shard_id, result)
        log.info(
            "consensus",
            round=round_id,
            shard=closing.shard_id,
            labelled=len(message.labels),
            abstained=len(message.abstained),
        )
        return message, {p: float(a) for p, a in result.agreement.items()}

    def _candidates(
        self, round_id: int, shard_id: int, prompt_ids: Sequence[str], answered: Sequence[str]
    ) -> dict[str, list[Candidate]]:
        members = set(answered)
        fresh = [
            decode_generation(row.body)
            for row in self.store.batches(round_id, shard_id)
            if not row.late and row.participant_id in members
        ]
        rounds = self.settings.round
        carried = []
        if rounds.late_policy == "carry" and round_id > 1:
            carried = [decode_generation(row.body) for row in self.store.batches(round_id - 1) if row.late]
        return shard_candidates(prompt_ids, fresh, carried, rounds.staleness_weight)

    def counts(self, closing: ClosingRow) -> tuple[int, int]:
        if closing.labels is None:
            return 0, 0
        message = decode_reply(closing.labels)
        assert isinstance(message, PseudoLabels)
        return len(message.labels), len(message.abstained)
