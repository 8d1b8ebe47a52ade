"""The answer its writer was surest of, by self-certainty (arXiv 2502.18581) z-scored per member, or by
the log-probability it reports (the removed "surest", kept as a comparison). Both read a number the
writer chooses: tournament-only (DESIGN.md §4)."""

from __future__ import annotations

from dataclasses import dataclass

from bench.labels.rules.base import Choices, Stage, per_member_z


@dataclass(frozen=True)
class Surest:
    signal: str = "self_certainty"  # or "logprob"

    def choose(self, stage: Stage) -> Choices:
        z = per_member_z(stage, self.signal)
        return {r.prompt_id: max(r.members, key=lambda m: z[m][r.prompt_id]) for r in stage.records}
