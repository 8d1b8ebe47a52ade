"""The medoid rule: the densest answer that is no outlier and that a strict majority agrees with."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from coordinator.label_rules.base import Choice, PromptAnswers

if TYPE_CHECKING:
    from coordinator.consensus import ConsensusSettings


class MedoidRule:
    """The densest answer that is no outlier and that more than `min_support_share` of the prompt's
    answers agree with (within `support_similarity`); no label when there is none, or when answers
    that disagree tie exactly. A tie between answers that agree goes to the lower hash of the text,
    never to a participant id. Reported numbers (`Answer.logprob`) are not read."""

    def choose(self, prompt: PromptAnswers, settings: ConsensusSettings) -> Choice:
        density = prompt.density
        allowed = np.flatnonzero(prompt.closest >= settings.outlier_similarity)
        if not len(allowed):
            return Choice(None, "every answer is an outlier: no two answers agree")
        needed = settings.min_support_share * prompt.answers_total  # blank answers agree with nothing
        backed: dict[int, bool] = {}  # per distinct text
        tied: list[int] = []
        for answer in sorted(allowed.tolist(), key=lambda a: -density[a]):  # stable: canonical order
            if tied and density[answer] < density[tied[0]]:
                break
            text = int(prompt.text_of[answer])
            if text not in backed:
                to_text = prompt.similarities_to_text(text)
                backed[text] = int(np.count_nonzero(to_text >= settings.support_similarity)) > needed
            if backed[text]:
                tied.append(answer)
        if not tied:
            return Choice(
                None,
                f"no answer is agreed with by more than {settings.min_support_share:g} of the prompt's "
                f"{prompt.answers_total} answers (support_similarity {settings.support_similarity})",
            )
        texts = sorted({int(prompt.text_of[a]) for a in tied})
        if len(texts) > 1:
            if (prompt.text_similarities(texts) < settings.support_similarity).any():
                return Choice(None, "answers that disagree tie exactly: no majority between them")
            return Choice(min(tied, key=lambda a: _text_hash(prompt.texts[a])))
        return Choice(tied[0])


def _text_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
