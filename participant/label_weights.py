"""How much each pseudo-label counts in training, against a private example (weight 1).

- "uniform": every label `label_weight`;
- "confidence": `label_weight` times the label's confidence (never below 0);
- "disagreement": that, times how far this participant's own answer to the prompt was from the
  label (1 - ROUGE-L F1 of the two): a label that is already what the participant said teaches it
  nothing and is skipped (weight 0), one it disagreed with counts most. Without an own answer (a
  prompt it did not answer), as "confidence".
"""

from __future__ import annotations

from typing import Literal

from common.rouge import rouge_l

LabelWeighting = Literal["uniform", "confidence", "disagreement"]


def label_example_weight(
    weighting: LabelWeighting, label_weight: float, confidence: float, label: str, own_answer: str | None
) -> float:
    if weighting == "uniform":
        return label_weight
    weight = label_weight * max(0.0, confidence)
    if weighting == "disagreement" and own_answer is not None:
        weight *= 1.0 - rouge_l(own_answer, label)
    return weight
