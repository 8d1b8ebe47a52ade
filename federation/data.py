"""A run's data: the stdlib-docstring task generated into `<results>/data`, or the files the config names."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from federation.config import LoadedConfig, RunConfigError
from federation.stdlib_task import TaskError
from federation.stdlib_task.files import SCORE_SET, write_task
from federation.stdlib_task.harvest import Example
from federation.stdlib_task.split import Task, build_task, default_families, parse_modules

DATA_DIR = "data"


@dataclass
class DataPaths:
    prompts: Path
    train: dict[str, Path | None]
    test: dict[str, Path | None]


def prepare_data(config: LoadedConfig, results: Path) -> DataPaths:
    """Generate the task into `<results>/data` if the config asks; otherwise use the given files."""
    run = config.run
    ids = [p.id for p in run.participants]
    train: dict[str, Path | None] = {p.id: _path(p.private_data) for p in run.participants}
    test: dict[str, Path | None] = {p.id: _path(p.test_data) for p in run.participants}
    if run.task is None:
        assert run.prompts_path is not None  # checked when the config loaded
        return DataPaths(Path(run.prompts_path), train, test)
    table = run.task
    families: dict[str, list[str]] | None = None
    modules: list[str] | None = None
    try:
        if table.modules:
            modules, named = parse_modules(",".join(table.modules))
            families = named or None
        elif table.families:
            families = default_families(table.families)
        task = build_task(
            modules, families, len(ids), table.seed, table.public_fraction, table.test_fraction,
            table.split, table.alpha, table.home_share,
        )  # fmt: skip
    except TaskError as e:
        raise RunConfigError(f"{config.path}: [task] {e}") from e
    task = _trimmed(task, table.max_public, table.max_train, table.max_test, table.seed)
    out = results / DATA_DIR
    write_task(task, out)
    for pid, generated in zip(ids, task.participants, strict=True):
        train[pid] = train[pid] or out / "participants" / generated / "train.jsonl"
        test[pid] = test[pid] or out / SCORE_SET
    prompts = Path(run.prompts_path) if run.prompts_path else out / "public_prompts.jsonl"
    return DataPaths(prompts, train, test)


def _trimmed(task: Task, max_public: int, max_train: int, max_test: int, seed: int) -> Task:
    def pick(items: list[Example], cap: int, salt: str) -> list[Example]:
        if not cap or len(items) <= cap:
            return items
        chosen = random.Random(f"{seed}:{salt}").sample(items, cap)
        return sorted(chosen, key=lambda e: e.prompt_id)

    return replace(
        task,
        public=pick(task.public, max_public, "public"),
        test=pick(task.test, max_test, "test"),
        train={pid: pick(examples, max_train, pid) for pid, examples in task.train.items()},
    )


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)
