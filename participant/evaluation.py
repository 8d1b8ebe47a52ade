"""Answer quality against references: ROUGE-L F1 over words (`common.rouge`) and mean embedding cosine
similarity. Scoring imports no torch (black boxes score their answers too); `evaluate` a local model does.

The embedder is passed in (any callable returning L2-normalised rows, e.g. the coordinator's
`SentenceEmbedder`), so a participant scores answers in the same space the consensus is built in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from common.rouge import rouge_l
from participant.data import Example
from schemas.errors import ChorusError
from schemas.messages import GenerationParams

if TYPE_CHECKING:
    from participant.models import LocalModel

Embedder = Callable[[Sequence[str]], np.ndarray]


class EvaluationError(ChorusError):
    """Answers could not be scored: none to score, or the embedder's rows do not match them."""


def embedding_similarity(answers: Sequence[str], references: Sequence[str], embed: Embedder) -> float:
    """Mean cosine similarity of each answer with its reference, embedded in one call."""
    if len(answers) != len(references):
        raise EvaluationError(f"{len(answers)} answers for {len(references)} references")
    if not answers:
        raise EvaluationError("embedding_similarity needs at least one answer")
    vectors = np.asarray(embed([*answers, *references]), dtype=np.float64)
    if vectors.shape[0] != 2 * len(answers):
        raise EvaluationError(f"the embedder returned {vectors.shape[0]} rows for {2 * len(answers)} texts")
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
    from participant.generation import generate_answers  # torch: only a local model evaluates this way

    if not test_examples:
        raise EvaluationError("evaluate needs at least one test example")
    prompts = [(str(i), example.prompt) for i, example in enumerate(test_examples)]
    answers = generate_answers(lm, prompts, params, batch_size=batch_size)
    return score_answers([a.text for a in answers], [e.response for e in test_examples], embed)
