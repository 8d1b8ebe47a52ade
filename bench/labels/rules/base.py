"""What a tournament rule sees (one stage of a corpus: the prompts of one round) and what it returns."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import fmean, pstdev
from typing import Protocol

from bench.labels.corpus import PromptRecord

Choices = dict[str, str | None]  # prompt id -> the member whose answer is the label (None: abstain)


@dataclass(frozen=True)
class Stage:
    """One stage of one corpus, and what the shipped rules chose on it (a candidate may fall back on
    them)."""

    records: Sequence[PromptRecord]
    shipped: Mapping[str, Choices]


class CandidateRule(Protocol):
    def choose(self, stage: Stage) -> Choices: ...


def zscores(values: Mapping[str, float]) -> dict[str, float]:
    """Each value's distance from their mean in standard deviations (all 0 when they do not vary)."""
    mean, spread = fmean(values.values()), pstdev(values.values())
    if not math.isfinite(spread) or spread == 0.0:
        return dict.fromkeys(values, 0.0)
    return {key: (value - mean) / spread for key, value in values.items()}


def per_member_z(stage: Stage, signal: str) -> dict[str, dict[str, float]]:
    """Member -> prompt -> the member's `signal` z-scored across the stage's prompts: normalized per
    member, so that a member claiming a high value everywhere stands out nowhere."""
    members = sorted({m for r in stage.records for m in r.answers})
    result = {}
    for member in members:
        values = {
            r.prompt_id: getattr(r.answers[member], signal) for r in stage.records if member in r.answers
        }
        known = [float(v) for v in values.values() if v is not None]
        floor = min(known, default=0.0)  # no value (an empty answer reports no log-probability): the lowest
        result[member] = zscores({p: floor if v is None else float(v) for p, v in values.items()})
    return result
