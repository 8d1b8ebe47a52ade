"""How good were the pseudo-labels? Each label's ROUGE-L F1 against the prompt's reference answer,
beside the members' answers to that prompt. Pure: no I/O, no model.

Per prompt, with the members' answers `A` and the reference `r`:
- label: rouge_l(label, r), or no score when consensus abstained;
- members' mean: the mean of rouge_l(a, r) over `A`, which is also the expected score of a member
  picked at random, so a label that does not beat it chose no better than chance;
- oracle: the best member's score, max of rouge_l(a, r): what a perfect selector could have picked.

A summary (per round, and over the whole run) averages the three over the *labelled* prompts only,
so they compare like for like; `beat_mean` counts labelled prompts whose label scored strictly above
the members' mean (a tie, e.g. every member gave the same answer, is not a win).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import fmean

from common.rouge import rouge_l
from schemas.messages import GenerationBatch, PseudoLabels


@dataclass(frozen=True)
class PromptOutcome:
    """What consensus had and decided for one prompt."""

    round_id: int
    prompt_id: str
    label: str | None  # None: consensus abstained
    answers: Mapping[str, str]  # participant -> its answer


@dataclass(frozen=True)
class PromptScore:
    round_id: int
    prompt_id: str
    label: float | None  # None: abstained
    members_mean: float
    oracle: float

    @property
    def beat_mean(self) -> bool:
        return self.label is not None and self.label > self.members_mean


@dataclass(frozen=True)
class QualitySummary:
    """Means over the labelled prompts (None when none was labelled) and the counts behind them."""

    labelled: int
    abstained: int
    label: float | None
    members_mean: float | None
    oracle: float | None
    beat_mean: int

    @property
    def prompts(self) -> int:
        return self.labelled + self.abstained

    def as_dict(self) -> dict[str, float | int | None]:
        """Plain values for a JSON report."""
        return {
            "prompts": self.prompts,
            "labelled": self.labelled,
            "abstained": self.abstained,
            "label": self.label,
            "members_mean": self.members_mean,
            "oracle": self.oracle,
            "beat_mean": self.beat_mean,
        }


@dataclass(frozen=True)
class LabelQuality:
    """Per round and overall (every labelled prompt of every round weighs the same)."""

    rounds: dict[int, QualitySummary]
    overall: QualitySummary
    scores: tuple[PromptScore, ...]
    # (round, prompt) pairs left out: no reference, or no member answered the prompt
    unscored: tuple[tuple[int, str], ...] = field(default=())

    def as_dict(self) -> dict[str, object]:
        """Plain values for a JSON report: summaries by round (keys are strings, as JSON wants) and
        overall, and how many prompts were not scored."""
        return {
            "rounds": {str(round_id): summary.as_dict() for round_id, summary in self.rounds.items()},
            "overall": self.overall.as_dict(),
            "unscored": len(self.unscored),
        }


def score_prompt(outcome: PromptOutcome, reference: str) -> PromptScore:
    """The three scores of one prompt; it needs at least one member's answer."""
    if not outcome.answers:
        raise ValueError(f"round {outcome.round_id} prompt {outcome.prompt_id}: no member answered it")
    members = [rouge_l(answer, reference) for answer in outcome.answers.values()]
    return PromptScore(
        round_id=outcome.round_id,
        prompt_id=outcome.prompt_id,
        label=None if outcome.label is None else rouge_l(outcome.label, reference),
        members_mean=fmean(members),
        oracle=max(members),
    )


def summarise(scores: Sequence[PromptScore]) -> QualitySummary:
    labelled = [s for s in scores if s.label is not None]

    def mean(values: list[float]) -> float | None:
        return fmean(values) if values else None

    return QualitySummary(
        labelled=len(labelled),
        abstained=len(scores) - len(labelled),
        label=mean([s.label for s in labelled if s.label is not None]),
        members_mean=mean([s.members_mean for s in labelled]),
        oracle=mean([s.oracle for s in labelled]),
        beat_mean=sum(1 for s in labelled if s.beat_mean),
    )


def label_quality(outcomes: Iterable[PromptOutcome], references: Mapping[str, str]) -> LabelQuality:
    """Score every outcome that has a reference (prompt id -> reference text) and a member's answer."""
    scores: list[PromptScore] = []
    unscored: list[tuple[int, str]] = []
    for outcome in outcomes:
        reference = references.get(outcome.prompt_id)
        if reference is None or not outcome.answers:
            unscored.append((outcome.round_id, outcome.prompt_id))
            continue
        scores.append(score_prompt(outcome, reference))
    by_round: dict[int, list[PromptScore]] = {}
    for score in scores:
        by_round.setdefault(score.round_id, []).append(score)
    return LabelQuality(
        rounds={round_id: summarise(by_round[round_id]) for round_id in sorted(by_round)},
        overall=summarise(scores),
        scores=tuple(scores),
        unscored=tuple(unscored),
    )


def shard_outcomes(labels: PseudoLabels, batches: Iterable[GenerationBatch]) -> list[PromptOutcome]:
    """One outcome per prompt a shard's PseudoLabels decided (labelled or abstained), with the
    answers of `batches` (the members the shard closed with) to it."""
    answers: dict[str, dict[str, str]] = {}
    for batch in batches:
        for answer in batch.answers:
            answers.setdefault(answer.prompt_id, {})[batch.participant_id] = answer.text
    decided: dict[str, str | None] = {label.prompt_id: label.text for label in labels.labels}
    decided |= {prompt_id: None for prompt_id in labels.abstained}
    return [
        PromptOutcome(labels.round_id, prompt_id, text, answers.get(prompt_id, {}))
        for prompt_id, text in sorted(decided.items())
    ]
