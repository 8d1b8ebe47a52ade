"""What `chorus-data check` reports about data files: format, a sample, counts, lengths, duplicates,
and the prompts that private, test and public files share.

Reading is `participant.data`'s (what a participant accepts, this accepts) and, for public prompts,
`coordinator.prompts`' (what a coordinator accepts). Prompts are compared ignoring case and spacing.
"""

from __future__ import annotations

import functools
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from coordinator.prompts import load_prompts
from participant.data import DataFile, DataFormat, Example, read_data_file
from schemas.errors import ChorusError

if TYPE_CHECKING:
    from participant.models import LocalModel

Role = Literal["private", "test", "public"]
SAMPLE_CHARS = 200
EXAMPLES_SHOWN = 3  # locations named per duplicate or overlap finding

# What a shared prompt means, per pair of roles.
OVERLAP_MEANING: dict[tuple[Role, Role], str] = {
    ("private", "test"): "scores on these test examples measure memory of the private data, not skill",
    ("private", "public"): "every member is asked these public prompts, and this member's answers to them "
    "can repeat its private responses",
    ("test", "public"): "the federation labels these public prompts, so scores on these test examples "
    "overstate",
    ("private", "private"): "the same prompt in two private files",
    ("test", "test"): "the same prompt in two test files",
    ("public", "public"): "the same prompt in two public files",
}


@dataclass
class Checked:
    """One file as read: where each prompt is (normalized prompt -> locations)."""

    path: Path
    role: Role
    prompts: dict[str, list[str]]


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    errors: int = 0
    warnings: int = 0

    def say(self, line: str = "") -> None:
        self.lines.append(line)

    def warn(self, line: str) -> None:
        self.warnings += 1
        self.lines.append(f"  warning: {line}")

    def error(self, line: str) -> None:
        self.errors += 1
        self.lines.append(f"  error: {line}")


# ---- lengths ---------------------------------------------------------------------------------------

# name -> how long an example is in that unit
Measures = dict[str, Callable[[Example], int]]


def text_measures() -> Measures:
    """Lengths without a model: characters, and whitespace-separated words."""
    return {
        "prompt characters": lambda e: len(e.prompt),
        "response characters": lambda e: len(e.response),
        "prompt words": lambda e: len(e.prompt.split()),
        "response words": lambda e: len(e.response.split()),
    }


def model_measures(lm: LocalModel) -> Measures:
    """Token lengths as the model trains on them: the prompt rendered as for generation (its chat
    template included) and the response with its end-of-turn."""
    from participant.training import encode_example

    @functools.cache
    def encoded(e: Example) -> tuple[int, int]:
        ids = encode_example(lm, e, max_length=1 << 30)
        return ids.prompt_length, len(ids.input_ids)

    return {
        "prompt tokens": lambda e: encoded(e)[0],
        "response tokens": lambda e: encoded(e)[1] - encoded(e)[0],
        "total tokens": lambda e: encoded(e)[1],
    }


def length_table(examples: Sequence[Example], measures: Measures) -> list[str]:
    rows = [f"    {'':<22}{'min':>8}{'median':>8}{'mean':>9}{'p95':>8}{'max':>8}"]
    for name, measure in measures.items():
        values = sorted(measure(e) for e in examples)
        p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
        rows.append(
            f"    {name:<22}{values[0]:>8}{statistics.median(values):>8g}{statistics.fmean(values):>9.1f}"
            f"{p95:>8}{values[-1]:>8}"
        )
    return rows


# ---- one file --------------------------------------------------------------------------------------


def normalized(text: str) -> str:
    return " ".join(text.split()).casefold()


def _short(text: str) -> str:
    flat = text.replace("\n", "\\n")
    return flat if len(flat) <= SAMPLE_CHARS else flat[: SAMPLE_CHARS - 1] + "…"


def _locations(wheres: Sequence[str]) -> str:
    shown = ", ".join(wheres[:EXAMPLES_SHOWN])
    return shown + (f" and {len(wheres) - EXAMPLES_SHOWN} more" if len(wheres) > EXAMPLES_SHOWN else "")


def check_examples_file(
    path: Path,
    role: Role,
    data_format: DataFormat,
    measures: Measures,
    report: Report,
    lm: LocalModel | None = None,
    max_length: int | None = None,
) -> Checked | None:
    try:
        data = read_data_file(path, data_format)
    except ChorusError as e:
        report.say(f"{path} ({role}):")
        report.error(str(e))
        return None
    formats = ", ".join(f"{name} ({count})" for name, count in data.formats.most_common()) or "no records"
    report.say(f"{path} ({role}): {len(data.examples)} examples; format {formats}; {data.layout}")
    if not data.examples:
        report.error(f"{path} holds no examples")
        return None
    if len(data.formats) > 1:
        report.warn("records of more than one format (allowed, but often a mistake: check the keys)")
    _sample(data, report, lm)
    _notes(data, report)
    report.say("  lengths:")
    for line in length_table(data.examples, measures):
        report.say(line)
    if lm is not None and max_length is not None:
        cut = [
            s.where
            for e, s in zip(data.examples, data.sources, strict=True)
            if measures["total tokens"](e) > max_length
        ]
        if cut:
            report.warn(
                f"{len(cut)} examples are longer than max_length {max_length} tokens and are cut in training "
                f"(the prompt loses its start, the response its end): {_locations(cut)}"
            )
    _duplicates(data, report)
    prompts: dict[str, list[str]] = defaultdict(list)
    for example, source in zip(data.examples, data.sources, strict=True):
        prompts[normalized(example.prompt)].append(source.where)
    return Checked(path, role, dict(prompts))


