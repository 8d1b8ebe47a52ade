"""Label rules by name: a settings file's `label_choice` names one, the live coordinator and
`chorus-replay` build consensus with it, and the adversarial harness runs every one registered here.

A new rule is one module in this package and one line below.
"""

from __future__ import annotations

from coordinator.label_rules.base import Choice, LabelRule, PromptAnswers
from coordinator.label_rules.medoid import MedoidRule
from coordinator.label_rules.verbatim import VerbatimRule

LABEL_RULES: dict[str, LabelRule] = {
    "medoid": MedoidRule(),
    "verbatim": VerbatimRule(),
}

__all__ = ["LABEL_RULES", "Choice", "LabelRule", "PromptAnswers"]
