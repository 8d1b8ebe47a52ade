"""Majority of identical answers, the plainest baseline: members answer the round's prompts as in a
semantic federation, and a prompt's label is the answer that a strict majority of the round's members
gave word for word, once case and whitespace are set aside; otherwise it abstains.

Why it is safe against members that lie (DESIGN.md §4): every member counts once and no weight is
read, so none can count for more; no number a member reports (`Answer.logprob`) is read; a label needs
more than half of all the members the round expected (silent and sidelined ones count against it), so
attackers that are not such a majority cannot label a prompt, and two answers with the same count can
never both be a majority: a tie abstains. Late answers are not counted (nothing is carried or revised).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence

import structlog
from msgspec import UNSET

from broker.topology import COORDINATOR_USER
from coordinator.rounds import ShardClosing
from coordinator.strategies.base import Decision, Outgoing, StrategyContext
from coordinator.strategies.prompted import PromptedStrategy
from schemas.codec import encode
from schemas.ids import pseudo_labels_id
from schemas.messages import Label, PseudoLabels

log = structlog.get_logger(__name__)

MAX_REASON_CHARS = 256  # PseudoLabels.abstain_reasons holds ShortText


def build(context: StrategyContext) -> MajorityStrategy:
    return MajorityStrategy(context)


def normalize(text: str) -> str:
    """An answer as the majority compares it: words separated by single spaces, case folded."""
    return " ".join(text.split()).casefold()


def majority_label(prompt_id: str, given: Mapping[str, str], members: int) -> Label | str:
    """The label of one prompt from `given` (participant -> its answer), or why the prompt abstains.

    `members`: how many members the round expected; a label needs more than half of them. Of the
    majority's texts the most frequent becomes the label, a tie between spellings going to the lower
    SHA-256 of the text; its source is the lowest participant id among those that wrote it (the
    label's text does not depend on who wrote it).
    """
    groups: dict[str, list[tuple[str, str]]] = {}
    for participant, text in sorted(given.items()):
        if key := normalize(text):
            groups.setdefault(key, []).append((participant, text))
    largest = max((len(group) for group in groups.values()), default=0)
    if 2 * largest <= members:
        return (
            f"no answer was given by a strict majority of the round's {members} members "
            f"(the most given alike: {largest})"
        )
    (group,) = [group for group in groups.values() if len(group) == largest]
    spellings = Counter(text for _, text in group)
    text = min(spellings, key=lambda t: (-spellings[t], hashlib.sha256(t.encode()).digest()))
    return Label(
        prompt_id=prompt_id,
        text=text,
        confidence=largest / members,
        support=largest,
        source=min(participant for participant, written in group if written == text),
    )


def majority_labels(
    federation: str,
    round_id: int,
    shard_id: int,
    answers: Mapping[str, Mapping[str, str]],
    prompt_ids: Sequence[str],
    members: int,
) -> tuple[PseudoLabels, dict[str, float]]:
    """One shard's PseudoLabels from `answers` (participant -> prompt id -> text), and each answering
    participant's agreement: the share of the shard's labels its own answer matched."""
    labels: list[Label] = []
    reasons: dict[str, str] = {}
    for prompt_id in prompt_ids:
        given = {p: texts[prompt_id] for p, texts in answers.items() if prompt_id in texts}
        outcome = majority_label(prompt_id, given, max(members, len(answers)))
        if isinstance(outcome, Label):
            labels.append(outcome)
        else:
            reasons[prompt_id] = outcome[:MAX_REASON_CHARS]
    message = PseudoLabels(
        federation=federation,
        round_id=round_id,
        message_id=pseudo_labels_id(federation, round_id, shard_id),
        participant_id=COORDINATOR_USER,
        shard_id=shard_id,
        labels=labels,
        abstained=list(reasons),
        abstain_reasons=reasons or UNSET,
    )
    agreement = {
        participant: sum(
            normalize(texts.get(label.prompt_id, "")) == normalize(label.text) for label in labels
        )
        / len(labels)
        for participant, texts in sorted(answers.items())
        if labels
    }
    return message, agreement


class MajorityStrategy(PromptedStrategy):
    announces = "majority"

    def decide(
        self, round_id: int, closings: Sequence[ShardClosing], slots: Mapping[int, Sequence[str]]
    ) -> list[Decision]:
        members = len(self.store.expected(round_id))
        return [
            self._decide_shard(round_id, closing, slots[closing.shard_id], members)
            for closing in closings
            if closing.status == "labelled"
        ]

    def _decide_shard(
        self, round_id: int, closing: ShardClosing, prompt_ids: Sequence[str], members: int
    ) -> Decision:
        answers = {
            batch.participant_id: {a.prompt_id: a.text for a in batch.answers}
            for batch in self.answered_batches(round_id, closing.shard_id, closing.answered)
        }
        message, agreement = majority_labels(
            self.settings.federation, round_id, closing.shard_id, answers, prompt_ids, members
        )
        log.info(
            "majority",
            round=round_id,
            shard=closing.shard_id,
            labelled=len(message.labels),
            abstained=len(message.abstained),
        )
        reply = Outgoing(message.message_id, encode(message), "pseudo_labels")
        return Decision(closing.shard_id, reply, agreement, len(message.labels), len(message.abstained))

    def revise(self, round_id: int, decided: Mapping[int, Decision]) -> list[Decision]:
        return []  # late answers are not counted
