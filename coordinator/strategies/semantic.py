"""Semantic consensus: members answer the round's prompts, the densest answer per prompt is the label."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec
import structlog

from coordinator.benching import benched_in
from coordinator.consensus import Candidate, ConsensusStrategy
from coordinator.labelling import changed_labels, pseudo_labels_message, shard_candidates
from coordinator.prompts import PromptSampler, split_into_shards
from coordinator.reputation import weigh_votes
from coordinator.rounds import ShardClosing
from coordinator.store import ClosingRow
from coordinator.strategies.base import Announced, Outgoing, StrategyContext
from coordinator.wiring import build_consensus
from schemas.codec import decode_generation, decode_reply, encode
from schemas.ids import label_revision_id, pseudo_labels_id
from schemas.messages import (
    AdapterUpdate,
    GenerationBatch,
    PromptShard,
    PseudoLabels,
    RoundClosed,
    RoundOpened,
)

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
        self._history: tuple[int, list[Mapping[str, float]]] | None = None  # (round, its history)

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
        candidates = self._candidates(round_id, closing.shard_id, prompt_ids, closing.answered)
        result = self.consensus.decide(self._weigh_votes(round_id, candidates))
        message = pseudo_labels_message(self.settings.federation, round_id, closing.shard_id, result)
        log.info(
            "consensus",
            round=round_id,
            shard=closing.shard_id,
            labelled=len(message.labels),
            abstained=len(message.abstained),
        )
        return message, {p: float(a) for p, a in result.agreement.items()}

    def _weigh_votes(
        self, round_id: int, candidates: dict[str, list[Candidate]]
    ) -> dict[str, list[Candidate]]:
        """With vote_weighting "reputation", each member's answers count by its past agreement."""
        table = self.settings.consensus
        if table.vote_weighting != "reputation" or round_id <= 1:
            return candidates
        return weigh_votes(candidates, self._agreement_history(round_id), table)

    def _agreement_history(self, round_id: int) -> list[Mapping[str, float]]:
        """Each earlier round's agreement map, oldest first; read once per round (not per shard), since
        the rounds before this one are closed."""
        if self._history is None or self._history[0] != round_id:
            history: list[Mapping[str, float]] = []
            for body in self.store.summaries(1, round_id - 1):
                summary = decode_reply(body)
                assert isinstance(summary, RoundClosed)
                history.append(summary.agreement)
            self._history = (round_id, history)
        return self._history[1]

    def _candidates(
        self, round_id: int, shard_id: int, prompt_ids: Sequence[str], answered: Sequence[str]
    ) -> dict[str, list[Candidate]]:
        rounds = self.settings.round
        carried = []
        if rounds.late_policy == "carry" and round_id > 1:
            carried = self._late_batches(round_id - 1)
        fresh = self._answered_batches(round_id, shard_id, answered)
        return shard_candidates(prompt_ids, fresh, carried, rounds.staleness_weight)

    def _late_batches(self, round_id: int) -> list[GenerationBatch]:
        return [decode_generation(row.body) for row in self.store.batches(round_id, late_only=True)]

    def _answered_batches(
        self, round_id: int, shard_id: int, answered: Sequence[str]
    ) -> list[GenerationBatch]:
        """The batches a shard closed with: in time, from its answered set."""
        members = set(answered)
        return [
            decode_generation(row.body)
            for row in self.store.batches(round_id, shard_id)
            if not row.late and row.participant_id in members
        ]

    def revise(self, round_id: int) -> list[Outgoing]:
        """late_policy "revise": re-run each labelled shard of `round_id` that got late answers with
        them (at `staleness_weight`), and send the labels that changed or appeared, once."""
        if self.settings.round.late_policy != "revise" or round_id < 1:
            return []
        revised = self.store.revisions(round_id)
        if revised is None:
            revised = {}
            # A benched member is not waited for; its late answers do not get to rewrite the labels either.
            benched = benched_in(
                self.store,
                round_id,
                self.store.expected(round_id),
                self.settings.round.bench_after_missed_rounds,
            )
            late = [b for b in self._late_batches(round_id) if b.participant_id not in benched]
            for closing in self.store.closings(round_id) if late else []:
                shard_late = [b for b in late if b.shard_id == closing.shard_id]
                body = self._revise_shard(round_id, closing, shard_late)
                if body is not None:
                    revised[closing.shard_id] = body
            self.store.save_revisions(round_id, revised)
        federation = self.settings.federation
        return [
            Outgoing(label_revision_id(federation, round_id, shard_id), body, "label_revision")
            for shard_id, body in sorted(revised.items())
        ]

    def _revise_shard(
        self, round_id: int, closing: ClosingRow, late: Sequence[GenerationBatch]
    ) -> bytes | None:
        if closing.status != "labelled" or closing.labels is None or not late:
            return None
        original = decode_reply(closing.labels)
        assert isinstance(original, PseudoLabels)
        prompt_ids = [label.prompt_id for label in original.labels] + list(original.abstained)
        fresh = self._answered_batches(round_id, closing.shard_id, closing.answered)
        in_time = {p: len(answers) for p, answers in shard_candidates(prompt_ids, fresh).items()}
        candidates = shard_candidates(prompt_ids, fresh, late, self.settings.round.staleness_weight)
        result = self.consensus.decide(self._weigh_votes(round_id, candidates))
        redone = pseudo_labels_message(self.settings.federation, round_id, closing.shard_id, result)
        changed = changed_labels(original, redone, in_time)
        log.info(
            "labels_revised",
            round=round_id,
            shard=closing.shard_id,
            late=sorted(b.participant_id for b in late),
            changed=len(changed),
        )
        if not changed:
            return None
        revision = msgspec.structs.replace(
            redone,
            message_id=label_revision_id(self.settings.federation, round_id, closing.shard_id),
            labels=changed,
            abstained=[],
            revision=1,
        )
        return encode(revision)

    def counts(self, closing: ClosingRow) -> tuple[int, int]:
        if closing.labels is None:
            return 0, 0
        message = decode_reply(closing.labels)
        assert isinstance(message, PseudoLabels)
        return len(message.labels), len(message.abstained)
