"""Evaluation: ROUGE-L against hand-computed values, embedding similarity through an injected embedder."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import pytest

from common.rouge import longest_common_subsequence, rouge_l, words
from participant.data import Example
from participant.evaluation import embedding_similarity, evaluate, score_answers
from participant.models import load_model
from schemas.errors import ChorusError
from schemas.messages import GenerationParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def bag_of_words_embedder(texts: Sequence[str]) -> np.ndarray:
    """A deterministic stand-in for the sentence encoder: hashed word counts, L2-normalised."""
    vectors = np.zeros((len(texts), 64))
    for row, text in enumerate(texts):
        for word in words(text):
            vectors[row, zlib.crc32(word.encode()) % 64] += 1.0
        vectors[row, 63] += 1e-3  # keeps an empty text's vector non-zero
    normalised: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return normalised


def test_words_ignore_case_and_punctuation() -> None:
    assert words("The Cat, the HAT!  ok_1") == ["the", "cat", "the", "hat", "ok_1"]


def test_longest_common_subsequence() -> None:
    assert longest_common_subsequence("abcbdab", "bdcaba") == 4  # the textbook example
    assert longest_common_subsequence([], ["a"]) == 0
    assert longest_common_subsequence(["a", "b"], ["a", "b"]) == 2


@pytest.mark.parametrize(
    ("candidate", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat sat on the mat", 1.0),
        ("The cat sat on the mat.", "the CAT sat on the mat", 1.0),
        # LCS 5, precision 5/5, recall 5/6 -> F1 = 10/11
        ("the cat on the mat", "the cat sat on the mat", 10 / 11),
        # LCS "police the gunman" = 3 of 4 both ways -> 0.75 (the ROUGE paper's example)
        ("police kill the gunman", "police killed the gunman", 0.75),
        # LCS "the gunman" = 2: precision 2/4, recall 2/4 -> 0.5 (order matters, unlike bag of words)
        ("the gunman kill police", "police killed the gunman", 0.5),
        ("apples", "oranges", 0.0),
        ("", "something", 0.0),
        ("...", "", 0.0),
    ],
)
def test_rouge_l_known_values(candidate: str, reference: str, expected: float) -> None:
    assert rouge_l(candidate, reference) == pytest.approx(expected)


def test_embedding_similarity_is_the_mean_row_cosine() -> None:
    assert embedding_similarity(["a b", "c d"], ["a b", "c d"], bag_of_words_embedder) == pytest.approx(1.0)
    unrelated = embedding_similarity(["alpha"], ["omega"], bag_of_words_embedder)
    assert unrelated < 0.1
    mixed = embedding_similarity(["a b", "alpha"], ["a b", "omega"], bag_of_words_embedder)
    assert mixed == pytest.approx((1.0 + unrelated) / 2)
    with pytest.raises(ChorusError):
        embedding_similarity(["a"], [], bag_of_words_embedder)


def test_score_answers_reports_every_metric() -> None:
    scores = score_answers(["the cat sat", "no"], ["the cat sat", "yes"], bag_of_words_embedder)
    assert scores["rouge_l"] == pytest.approx(0.5)
    assert scores["n"] == 2.0
    assert 0.0 < scores["embedding_similarity"] < 1.0


def test_evaluate_generates_and_scores() -> None:
    lm = load_model("tiny-gpt2")
    test = [Example("Say hi", "hi"), Example("Say bye", "bye"), Example("Count", "one two")]
    scores = evaluate(lm, test, GenerationParams(max_new_tokens=4), bag_of_words_embedder)
    assert set(scores) == {"rouge_l", "embedding_similarity", "n"}
    assert scores["n"] == 3.0
    assert 0.0 <= scores["rouge_l"] <= 1.0
    with pytest.raises(ChorusError, match="at least one"):
        evaluate(lm, [], GenerationParams(), bag_of_words_embedder)
