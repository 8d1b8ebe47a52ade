"""Candidate label rules of the tournament, not shipped: each reads signals that are not on the wire
(affinity, cross-scores) or must not decide there (reported certainty), or the references (ceilings).
A candidate is one module here and one line below; `bench.labels.score` runs these beside every rule of
coordinator.label_rules.
"""

from __future__ import annotations

from bench.labels.rules.affinity import AffinityRouting
from bench.labels.rules.base import CandidateRule, Choices, Stage
from bench.labels.rules.ceilings import Expert, Oracle
from bench.labels.rules.certainty import Surest
from bench.labels.rules.chance import RandomMember
from bench.labels.rules.cross_scoring import CrossScoring

CANDIDATE_RULES: dict[str, CandidateRule] = {
    "random": RandomMember(),
    "oracle": Oracle(),
    "expert": Expert(),
    "affinity": AffinityRouting(),
    "cross_affinity": CrossScoring(),
    "self_certainty": Surest("self_certainty"),
    "logprob": Surest("logprob"),
}

__all__ = ["CANDIDATE_RULES", "CandidateRule", "Choices", "Stage"]
