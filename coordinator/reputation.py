"""Reputation: how much a member's answer counts in consensus, from how well it agreed before.

With vote_weighting "reputation", each member's answers are weighted by its mean agreement with the
labels of the rounds before (`RoundClosed.agreement`: its mean similarity to each label), relative
to the most agreeing member, never below `floor`. A member that is often far from the consensus
stops pulling labels towards its answers; one with no history yet counts fully.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from coordinator.consensus import Candidate
from coordinator.settings import ConsensusSettingsTable


def reputation_weights(
    history: Sequence[Mapping[str, float]], members: Iterable[str], floor: float
) -> dict[str, float]:
    """Member -> weight in [floor, 1], from per-round agreement maps (oldest first)."""
    seen: dict[str, list[float]] = {}
    for agreement in history:
        for member, value in agreement.items():
            seen.setdefault(member, []).append(value)
    means = {member: sum(values) / len(values) for member, values in seen.items()}
    best = max(means.values(), default=0.0)
    weights = {}
    for member in members:
        if member not in means or best <= 0.0:
            weights[member] = 1.0
        else:
            weights[member] = min(1.0, max(floor, means[member] / best))
    return weights


def weigh_votes(
    candidates: Mapping[str, Sequence[Candidate]],
    history: Sequence[Mapping[str, float]],
    table: ConsensusSettingsTable,
) -> dict[str, list[Candidate]]:
    """The candidates as consensus should count them under `table.vote_weighting`; `history` holds
    the agreement maps of the rounds before, oldest first."""
    if table.vote_weighting != "reputation" or not history:
        return {prompt_id: list(answers) for prompt_id, answers in candidates.items()}
    members = {c.participant_id for answers in candidates.values() for c in answers}
    return weighted(candidates, reputation_weights(history, members, table.reputation_floor))


def weighted(
    candidates: Mapping[str, Sequence[Candidate]], weights: Mapping[str, float]
) -> dict[str, list[Candidate]]:
    """The candidates with each one's weight multiplied by its member's weight (1 if it has none)."""
    return {
        prompt_id: [replace(c, weight=c.weight * weights.get(c.participant_id, 1.0)) for c in answers]
        for prompt_id, answers in candidates.items()
    }
