"""Scoring label rules on a corpus: label ROUGE-L, the share of the members'-mean-to-oracle gap closed,
and how often the rule chose the expert's answer; written as JSON and Markdown."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import fmean

from bench.labels.corpus import PromptRecord, read_corpus, stages
from bench.labels.rules import CANDIDATE_RULES, Choices, Stage
from common.embedding import Embedder
from common.rouge import rouge_l
from coordinator.consensus import Candidate, ConsensusSettings, ExactConsensus
from coordinator.label_rules import LABEL_RULES


@dataclass(frozen=True)
class RuleScore:
    """One rule on one stage of one corpus. Means are over the prompts the rule labelled."""

    corpus: str
    stage: str
    rule: str
    prompts: int
    labelled: int
    label: float  # mean ROUGE-L F1 of the labels against the references
    members_mean: float  # mean ROUGE-L of every member's answer (a random member's expected score)
    oracle: float  # mean ROUGE-L of each prompt's best member answer
    gap_closed: float | None  # (label - members' mean) / (oracle - members' mean); None: no gap
    expert_prompts: int  # labelled prompts that have an expert
    chose_expert: float | None  # share of those whose label is the expert's answer


Chosen = tuple[PromptRecord, str | None]  # a prompt and the member whose answer is its label (None: none)


def score_choices(corpus: str, rule: str, records: Sequence[PromptRecord], choices: Choices) -> RuleScore:
    """The scores of `choices` (prompt id -> member, None: abstain) on the records of one stage."""
    stage = records[0].stage if records else ""
    return score_chosen(corpus, stage, rule, [(r, choices.get(r.prompt_id)) for r in records])


def score_chosen(corpus: str, stage: str, rule: str, chosen: Sequence[Chosen]) -> RuleScore:
    """The scores of a rule's choices, pooled over whatever prompts `chosen` holds."""
    label, mean, best = [], [], []
    expert_hits: list[bool] = []
    for record, member in chosen:
        if member is None:
            continue
        text = record.answers[member].text
        scores = [rouge_l(a.text, record.reference) for a in record.answers.values()]
        label.append(rouge_l(text, record.reference))
        mean.append(fmean(scores))
        best.append(max(scores))
        if record.expert in record.answers:
            expert_hits.append(text == record.answers[record.expert].text)  # the same text counts
    label_mean, members_mean, oracle = (fmean(v) if v else 0.0 for v in (label, mean, best))
    gap = oracle - members_mean
    return RuleScore(
        corpus=corpus,
        stage=stage,
        rule=rule,
        prompts=len(chosen),
        labelled=len(label),
        label=label_mean,
        members_mean=members_mean,
        oracle=oracle,
        gap_closed=(label_mean - members_mean) / gap if gap > 0 else None,
        expert_prompts=len(expert_hits),
        chose_expert=fmean(expert_hits) if expert_hits else None,
    )


def shipped_choices(records: Sequence[PromptRecord], rule: str, embedder: Embedder) -> Choices:
    """What the live coordinator's consensus with label rule `rule` chooses in a first round (no
    reputation yet): every member's answer counts once, the stage's prompts as one shard."""
    answers = {r.prompt_id: [Candidate(m, r.answers[m].text) for m in r.members] for r in records}
    result = ExactConsensus(embedder, ConsensusSettings(label_choice=rule)).decide(answers)
    return {d.prompt_id: d.source for d in result.decisions}


def choose_stage(
    records: Sequence[PromptRecord], rules: Sequence[str], embedder: Embedder
) -> dict[str, Choices]:
    """Rule -> its choices on one stage of one corpus (a candidate's normalizations span the stage)."""
    shipped = {name: shipped_choices(records, name, embedder) for name in LABEL_RULES}
    stage = Stage(records, shipped)
    return {name: shipped[name] if name in shipped else CANDIDATE_RULES[name].choose(stage) for name in rules}


def score_stage(
    corpus: str, records: Sequence[PromptRecord], rules: Sequence[str], embedder: Embedder
) -> list[RuleScore]:
    choices = choose_stage(records, rules, embedder)
    return [score_choices(corpus, name, records, choices[name]) for name in rules]


def all_rules() -> list[str]:
    return [*LABEL_RULES, *CANDIDATE_RULES]


POOLED = "all"  # the corpus name of the rows pooled over every corpus


def score_corpora(paths: Sequence[Path], rules: Sequence[str], embedder: Embedder) -> list[RuleScore]:
    """Each rule on each stage of each corpus, then on each stage pooled over the corpora."""
    unknown = sorted(set(rules) - set(all_rules()))
    if unknown:
        raise ValueError(f"unknown rules {unknown}; choose from {all_rules()}")
    scores = []
    pooled: dict[tuple[str, str], list[Chosen]] = {}
    for path in paths:
        records = read_corpus(path)
        for stage in stages(records):
            chosen = [r for r in records if r.stage == stage]
            choices = choose_stage(chosen, rules, embedder)
            for name in rules:
                scores.append(score_choices(path.stem, name, chosen, choices[name]))
                pooled.setdefault((stage, name), []).extend(
                    (r, choices[name].get(r.prompt_id)) for r in chosen
                )
    if len(paths) > 1:
        scores += [score_chosen(POOLED, stage, name, rows) for (stage, name), rows in pooled.items()]
    return scores


def markdown(scores: Sequence[RuleScore]) -> str:
    lines = [
        "| corpus | stage | rule | labelled | label ROUGE-L | members' mean | oracle | gap closed "
        "| chose expert |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in scores:
        gap = "–" if s.gap_closed is None else f"{s.gap_closed:+.0%}"
        expert = "–" if s.chose_expert is None else f"{s.chose_expert:.0%} of {s.expert_prompts}"
        lines.append(
            f"| {s.corpus} | {s.stage} | {s.rule} | {s.labelled}/{s.prompts} | {s.label:.3f} | "
            f"{s.members_mean:.3f} | {s.oracle:.3f} | {gap} | {expert} |"
        )
    return "\n".join(lines) + "\n"


def write_report(scores: Sequence[RuleScore], out: Path, sources: Mapping[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "labels.json").write_text(
        json.dumps({"corpora": dict(sources), "scores": [asdict(s) for s in scores]}, indent=2) + "\n"
    )
    header = (
        "# Label rules on the recorded corpora\n\n"
        "`python -m bench.labels score` (bench/labels/): every rule on every corpus in bench/labels/corpus/. "
        "Means over the prompts a rule labelled; gap closed = (label − members' mean) / (oracle − members' "
        "mean); chose expert = labels that are the expert's answer, of the labelled prompts that have "
        "one.\n\n"
    )
    (out / "labels.md").write_text(header + markdown(scores))


def run_score(paths: Sequence[Path], rules: Sequence[str] | None, out: Path) -> int:
    from common.embedding import SentenceEmbedder  # the task's embedder (bench/quality.toml: minilm)

    if not paths:
        print("no corpus: run `python -m bench.labels record` first")
        return 1
    scores = score_corpora(paths, rules or all_rules(), SentenceEmbedder())
    write_report(scores, out, {p.stem: str(p) for p in paths})
    print(markdown(scores), end="")
    return 0
