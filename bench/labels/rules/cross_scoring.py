"""Cross-scoring weighted by affinity (after arXiv 2510.02377): members score each other's answers.

Each member's teacher-forced mean log-probability of the others' answers is z-scored per scorer across
everything it scored (its own answers excluded), so a scorer that finds everything likely counts no more
than one that does not. An answer's score is the affinity-weighted mean of the other members' z-scores,
a scorer's weight being the softmax over scorers of its affinity z-score on the prompt (more say to the
member closest to the prompt). The best-scored answer is the label.
"""

from __future__ import annotations

import math

from bench.labels.corpus import PromptRecord
from bench.labels.rules.base import Choices, Stage, per_member_z, zscores


class CrossScoring:
    def choose(self, stage: Stage) -> Choices:
        affinity = per_member_z(stage, "affinity")
        scored = _scorer_z(stage)
        return {
            r.prompt_id: max(r.members, key=lambda m: _support(r, m, affinity, scored)) for r in stage.records
        }


def _support(
    record: PromptRecord,
    writer: str,
    affinity: dict[str, dict[str, float]],
    scored: dict[str, dict[tuple[str, str], float]],
) -> float:
    """The other members' z-scored log-probabilities of `writer`'s answer, weighted by their affinity."""
    scorers = [m for m in record.members if m != writer]
    weights = [math.exp(affinity[m][record.prompt_id]) for m in scorers]
    values = [scored[m][(record.prompt_id, writer)] for m in scorers]
    return sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)


def _scorer_z(stage: Stage) -> dict[str, dict[tuple[str, str], float]]:
    """Scorer -> (prompt, writer) -> the scorer's log-probability of that answer, z-scored per scorer."""
    raw: dict[str, dict[tuple[str, str], float]] = {}
    for record in stage.records:
        for writer, answer in record.answers.items():
            for scorer, value in answer.scored_by.items():
                if scorer != writer:
                    raw.setdefault(scorer, {})[(record.prompt_id, writer)] = value
    normalized: dict[str, dict[tuple[str, str], float]] = {}
    for scorer, values in raw.items():
        keys = list(values)
        z = zscores({str(i): values[key] for i, key in enumerate(keys)})
        normalized[scorer] = {key: z[str(i)] for i, key in enumerate(keys)}
    return normalized
