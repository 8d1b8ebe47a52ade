"""How much a pseudo-label counts in training under each label weighting, on hand-worked cases."""

from __future__ import annotations

import pytest

from participant.label_weights import label_example_weight


def test_uniform_and_confidence_weighting() -> None:
    assert label_example_weight("uniform", 0.5, 0.2, "x", "y") == 0.5
    assert label_example_weight("confidence", 0.5, 0.8, "x", "y") == pytest.approx(0.4)
    assert label_example_weight("confidence", 0.5, -0.3, "x", "y") == 0.0  # never negative


def test_disagreement_weighting_counts_a_label_by_how_far_our_own_answer_was() -> None:
    # Our own answer is the label: it teaches nothing.
    assert label_example_weight("disagreement", 1.0, 0.9, "the cat sat", "the cat sat") == 0.0
    # Nothing in common: the label counts as under "confidence".
    assert label_example_weight("disagreement", 1.0, 0.9, "the cat sat", "dogs bark") == pytest.approx(0.9)
    # "the cat" is the longest common subsequence of 3 words each: ROUGE-L 2/3, so a third remains.
    assert label_example_weight("disagreement", 0.5, 0.9, "the cat ran", "the cat sat") == pytest.approx(
        0.5 * 0.9 / 3
    )
    # A prompt we did not answer: as "confidence".
    assert label_example_weight("disagreement", 0.5, 0.8, "the cat sat", None) == pytest.approx(0.4)
