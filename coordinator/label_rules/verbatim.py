"""The verbatim rule: the text that more than `min_support_share` of a prompt's answers give word for word."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from coordinator.label_rules.base import Choice, PromptAnswers

if TYPE_CHECKING:
    from coordinator.consensus import ConsensusSettings


class VerbatimRule:
    """A label only where a strict majority (more than `min_support_share` of the prompt's answers, blank
    ones counted) wrote the same text: the baseline that needs no embedding to be right, as the
    `majority` strategy is for whole rounds. Neighbours, weights and reported numbers are not read, so
    neither a low weight nor a claimed log-probability can move it; answers of the winning text are
    credited in consensus's canonical order, as the medoid rule credits answers of one text."""

    def choose(self, prompt: PromptAnswers, settings: ConsensusSettings) -> Choice:
        counts = np.bincount(prompt.text_of)
        needed = settings.min_support_share * prompt.answers_total
        winners = np.flatnonzero(counts > needed)
        if len(winners) != 1:  # none, or (below a half share) two texts both past it: no majority
            return Choice(
                None,
                f"no text is given word for word by more than {settings.min_support_share:g} of the "
                f"prompt's {prompt.answers_total} answers",
            )
        text = int(winners[0])
        return Choice(int(np.flatnonzero(prompt.text_of == text)[0]))
