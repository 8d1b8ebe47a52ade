"""The label-rule registry: a rule registered in one line is what settings, consensus and replay use."""

from __future__ import annotations

import pytest
from support.geometry import block_gram, table_of

from coordinator.consensus import Candidate, ConsensusError, ConsensusSettings, ExactConsensus, HnswConsensus
from coordinator.label_rules import LABEL_RULES, Choice, PromptAnswers
from coordinator.replay.consensus import ConsensusOverrides, replay_settings
from coordinator.replay.log import ReplayError
from coordinator.settings import CoordinatorSettings


class LoneAnswer:
    """A toy rule: the answer that agrees with no other (the one the medoid would never pick)."""

    def choose(self, prompt: PromptAnswers, settings: ConsensusSettings) -> Choice:
        lonely = [a for a in range(len(prompt.texts)) if prompt.closest[a] < settings.support_similarity]
        return Choice(lonely[0]) if lonely else Choice(None, "everyone agrees with someone")


@pytest.fixture
def lone(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(LABEL_RULES, "lone", LoneAnswer())  # the one line a new rule adds
    return "lone"


def test_an_unregistered_rule_is_refused_with_the_registered_names() -> None:
    with pytest.raises(
        ConsensusError, match=r"label_choice must be one of \['medoid', 'verbatim'\], got 'lone'"
    ):
        ConsensusSettings(label_choice="lone")


def test_surest_is_refused_with_why_it_was_removed() -> None:
    with pytest.raises(ConsensusError, match="was removed: a member's reported log-probability"):
        ConsensusSettings(label_choice="surest")


@pytest.mark.parametrize("search", [ExactConsensus, HnswConsensus])
def test_a_registered_rule_is_accepted_and_decides(lone: str, search: type[ExactConsensus]) -> None:
    texts = ["a1", "a2", "a3", "b"]  # three agreeing answers and one alone
    embedder = table_of(texts, block_gram([3, 1], within=0.9, between=0.5))
    answers = {"q": [Candidate(f"p{i}", text) for i, text in enumerate(texts)]}
    medoid = search(embedder, ConsensusSettings()).decide(answers).decisions[0]
    chosen = search(embedder, ConsensusSettings(label_choice=lone, min_confidence=0.0)).decide(answers)
    assert medoid.label in {"a1", "a2", "a3"}
    assert (chosen.decisions[0].label, chosen.decisions[0].source) == ("b", "p3")
    # consensus, not the rule, reports the label's confidence: its mean similarity to the others
    assert chosen.decisions[0].confidence == pytest.approx(0.5)


def test_a_registered_rule_abstains_with_its_reason(lone: str) -> None:
    embedder = table_of(["a1", "a2"], block_gram([2], within=0.9, between=0.0))
    answers = {"q": [Candidate("p0", "a1"), Candidate("p1", "a2")]}
    decision = ExactConsensus(embedder, ConsensusSettings(label_choice=lone)).decide(answers).decisions[0]
    assert (decision.label, decision.abstain_reason) == (None, "everyone agrees with someone")


def test_replay_takes_a_registered_rule_and_refuses_others(lone: str) -> None:
    recorded = CoordinatorSettings(prompts_path="prompts.jsonl")
    assert replay_settings(recorded, ConsensusOverrides(label_choice=lone)).consensus.label_choice == lone
    assert replay_settings(recorded, ConsensusOverrides()).consensus.label_choice == "medoid"
    with pytest.raises(ReplayError, match="must be one of"):
        replay_settings(recorded, ConsensusOverrides(label_choice="nobody"))


@pytest.mark.parametrize("search", [ExactConsensus, HnswConsensus])
def test_verbatim_labels_only_a_text_a_strict_majority_wrote_word_for_word(
    search: type[ExactConsensus],
) -> None:
    texts = ["x", "x", "x.", "y"]  # "x." is as close to "x" as can be, but not the same words
    embedder = table_of(texts, block_gram([3, 1], within=0.99, between=0.1))
    settings = ConsensusSettings(label_choice="verbatim", min_confidence=0.0)
    split = {"q": [Candidate(f"p{i}", text) for i, text in enumerate(texts)]}
    [decision] = search(embedder, settings).decide(split).decisions
    assert decision.label is None and "word for word" in decision.abstain_reason
    assert (
        search(embedder, ConsensusSettings(min_confidence=0.0)).decide(split).decisions[0].label is not None
    )
    held = {"q": [Candidate(f"p{i}", text) for i, text in enumerate(["x", "x", "x", "y"])]}
    [decision] = (
        search(table_of(["x", "y"], block_gram([1, 1], within=1.0, between=0.1)), settings)
        .decide(held)
        .decisions
    )
    assert (decision.label, decision.source) == ("x", "p0")
