"""`bench/privacy.toml`: what the privacy audit runs, validated on load."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from common.settings import read_toml
from federation.config import LoadedConfig, load_run_config

# local-only; FedAvg; the shipped recipe (its leak guard on, as by default); the same without the guard;
# and with the canaries' owner training under DP-SGD at `dp_epsilon`, or at the epsilon a name such as
# "shipped_dp_eps1" gives.
METHODS = ("local", "fedavg", "shipped", "shipped_no_guard", "shipped_dp")
DP_AT = re.compile(r"^shipped_dp_eps(\d+(?:\.\d+)?)$")


class QuickTable(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A smoke run's sizes, over the task's: minutes, not hours; its numbers mean nothing."""

    seeds: Annotated[int, Meta(ge=1)] = 1
    rounds: Annotated[int, Meta(ge=1)] = 1
    max_train: Annotated[int, Meta(ge=1)] = 8
    max_public: Annotated[int, Meta(ge=4)] = 12  # canary questions included
    max_test: Annotated[int, Meta(ge=1)] = 12
    warmup_epochs: Annotated[int, Meta(ge=1)] = 2
    held_out: Annotated[int, Meta(ge=1)] = 6
    test_examples: Annotated[int, Meta(ge=1)] = 6


class AuditSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    task: str  # a chorus-run config with a generated [task], relative to this file
    seeds: Annotated[int, Meta(ge=1, le=100)] = 3
    methods: list[str] = msgspec.field(default_factory=lambda: list(METHODS))
    owner: str = "p00"  # the member whose private data holds the canaries
    canary_repeats: Annotated[list[Annotated[int, Meta(ge=1, le=1_000)]], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: [1, 4, 16]
    )
    secret_digits: Annotated[int, Meta(ge=2, le=5)] = 4  # 10^digits candidates, every one scored
    dp_epsilon: Annotated[float, Meta(gt=0.0)] = 8.0
    dp_delta: Annotated[float, Meta(gt=0.0, lt=1.0)] = 1e-5
    held_out: Annotated[int, Meta(ge=1)] = 32  # held-out examples per member for the membership attack
    test_examples: Annotated[int, Meta(ge=1)] = 60  # test prompts whose NLL is the quality cost
    quick: QuickTable = QuickTable()


@dataclasses.dataclass(frozen=True)
class Audit:
    settings: AuditSettings
    task: LoadedConfig  # the task at the sizes this invocation runs
    quick: bool


class AuditError(ValueError):
    pass


def load_audit(path: Path, *, quick: bool = False) -> Audit:
    try:
        settings = msgspec.convert(read_toml(path), AuditSettings)
    except msgspec.ValidationError as e:
        raise AuditError(f"{path}: {e}") from e
    unknown = sorted(m for m in settings.methods if m not in METHODS and not DP_AT.match(m))
    if unknown:
        raise AuditError(
            f"{path}: unknown methods {unknown}; known: {', '.join(METHODS)}, or shipped_dp_eps<epsilon>"
        )
    task = load_run_config(path.parent / settings.task)
    if task.run.task is None:
        raise AuditError(f"{path}: task {settings.task} uses its own data; the audit needs a [task] table")
    if quick:
        q = settings.quick
        run = task.run
        assert run.task is not None
        table = msgspec.structs.replace(
            run.task, max_train=q.max_train, max_public=q.max_public, max_test=q.max_test
        )
        train = msgspec.structs.replace(run.train, warmup_epochs=q.warmup_epochs)
        run = msgspec.structs.replace(run, rounds=q.rounds, task=table, train=train)
        coordinator = dict(task.coordinator_raw)
        rounds = dict(coordinator.get("round", {}))  # type: ignore[call-overload]
        rounds["prompts_per_round"] = q.max_public  # one round draws every public prompt
        coordinator["round"] = rounds
        task = dataclasses.replace(task, run=run, coordinator_raw=coordinator)
        settings = msgspec.structs.replace(
            settings, seeds=q.seeds, held_out=q.held_out, test_examples=q.test_examples
        )
    return Audit(settings, task, quick)


def dp_epsilon(method: str, settings: AuditSettings) -> float | None:
    """The epsilon the owner trains under in `method`, or None for a method without DP."""
    if method == "shipped_dp":
        return settings.dp_epsilon
    match = DP_AT.match(method)
    return float(match.group(1)) if match else None
