"""What a label rule sees of one prompt, and the protocol every rule implements.

Consensus (coordinator.consensus) embeds the shard's answers, finds each answer's neighbours and scores
its density; a label rule then picks, per prompt, which answer (if any) becomes the label. A rule only
chooses: the confidence, support and `min_confidence` abstention around its choice are consensus's,
the same for every rule. A rule is one module in this package and one line in its `__init__`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from coordinator.consensus import ConsensusSettings

FloatArray = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.intp]


@dataclass(frozen=True)
class PromptAnswers:
    """One prompt's non-blank answers, in consensus's canonical order (participant, text, weight).

    Per answer: who wrote it, its text, its weight, its density (already scaled by its own weight),
    its closest similarity to another answer of the prompt, and the index of its distinct text.
    Similarities come from consensus's one arithmetic (float64, rounded to 1e-9), so that every rule
    and both neighbour searches see the same numbers.
    """

    prompt_id: str
    participants: tuple[str, ...]
    texts: tuple[str, ...]
    weights: FloatArray
    density: FloatArray
    closest: FloatArray
    text_of: IndexArray
    answers_total: int  # the prompt's answers, blank ones included: each member counts once
    similarities_to_text: Callable[[int], FloatArray]  # distinct text -> every answer's similarity to it
    text_similarities: Callable[[Sequence[int]], FloatArray]  # distinct texts -> their pairwise matrix


@dataclass(frozen=True)
class Choice:
    """The answer (an index into `PromptAnswers`) that becomes the label, or None and why not."""

    answer: int | None
    reason: str = ""


class LabelRule(Protocol):
    """Picks one prompt's label among its answers. Rules every rule keeps (DESIGN.md §4, checked for
    every registered rule by tests/test_label_rules_adversarial.py): a weight below 1 only lowers an
    answer's chance; a number a member reports never makes its answer beat members that did not report
    it; an exact tie between answers that disagree abstains rather than favouring an id."""

    def choose(self, prompt: PromptAnswers, settings: ConsensusSettings) -> Choice: ...
