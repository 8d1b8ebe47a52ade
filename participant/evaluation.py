"""Answer quality against references: ROUGE-L F1 over words and mean embedding cosine similarity.

The embedder is passed in (any callable returning L2-normalised rows, e.g. the coordinator's
`SentenceEmbedder`), so a participant scores answers in the same space the consensus is built in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from participant.data import Example
from participant.generation import generate_answers
from participant.models import LocalModel, ModelError
from schemas.messages import GenerationParams

Embedder = Callable[[Sequence[str]], np.ndarray]

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


def embedding_similarity(answers: Sequence[str], references: Sequence[str], embed: Embedder) -> float:
    """Mean cosine similarity of each answer with its reference, embedded in one call."""
    if len(answers) != len(references):
        raise ModelError(f"{len(answers)} answers for {len(references)} references")
    if not answers:
        raise ModelError("embedding_similarity needs at least one answer")
    vectors = np.asarray(embed([*answers, *references]), dtype=np.float64)
    if vectors.shape[0] != 2 * len(answers):
        raise ModelError(f"the embedder returned {vectors.shape[0]} rows for {2 * len(answers)} texts")
    return float(np.mean(np.sum(vectors[: len(answers)] * vectors[len(answers) :], axis=1)))


def score_answers(answers: Sequence[str], references: Sequence[str], embed: Embedder) -> dict[str, float]:
    """The metrics every learner reports: `rouge_l`, `embedding_similarity` (means) and `n`."""
    rouge = [rouge_l(answer, reference) for answer, reference in zip(answers, references, strict=True)]
    return {
        "rouge_l": float(np.mean(rouge)) if rouge else 0.0,
        "embedding_similarity": embedding_similarity(answers, references, embed),
        "n": float(len(answers)),
    }


def evaluate(
    lm: LocalModel,
    test_examples: Sequence[Example],
    params: GenerationParams,
    embed: Embedder,
    batch_size: int = 16,
) -> dict[str, float]:
    """Generate an answer for each test prompt and score it against the example's response."""
    if not test_examples:
        raise ModelError("evaluate needs at least one test example")
    prompts = [(str(i), example.prompt) for i, example in enumerate(test_examples)]
    answers = generate_answers(lm, prompts, params, batch_size=batch_size)
    return score_answers([a.text for a in answers], [e.response for e in test_examples], embed)
