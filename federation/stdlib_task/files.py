"""What a built task leaves behind: JSONL files, `task.json`, and a summary for the terminal."""

from __future__ import annotations

import json
import platform
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from federation.stdlib_task.harvest import MAX_WORDS, MIN_WORDS, PROMPT_TEMPLATE, Example
from federation.stdlib_task.split import Task, home_fraction

SCORE_SET = "test.jsonl"


def write_task(task: Task, out_dir: str | Path) -> Path:
    """Write the task as JSONL files plus `task.json`; returns the `task.json` path."""
    root = Path(out_dir)
    for pid in task.participants:
        folder = root / "participants" / pid
        folder.mkdir(parents=True, exist_ok=True)
        _write_jsonl(folder / "train.jsonl", task.train[pid], _qa_line)
        _write_jsonl(folder / "test.jsonl", task.local_test[pid], _qa_line)
    root.mkdir(parents=True, exist_ok=True)
    _write_jsonl(root / "public_prompts.jsonl", task.public, _public_prompt_line)
    # Evaluator-only: lets a run score pseudo-labels against the docstrings. Never sent to anyone.
    _write_jsonl(root / "public_references.jsonl", task.public, _public_reference_line)
    _write_jsonl(root / SCORE_SET, task.test, _qa_line)
    summary_path = root / "task.json"
    summary_path.write_text(json.dumps(task_summary(task), indent=2, ensure_ascii=False) + "\n")
    return summary_path


def _qa_line(example: Example) -> dict[str, str]:
    return {"prompt": example.prompt, "response": example.reference}


def _public_prompt_line(example: Example) -> dict[str, str]:
    return {"prompt_id": example.prompt_id, "prompt": example.prompt}


def _public_reference_line(example: Example) -> dict[str, str]:
    return {"prompt_id": example.prompt_id, "family": example.family, "response": example.reference}


def _write_jsonl(path: Path, examples: list[Example], line: Callable[[Example], dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for example in examples:
            out.write(json.dumps(line(example), ensure_ascii=False) + "\n")


def task_summary(task: Task) -> dict[str, Any]:
    config = task.config
    return {
        "benchmark": "stdlib-docstrings",
        "python_version": task.python_version,
        "python_implementation": platform.python_implementation(),
        "platform": sys.platform,
        "score_on": f"{SCORE_SET} (global test set, stratified over every family)",
        "config": {
            "modules": list(config.modules),
            "family_of": config.family_of,
            "n_participants": config.n_participants,
            "seed": config.seed,
            "public_fraction": config.public_fraction,
            "test_fraction": config.test_fraction,
            "split": config.split,
            "alpha": config.alpha,
            "home_share": config.home_share,
            "prompt_template": PROMPT_TEMPLATE,
            "reference_words": [MIN_WORDS, MAX_WORDS],
        },
        "counts": {
            "usable": len(task.harvest.examples),
            "public": len(task.public),
            "test": len(task.test),
            "train": sum(len(v) for v in task.train.values()),
            "local_test": sum(len(v) for v in task.local_test.values()),
            "per_family": _family_counts(task),
            "per_module": task.harvest.per_module,
            "per_participant": {pid: _participant_counts(task, pid) for pid in task.participants},
        },
        "skipped": dict(sorted(task.harvest.skipped.items())),
    }


def _family_counts(task: Task) -> dict[str, dict[str, int]]:
    sets = {
        "usable": task.harvest.examples,
        "public": task.public,
        "test": task.test,
        "train": [e for pid in task.participants for e in task.train[pid]],
        "local_test": [e for pid in task.participants for e in task.local_test[pid]],
    }
    counters = {name: Counter(e.family for e in examples) for name, examples in sets.items()}
    families = sorted(counters["usable"])
    return {family: {name: counters[name][family] for name in sets} for family in families}


def _participant_counts(task: Task, pid: str) -> dict[str, Any]:
    train = task.train[pid]
    homes = task.home_families[pid]
    return {
        "train": len(train),
        "test": len(task.local_test[pid]),
        "home_families": homes,
        "home_share_of_train": round(home_fraction(train, homes), 3),
        "train_by_family": dict(sorted(Counter(e.family for e in train).items())),
    }


def format_summary(task: Task) -> str:
    lines = [
        f"stdlib docstring task: Python {task.python_version}, {len(task.harvest.examples)} usable "
        f"callables, split={task.config.split}, seed={task.config.seed}",
        "",
        f"{'family':<12} {'usable':>6} {'public':>6} {'test':>5} {'train':>6} {'l.test':>6}",
    ]
    for family, counts in _family_counts(task).items():
        lines.append(
            f"{family:<12} {counts['usable']:>6} {counts['public']:>6} {counts['test']:>5} "
            f"{counts['train']:>6} {counts['local_test']:>6}"
        )
    lines += ["", f"{'participant':<12} {'train':>6} {'test':>5} {'home%':>6}  home families"]
    for pid in task.participants:
        mine = _participant_counts(task, pid)
        lines.append(
            f"{pid:<12} {mine['train']:>6} {mine['test']:>5} {mine['home_share_of_train']:>6.0%}  "
            f"{', '.join(mine['home_families']) or '-'}"
        )
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(task.harvest.skipped.items()))
    lines += ["", f"skipped: {skipped}", f"benchmark score: {SCORE_SET} ({len(task.test)} examples)"]
    return "\n".join(lines)
