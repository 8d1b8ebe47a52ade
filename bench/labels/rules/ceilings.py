"""Ceilings no rule can reach on the wire: they read the references or the task's family split."""

from __future__ import annotations

from bench.labels.rules.base import Choices, Stage
from common.rouge import rouge_l


class Oracle:
    """Each prompt's best member answer by ROUGE-L against its reference (first member on ties)."""

    def choose(self, stage: Stage) -> Choices:
        return {
            r.prompt_id: max(
                r.members, key=lambda m: (rouge_l(r.answers[m].text, r.reference), -r.members.index(m))
            )
            for r in stage.records
        }


class Expert:
    """The expert's answer (the member whose home family the prompt's callable belongs to), else the
    shipped medoid's choice."""

    def choose(self, stage: Stage) -> Choices:
        medoid = stage.shipped["medoid"]
        return {
            r.prompt_id: r.expert if r.expert in r.answers else medoid[r.prompt_id] for r in stage.records
        }
