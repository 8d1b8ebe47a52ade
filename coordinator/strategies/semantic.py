"""Semantic consensus: members answer the round's prompts, the densest answer per prompt is the label."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import msgspec
import structlog

from common.embedding import Embedder, Embeddings
from coordinator import stored
from coordinator.consensus import Candidate, Consensus
from coordinator.labelling import changed_labels, pseudo_labels_message, shard_candidates
from coordinator.reputation import weigh_votes
from coordinator.rounds import ShardClosing
from coordinator.sidelining import sidelined_in
from coordinator.store import ClosingRow
from coordinator.strategies.base import Decision, Observe, Outgoing, StrategyContext
from coordinator.strategies.prompted import PromptedStrategy
from coordinator.wiring import build_consensus, build_embedder
from schemas.codec import decode_generation, encode
from schemas.ids import label_revision_id
from schemas.messages import GenerationBatch, PseudoLabels

log = structlog.get_logger(__name__)


def build(context: StrategyContext) -> SemanticStrategy:
    table = context.settings.consensus
    # Wrapped where it is built, so that the embedding can be timed without reaching into consensus.
    embedder = TimedEmbedder(context.embedder if context.embedder is not None else build_embedder(table))
    return SemanticStrategy(context, build_consensus(table, embedder), embedder)


class SemanticStrategy(PromptedStrategy):
    announces = "semantic"

    def __init__(
        self, context: StrategyContext, consensus: Consensus, embedder: TimedEmbedder | None = None
    ) -> None:
        """`embedder`: the one `consensus` embeds with, if it is to be timed."""
        super().__init__(context)
        self.consensus = consensus
        self._embedder = embedder
        self._history: tuple[int, list[Mapping[str, float]]] | None = None  # (round, its history)

    def time_parts(self, observe: Observe) -> None:
        """Times each call to the sentence embedder ("embedding"), in consensus's worker thread."""
        if self._embedder is not None:
            self._embedder.observe = lambda seconds: observe("embedding", seconds)

    def decide(
        self, round_id: int, closings: Sequence[ShardClosing], slots: Mapping[int, Sequence[str]]
    ) -> list[Decision]:
        return [
            self._decide_shard(round_id, closing, slots[closing.shard_id])
            for closing in closings
            if closing.status == "labelled"
        ]

    def _decide_shard(self, round_id: int, closing: ShardClosing, prompt_ids: Sequence[str]) -> Decision:
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
        return Decision(
            closing.shard_id,
            Outgoing(message.message_id, encode(message), "pseudo_labels"),
            {p: float(a) for p, a in result.agreement.items()},
            labelled=len(message.labels),
            abstained=len(message.abstained),
        )

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
            summaries = self.store.summaries(1, round_id - 1)
            self._history = (round_id, [stored.summary.decode(body).agreement for body in summaries])
        return self._history[1]

    def _candidates(
        self, round_id: int, shard_id: int, prompt_ids: Sequence[str], answered: Sequence[str]
    ) -> dict[str, list[Candidate]]:
        rounds = self.settings.round
        carried = []
        if rounds.late_policy == "carry" and round_id > 1:
            carried = self._late_batches(round_id - 1)
        fresh = self.answered_batches(round_id, shard_id, answered)
        return shard_candidates(prompt_ids, fresh, carried, rounds.staleness_weight)

    def _late_batches(self, round_id: int) -> list[GenerationBatch]:
        return [decode_generation(row.body) for row in self.store.batches(round_id, late_only=True)]

    def revise(self, round_id: int, decided: Mapping[int, Decision]) -> list[Decision]:
        """late_policy "revise": re-run each labelled shard of `round_id` that got late answers with
        them (at `staleness_weight`); a decision for each shard whose labels changed or appeared."""
        if self.settings.round.late_policy != "revise" or round_id < 1:
            return []
        # A sidelined member is not waited for; its late answers do not get to rewrite the labels either.
        rounds = self.settings.round.sideline_after_missed_rounds
        sidelined = sidelined_in(self.store, round_id, self.store.expected(round_id), rounds)
        late = [b for b in self._late_batches(round_id) if b.participant_id not in sidelined]
        revisions = []
        for closing in self.store.closings(round_id) if late else []:
            original = decided.get(closing.shard_id)
            shard_late = [b for b in late if b.shard_id == closing.shard_id]
            if closing.status == "labelled" and original is not None and shard_late:
                revision = self._revise_shard(round_id, closing, original, shard_late)
                if revision is not None:
                    revisions.append(revision)
        return revisions

    def _revise_shard(
        self, round_id: int, closing: ClosingRow, decided: Decision, late: Sequence[GenerationBatch]
    ) -> Decision | None:
        original = stored.pseudo_labels.decode(decided.reply.body)
        prompt_ids = [label.prompt_id for label in original.labels] + list(original.abstained)
        fresh = self.answered_batches(round_id, closing.shard_id, closing.answered)
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
        revision: PseudoLabels = msgspec.structs.replace(
            redone,
            message_id=label_revision_id(self.settings.federation, round_id, closing.shard_id),
            labels=changed,
            abstained=[],
            revision=1,
        )
        reply = Outgoing(revision.message_id, encode(revision), "label_revision")
        return Decision(closing.shard_id, reply, labelled=len(changed))


class TimedEmbedder:
    """An embedder that reports how long each `embed` call takes to `observe(seconds)` (called from
    consensus's worker thread; nothing until someone sets it)."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.observe: Callable[[float], None] = _unobserved

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def name(self) -> str:
        return self.inner.name

    def embed(self, texts: Sequence[str]) -> Embeddings:
        started = time.perf_counter()
        try:
            return self.inner.embed(texts)
        finally:
            self.observe(time.perf_counter() - started)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)  # what else the inner one offers (a cache's size, say)


def _unobserved(seconds: float) -> None:
    return None
