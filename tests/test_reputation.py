"""Reputation weighting of votes: weights from past agreement, and a label it changes."""

from __future__ import annotations

import pytest

from common.embedding import HashingEmbedder
from coordinator.consensus import Candidate, ConsensusSettings, ExactConsensus
from coordinator.reputation import reputation_weights, weigh_votes
from coordinator.settings import ConsensusSettingsTable


def test_weights_are_mean_agreement_relative_to_the_best_member_with_a_floor() -> None:
    history = [{"a": 0.8, "b": 0.2, "e": 0.01}, {"a": 0.6, "b": 0.4, "c": 0.5}]
    weights = reputation_weights(history, ["a", "b", "c", "d", "e"], floor=0.1)
    # means: a 0.7, b 0.3, c 0.5, e 0.01; d has no history and counts fully
    assert weights == pytest.approx({"a": 1.0, "b": 0.3 / 0.7, "c": 0.5 / 0.7, "d": 1.0, "e": 0.1})


def test_without_any_positive_agreement_everyone_counts_fully() -> None:
    assert reputation_weights([{"a": -0.2, "b": 0.0}], ["a", "b"], floor=0.1) == {"a": 1.0, "b": 1.0}


GOOD = ["Paris is the capital of France.", "The capital of France is Paris."]
JUNK = "zebras juggle quantum xylophones"


def label_of(candidates: dict[str, list[Candidate]], min_support_share: float = 0.0) -> str | None:
    settings = ConsensusSettings(min_confidence=0.0, min_support_share=min_support_share)
    (decision,) = ExactConsensus(HashingEmbedder(), settings).decide(candidates).decisions
    return decision.label


def test_members_that_were_often_far_from_the_labels_stop_pulling_the_label_to_their_answer() -> None:
    # Three members answer the same junk, two answer alike and right: by density alone the junk wins.
    answers = {"q": [Candidate("g1", GOOD[0]), Candidate("g2", GOOD[1])]}
    answers["q"] += [Candidate(j, JUNK) for j in ("j1", "j2", "j3")]
    assert label_of(answers) == JUNK
    # The junk answerers agreed little with past labels: weight 0.1 / 0.9 each, the others 1.
    history = [{"g1": 0.9, "g2": 0.85, "j1": 0.1, "j2": 0.1, "j3": 0.1}]
    uniform = weigh_votes(answers, history, ConsensusSettingsTable(vote_weighting="uniform"))
    assert label_of(uniform) == JUNK  # "uniform" counts every vote the same
    assert ConsensusSettingsTable().vote_weighting == "reputation"  # the default since the quality grid
    table = ConsensusSettingsTable(vote_weighting="reputation", reputation_floor=0.05)
    reputed = weigh_votes(answers, history, table)
    assert [round(c.weight, 3) for c in reputed["q"]] == [1.0, 0.944, 0.111, 0.111, 0.111]
    assert label_of(reputed) in GOOD
    # Under the default majority rule, weights order the answers a strict majority agrees with and
    # never make or unmake a majority: three of five members are one, whatever their reputation (so a
    # bloc cannot lower the others' weights into a minority either).
    assert label_of(reputed, min_support_share=0.5) == JUNK