def _sample(data: DataFile, report: Report, lm: LocalModel | None) -> None:
    example, source = data.examples[0], data.sources[0]
    report.say(f"  sample ({source.where}):")
    report.say(f"    prompt:   {_short(example.prompt)}")
    report.say(f"    response: {_short(example.response)}")
    if lm is not None:
        from participant.models import render_prompt

        report.say(f"    the model sees: {_short(render_prompt(lm, example.prompt))}")


def _notes(data: DataFile, report: Report) -> None:
    system = sum(s.system for s in data.sources)
    multi = sum(s.turns > 1 for s in data.sources)
    if system:
        report.say(f"  {system} chat records have a system message: it opens their prompt")
    if multi:
        report.say(
            f"  {multi} chat records are multi-turn: their earlier turns are written into one prompt "
            "(User: ... / Assistant: ...)"
        )
    weighted = [e.weight for e in data.examples if e.weight != 1.0]
    if weighted:
        report.say(f"  {len(weighted)} examples carry a weight other than 1 (min {min(weighted):g})")
    empty_prompts = [
        s.where for e, s in zip(data.examples, data.sources, strict=True) if not e.prompt.strip()
    ]
    empty_responses = [
        s.where for e, s in zip(data.examples, data.sources, strict=True) if not e.response.strip()
    ]
    if empty_prompts:
        report.warn(f"{len(empty_prompts)} empty prompts: {_locations(empty_prompts)}")
    if empty_responses:
        report.warn(f"{len(empty_responses)} empty responses: {_locations(empty_responses)}")


def _duplicates(data: DataFile, report: Report) -> None:
    pairs: dict[tuple[str, str], list[str]] = defaultdict(list)
    answers: dict[str, set[str]] = defaultdict(set)
    where_prompt: dict[str, list[str]] = defaultdict(list)
    for example, source in zip(data.examples, data.sources, strict=True):
        prompt, response = normalized(example.prompt), normalized(example.response)
        pairs[(prompt, response)].append(source.where)
        answers[prompt].add(response)
        where_prompt[prompt].append(source.where)
    repeated = [wheres for wheres in pairs.values() if len(wheres) > 1]
    conflicting = [where_prompt[p] for p, responses in answers.items() if len(responses) > 1]
    if repeated:
        extra = sum(len(w) - 1 for w in repeated)
        report.warn(
            f"duplicates: {extra} examples repeat another one ({len(repeated)} distinct), e.g. "
            f"{_locations(repeated[0])}"
        )
    else:
        report.say("  duplicates: none")
    if conflicting:
        report.warn(f"{len(conflicting)} prompts have different responses, e.g. {_locations(conflicting[0])}")


def check_public_file(path: Path, report: Report) -> Checked | None:
    try:
        public = load_prompts(path)
    except ChorusError as e:
        report.say(f"{path} (public):")
        report.error(str(e))
        return None
    report.say(f"{path} (public): {len(public)} prompts")
    report.say(f"  sample ({public[0].prompt_id}): {_short(public[0].text)}")
    prompts: dict[str, list[str]] = defaultdict(list)
    for prompt in public:
        prompts[normalized(prompt.text)].append(f"{path} prompt_id {prompt.prompt_id}")
    repeated = [wheres for wheres in prompts.values() if len(wheres) > 1]
    if repeated:
        report.warn(f"{len(repeated)} prompts appear more than once, e.g. {_locations(repeated[0])}")
    return Checked(path, "public", dict(prompts))


# ---- across files ----------------------------------------------------------------------------------


def check_overlap(files: Sequence[Checked], report: Report) -> None:
    if len(files) < 2:
        return
    report.say("overlap (the same prompt, ignoring case and spacing):")
    order: dict[Role, int] = {"private": 0, "test": 1, "public": 2}
    for a, b in combinations(sorted(files, key=lambda f: order[f.role]), 2):
        shared = sorted(set(a.prompts) & set(b.prompts))
        label = f"{a.path} ({a.role}) and {b.path} ({b.role})"
        if not shared:
            report.say(f"  {label}: none")
            continue
        first = shared[0]
        report.warn(
            f"{label}: {len(shared)} prompts ({OVERLAP_MEANING[(a.role, b.role)]}), e.g. "
            f"{a.prompts[first][0]} and {b.prompts[first][0]}"
        )


def check(
    private: Sequence[Path],
    test: Sequence[Path] = (),
    public: Sequence[Path] = (),
    *,
    data_format: DataFormat = "auto",
    lm: LocalModel | None = None,
    max_length: int | None = None,
) -> Report:
    """Check every file, then their overlap; `lm` measures lengths in its tokens."""
    report = Report()
    measures = model_measures(lm) if lm is not None else text_measures()
    if lm is not None:
        report.say(f"lengths in tokens of {lm.model_id}")
    checked: list[Checked] = []
    files: list[tuple[Path, Role]] = [*((p, "private") for p in private), *((p, "test") for p in test)]
    for path, role in files:
        found = check_examples_file(path, role, data_format, measures, report, lm, max_length)
        if found is not None:
            checked.append(found)
    for path in public:
        found = check_public_file(path, report)
        if found is not None:
            checked.append(found)
    check_overlap(checked, report)
    return report
