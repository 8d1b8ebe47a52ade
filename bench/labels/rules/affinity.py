"""Affinity routing: the answer of the member that clearly leads in affinity to the prompt.

Affinity (a member's closeness of the prompt to its private prompts) is z-scored per member across the
round's prompts, so claiming expertise everywhere wins nothing; when the leader's z-score is at least
`margin` above every other member's, its answer is the label, even where it disagrees with the medoid;
otherwise the shipped medoid decides.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.labels.rules.base import Choices, Stage, per_member_z


@dataclass(frozen=True)
class AffinityRouting:
    margin: float = 1.0

    def choose(self, stage: Stage) -> Choices:
        z = per_member_z(stage, "affinity")
        medoid = stage.shipped["medoid"]
        choices: Choices = {}
        for record in stage.records:
            ranked = sorted(record.members, key=lambda m: -z[m][record.prompt_id])
            lead = z[ranked[0]][record.prompt_id] - z[ranked[1]][record.prompt_id] if len(ranked) > 1 else 0.0
            choices[record.prompt_id] = ranked[0] if lead >= self.margin else medoid[record.prompt_id]
        return choices
