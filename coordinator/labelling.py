"""From a shard's generation batches to its pseudo-labels message; pure, shared by service and replay.

The coordinator service and `chorus-replay consensus` both call these two functions, so a replay
builds exactly the candidates and the exact bytes the live coordinator would have.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from msgspec import UNSET

from broker.topology import COORDINATOR_USER
from coordinator.consensus import Candidate, ShardConsensus
from schemas.ids import pseudo_labels_id
from schemas.messages import GenerationBatch, Label, PseudoLabels

MAX_REASON_CHARS = 256  # PseudoLabels.abstain_reasons holds ShortText


def shard_candidates(
    prompt_ids: Sequence[str],
    fresh: Iterable[GenerationBatch],
    carried: Iterable[GenerationBatch] = (),
    staleness_weight: float = 1.0,
) -> dict[str, list[Candidate]]:
    """Prompt id -> candidates of one shard.

    `fresh`: the batches the shard closed with (non-late, from its answered set).
    `carried`: late batches of the previous round (late_policy "carry"); their answers to this
    shard's prompts count with `staleness_weight`, unless the same participant answered fresh.
    Answers to prompts outside the shard are ignored.
    """
    candidates: dict[str, list[Candidate]] = {pid: [] for pid in prompt_ids}
    fresh_sources: dict[str, set[str]] = {pid: set() for pid in prompt_ids}
    for batch in fresh:
        for answer in batch.answers:
            if answer.prompt_id in candidates:
                candidates[answer.prompt_id].append(Candidate(batch.participant_id, answer.text))
                fresh_sources[answer.prompt_id].add(batch.participant_id)
    for batch in carried:
        for answer in batch.answers:
            if answer.prompt_id in candidates and batch.participant_id not in fresh_sources[answer.prompt_id]:
                candidates[answer.prompt_id].append(
                    Candidate(batch.participant_id, answer.text, staleness_weight)
                )
    return candidates


def changed_labels(original: PseudoLabels, redone: PseudoLabels, in_time: Mapping[str, int]) -> list[Label]:
    """The labels of `redone` that `original` did not give: a new text for a prompt, or a label for a
    prompt it abstained on. A prompt `redone` abstains on keeps its original label (a label that was
    trained on cannot be taken back), and so does one whose original label every one of its `in_time`
    answers (prompt id -> how many the shard closed with) agreed with: a late answer, written after the
    labels went out, does not overturn a unanimous one."""
    before = {label.prompt_id: label for label in original.labels}
    return [
        label
        for label in redone.labels
        if (kept := before.get(label.prompt_id)) is None
        or (kept.text != label.text and kept.support < in_time.get(label.prompt_id, 0))
    ]


def pseudo_labels_message(
    federation: str, round_id: int, shard_id: int, result: ShardConsensus
) -> PseudoLabels:
    """The PseudoLabels message for one shard's consensus result (abstentions listed, not labelled)."""
    labels = [
        Label(
            prompt_id=d.prompt_id,
            text=d.label,
            confidence=max(-1.0, min(1.0, d.confidence)),
            support=d.support,
            source=d.source or COORDINATOR_USER,
        )
        for d in result.decisions
        if d.label is not None
    ]
    return PseudoLabels(
        federation=federation,
        round_id=round_id,
        message_id=pseudo_labels_id(federation, round_id, shard_id),
        participant_id=COORDINATOR_USER,
        shard_id=shard_id,
        labels=labels,
        abstained=[d.prompt_id for d in result.decisions if d.label is None],
        abstain_reasons={
            d.prompt_id: d.abstain_reason[:MAX_REASON_CHARS] for d in result.decisions if d.label is None
        }
        or UNSET,
    )


# A reason's words that differ from prompt to prompt (counts, a confidence), so that one cause reads as
# one line however many prompts it stopped: see `coordinator.consensus` for the reasons themselves.
_PER_PROMPT_PARTS = (
    (
        re.compile(r"^usable answers: \d+(?: \(\d+ blank\))?; (min_answers is .*)$"),
        r"too few non-blank answers: \1",
    ),
    (re.compile(r"^(no answer is agreed with by more than \S+ of the prompt's) \d+ (answers.*)$"), r"\1 \2"),
    (re.compile(r"^confidence \S+ is below (min_confidence .*)$"), r"confidence is below \1"),
)
UNSAID = "no reason given (labels from an older coordinator)"


def reason_group(reason: str) -> str:
    """The cause `reason` names, without the numbers of its one prompt."""
    for pattern, replacement in _PER_PROMPT_PARTS:
        if pattern.match(reason):
            return pattern.sub(replacement, reason)
    return reason or UNSAID


def abstain_reason_counts(messages: Iterable[PseudoLabels]) -> dict[str, int]:
    """Cause -> how many prompts abstained for it, over `messages` (their revisions left out), most first."""
    counts: Counter[str] = Counter()
    for message in messages:
        if message.revision == 0:
            counts.update(reason_group(message.abstain_reason(p)) for p in message.abstained)
    return dict(counts.most_common())
