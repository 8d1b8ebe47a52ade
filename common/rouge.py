"""ROUGE-L F1 over words: the answer-quality score shared by the participant's evaluation and the
coordinator's offline label-quality report, so both sides measure the same thing."""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lowercased runs of letters, digits and underscores; punctuation and spacing do not count."""
    return _WORD.findall(text.lower())


def longest_common_subsequence(a: Sequence[str], b: Sequence[str]) -> int:
    # One rolling row of the classic table: O(len(a) * len(b)) time, O(len(b)) memory.
    previous = [0] * (len(b) + 1)
    for item in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if item == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1: harmonic mean of LCS/len(candidate) and LCS/len(reference); 0.0 if either has no words."""
    candidate_words, reference_words = words(candidate), words(reference)
    if not candidate_words or not reference_words:
        return 0.0
    common = longest_common_subsequence(candidate_words, reference_words)
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate_words), common / len(reference_words)
    return 2 * precision * recall / (precision + recall)
