"""The experiment grid: which (task, seed, method) runs exist, and the chorus-run config of each.

`bench/quality_grid.toml` names the tasks (chorus-run configs), seeds and methods. A seed shifts the
task's data seed and sets the training seed; a method sets the coordinator's strategy (and, for the
shipped recipe, the settings layered over the semantic run). `--quick` shrinks everything.

A chorus-run config given in place of a grid file is a grid of that one task, at the default seeds
and methods. A config without `[task]` (your own data) is run on its own files: a seed then sets the
training seed only, `--quick` keeps every example, and every method is scored on one test set, the
first `test_data` its `[[participants]]` give (one of them must give it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from common.settings import read_toml
from coordinator.settings import settings_from_table
from federation.config import LoadedConfig, RunConfig, load_run_config
from participant.settings import TrainSettings

# Order matters: a method's runs need the runs before it (every method starts from the warm-up).
METHODS = ("local", "fedavg", "centralized", "medoid", "shipped", "reference_labels", "oracle_labels")
CEILINGS = ("reference_labels", "oracle_labels")  # label the public prompts from their references
LABELS = {
    "warmup": "after warm-up",
    "local": "local-only",
    "fedavg": "FedAvg (LoRA)",
    "centralized": "centralized (pooled)",
    "medoid": "semantic (medoid)",
    "shipped": "semantic (shipped recipe)",
    "reference_labels": "ceiling: true references as labels",
    "oracle_labels": "ceiling: the best member answer as labels",
    "junk_member": "robustness to a junk member",
    "fedavg_refusal": "FedAvg on a federation it cannot serve",
}
STRATEGY = {"fedavg": "fedavg", "medoid": "semantic", "shipped": "semantic", "junk_member": "semantic"}
FEDERATED = ("fedavg", "medoid", "shipped")
# Old method names, still read from grid files, --methods and stored results: "semantic" named both the
# strategy and the medoid recipe, and "new_recipe" the recipe that ships.
RENAMED_METHODS = {"semantic": "medoid", "new_recipe": "shipped"}
WARMUP = "warmup"  # a run of its own per (task, seed): every method but centralized starts from it


class GridError(ValueError):
    """The grid file is unusable; the message says what to fix."""


class _Table(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class Recipe(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    train: dict[str, Any] = {}  # participant [train] settings over the task's
    consensus: dict[str, Any] = {}  # coordinator [coordinator.consensus] settings over the task's


class JunkMember(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    task: str
    seed: int = 0
    participant: str = "p02"
    model: str = "tiny-gpt2"
    fedavg_deadline_seconds: Annotated[float, Meta(gt=0.0)] = 60.0


class FedavgRefusal(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One FedAvg round of a task whose members FedAvg cannot serve, recorded: what the coordinator did."""

    task: str
    seed: int = 0
    deadline_seconds: Annotated[float, Meta(gt=0.0)] = 60.0


class Quick(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tasks: list[str] | None = None
    seeds: list[int] = msgspec.field(default_factory=lambda: [0])
    rounds: Annotated[int, Meta(ge=1)] = 2
    prompts_per_round: Annotated[int, Meta(ge=1)] = 6
    max_public: Annotated[int, Meta(ge=1)] = 12
    max_train: Annotated[int, Meta(ge=1)] = 12
    max_test: Annotated[int, Meta(ge=1)] = 24
    warmup_epochs: Annotated[int, Meta(ge=0)] = 1
    max_new_tokens: Annotated[int, Meta(ge=1)] = 16
    generation_prompts: Annotated[int, Meta(ge=1)] = 12
    round_nll_prompts: Annotated[int, Meta(ge=1)] = 8
    bootstrap_resamples: Annotated[int, Meta(ge=100)] = 2000


class GridFile(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tasks: dict[str, str]  # name -> chorus-run config, relative to the grid file
    seeds: Annotated[list[int], Meta(min_length=1)] = msgspec.field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = msgspec.field(default_factory=lambda: list(METHODS))
    generation_prompts: Annotated[int, Meta(ge=1)] = 60
    round_nll_prompts: Annotated[int, Meta(ge=1)] = 30
    bootstrap_resamples: Annotated[int, Meta(ge=100)] = 4000
    shipped: Recipe = Recipe()
    junk_member: JunkMember | None = None
    fedavg_refusal: FedavgRefusal | None = None
    per_member: bool = False  # the report also lists every member beside its own local-only scores
    quick: Quick = Quick()


@dataclasses.dataclass(frozen=True)
class RunKey:
    task: str
    seed: int
    method: str  # "warmup", a METHODS entry, or "junk_member"

    @property
    def name(self) -> str:
        return f"{self.task}__seed{self.seed}__{self.method}"


@dataclasses.dataclass(frozen=True)
class Grid:
    path: Path
    tasks: dict[str, LoadedConfig]  # per task, already shrunk by --quick
    seeds: list[int]
    methods: list[str]
    generation_prompts: int
    round_nll_prompts: int  # NLL after every round on this many prompts (of the generation subset)
    bootstrap_resamples: int
    shipped: Recipe
    shipped_problem: str | None  # why the shipped recipe cannot run with the settings installed now
    junk_member: JunkMember | None
    quick: bool
    fedavg_refusal: FedavgRefusal | None = None
    per_member: bool = False

    def runs(self) -> list[RunKey]:
        """Every run, in the order they execute: per (task, seed) the warm-up first, then the methods.

        Seeds are the outer loop, so a grid stopped early has every task at its first seeds."""
        keys: list[RunKey] = []
        for seed in self.seeds:
            for task in self.tasks:
                keys.append(RunKey(task, seed, WARMUP))
                keys += [RunKey(task, seed, method) for method in METHODS if method in self.methods]
        junk = self.junk_member
        if junk is not None:
            if RunKey(junk.task, junk.seed, WARMUP) not in keys:
                keys.append(RunKey(junk.task, junk.seed, WARMUP))
            keys.append(RunKey(junk.task, junk.seed, "junk_member"))
        refusal = self.fedavg_refusal
        if refusal is not None:
            keys.append(RunKey(refusal.task, refusal.seed, "fedavg_refusal"))
        return keys


def load_grid(
    path: Path,
    *,
    quick: bool = False,
    tasks: list[str] | None = None,
    seeds: list[int] | None = None,
    methods: list[str] | None = None,
    junk_member: bool = True,
    device: str | None = None,
) -> Grid:
    """Read the grid file; the keyword arguments narrow it (command-line choices); `device` moves every
    participant's model there (a run's identity includes it, so CPU and GPU results never mix)."""
    text = read_toml(path)
    if "participants" in text:  # a chorus-run config: a grid of that one task
        text = {"tasks": {str(text.get("federation") or path.stem): path.name}}
    if "new_recipe" in text:
        if "shipped" in text:
            raise GridError(f"{path}: [new_recipe] is the old name of [shipped]; give one of them")
        text = {("shipped" if key == "new_recipe" else key): value for key, value in text.items()}
    try:
        raw = msgspec.convert(text, GridFile)
    except msgspec.ValidationError as e:
        raise GridError(f"{path}: {e}") from e
    chosen_methods = [current_method(m) for m in methods or raw.methods]
    unknown = sorted(set(chosen_methods) - set(METHODS))
    if unknown:
        raise GridError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    task_names = tasks or (raw.quick.tasks if quick and raw.quick.tasks else list(raw.tasks))
    missing = sorted(set(task_names) - set(raw.tasks))
    if missing:
        raise GridError(f"unknown tasks {missing}; {path} has {sorted(raw.tasks)}")
    loaded = {name: load_run_config((path.parent / raw.tasks[name]).resolve()) for name in task_names}
    for config in loaded.values():
        check_scorable(config)
    if quick:
        loaded = {name: shrink(config, raw.quick) for name, config in loaded.items()}
    if device is not None:
        loaded = {name: on_device(config, device) for name, config in loaded.items()}
    junk = raw.junk_member if junk_member else None
    if junk is not None and junk.task not in loaded:
        junk = None  # its task is not in this grid (e.g. --tasks chose others)
    refusal = raw.fedavg_refusal
    if refusal is not None and refusal.task not in loaded:
        refusal = None
    return Grid(
        path=path,
        tasks=loaded,
        seeds=seeds or (raw.quick.seeds if quick else raw.seeds),
        methods=[m for m in METHODS if m in chosen_methods],
        generation_prompts=raw.quick.generation_prompts if quick else raw.generation_prompts,
        round_nll_prompts=raw.quick.round_nll_prompts if quick else raw.round_nll_prompts,
        bootstrap_resamples=raw.quick.bootstrap_resamples if quick else raw.bootstrap_resamples,
        shipped=raw.shipped,
        shipped_problem=recipe_problem(raw.shipped, next(iter(loaded.values()))),
        junk_member=junk,
        quick=quick,
        fedavg_refusal=refusal,
        per_member=raw.per_member,
    )


def current_method(name: str) -> str:
    """A method's name now, given its name now or before a rename."""
    return RENAMED_METHODS.get(name, name)


def check_scorable(config: LoadedConfig) -> None:
    """Every method is scored on one test set: the task's, or (own data) a participant's test_data."""
    if config.run.task is None and all(e.test_data is None for e in config.run.participants):
        raise GridError(
            f"{config.path}: the quality bench scores every method on one test set, and this config has "
            "neither a [task] table nor any test_data: give test_data to a [[participants]] entry"
        )


def shrink(config: LoadedConfig, quick: Quick) -> LoadedConfig:
    """The same task and method, at smoke-test sizes (own data: every example, fewer rounds and tokens)."""
    run = config.run
    task = run.task and msgspec.structs.replace(
        run.task, max_public=quick.max_public, max_train=quick.max_train, max_test=quick.max_test
    )
    train = msgspec.structs.replace(run.train, warmup_epochs=quick.warmup_epochs)
    generation = msgspec.structs.replace(run.generation, max_new_tokens=quick.max_new_tokens)
    run = msgspec.structs.replace(run, rounds=quick.rounds, task=task, train=train, generation=generation)
    coordinator = _merged(config.coordinator_raw, {"round": {"prompts_per_round": quick.prompts_per_round}})
    return dataclasses.replace(config, run=run, coordinator_raw=coordinator)


def on_device(config: LoadedConfig, device: str) -> LoadedConfig:
    """The same task with every participant's model on `device` ("cpu", "cuda", "cuda:N", "auto")."""
    try:
        run = msgspec.convert({**msgspec.to_builtins(config.run), "device": device}, RunConfig)
    except msgspec.ValidationError as e:
        raise GridError(f"--device {device!r}: {e}") from e
    return dataclasses.replace(config, run=run)


def seeded(config: LoadedConfig, seed: int) -> LoadedConfig:
    """Seed `seed` of a task: the data split seed shifted by it (own data: the files as they are), the
    training seed set to it."""
    run = config.run
    task = run.task and msgspec.structs.replace(run.task, seed=run.task.seed + seed)
    train = msgspec.structs.replace(run.train, seed=seed)
    entries = [
        msgspec.structs.replace(
            e, train=None if e.train is None else msgspec.structs.replace(e.train, seed=seed)
        )
        for e in run.participants
    ]
    run = msgspec.structs.replace(
        run, federation=f"{run.federation}-s{seed}", task=task, train=train, participants=entries
    )
    return dataclasses.replace(config, run=run)


# "medoid" is the recipe that was the default before the shipped one, pinned so that the grid
# keeps comparing against it whatever the defaults are now.
MEDOID_RECIPE = Recipe(
    train={"label_weighting": "confidence"}, consensus={"vote_weighting": "uniform", "label_choice": "medoid"}
)


def method_config(config: LoadedConfig, method: str, recipe: Recipe) -> LoadedConfig:
    """A seeded task's config as `method` runs it (the strategy; the medoid's or the shipped recipe's
    settings)."""
    coordinator = dict(config.coordinator_raw)
    if method in STRATEGY:
        coordinator["strategy"] = STRATEGY[method]
    run = config.run
    layered = {
        "shipped": recipe,
        "medoid": MEDOID_RECIPE,
        "reference_labels": recipe,
        "oracle_labels": recipe,
    }.get(method)
    if layered is not None:
        coordinator = _merged(coordinator, {"consensus": layered.consensus})

        def over(train: TrainSettings) -> TrainSettings:
            return msgspec.convert({**msgspec.to_builtins(train), **layered.train}, TrainSettings)

        entries = [
            e if e.train is None else msgspec.structs.replace(e, train=over(e.train))
            for e in run.participants
        ]
        run = msgspec.structs.replace(run, train=over(run.train), participants=entries)
    return dataclasses.replace(config, run=run, coordinator_raw=coordinator)


def with_junk_member(config: LoadedConfig, junk: JunkMember) -> LoadedConfig:
    """The federation with one participant's model replaced (by a random-weight tiny GPT-2)."""
    ids = [e.id for e in config.run.participants]
    if junk.participant not in ids:
        raise GridError(f"[junk_member] participant {junk.participant!r} is not one of {ids}")
    entries = [
        msgspec.structs.replace(e, model=junk.model) if e.id == junk.participant else e
        for e in config.run.participants
    ]
    run = msgspec.structs.replace(config.run, participants=entries)
    return dataclasses.replace(config, run=run)


def recipe_problem(recipe: Recipe, config: LoadedConfig) -> str | None:
    """Why the installed participant/coordinator settings reject the shipped recipe; None if they take it."""
    try:
        method_config(config, "shipped", recipe)
        consensus = _merged(config.coordinator_raw, {"consensus": recipe.consensus})
        settings_from_table({**consensus, "prompts_path": "-"})
    except msgspec.ValidationError as e:
        return f"the installed settings do not take the shipped recipe yet ({e})"
    return None


def fingerprint(config: LoadedConfig, extra: dict[str, Any]) -> str:
    """What determines a run's result: its config and the bench's scoring sizes (not file locations).

    Settings at their defaults are left out, so a setting added later (at a default that keeps the
    old behaviour) does not turn every finished run into one to redo.
    """
    identity = {"run": non_default(config.run), "coordinator": config.coordinator_raw, **extra}
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def non_default(value: Any) -> Any:
    """Plain values of `value`, with the fields of every struct that equal their defaults left out."""
    if isinstance(value, msgspec.Struct):
        out = {}
        for field in msgspec.structs.fields(value):
            item = getattr(value, field.name)
            factory = field.default_factory
            default = factory() if factory is not msgspec.NODEFAULT else field.default
            if field.required or item != default:
                out[field.encode_name] = non_default(item)
        return out
    if isinstance(value, list | tuple):
        return [non_default(v) for v in value]
    if isinstance(value, dict):
        return {k: non_default(v) for k, v in value.items()}
    return msgspec.to_builtins(value)


def _merged(base: dict[str, object], over: dict[str, dict[str, Any]]) -> dict[str, object]:
    out = dict(base)
    for table, values in over.items():
        out[table] = {**dict(out.get(table) or {}), **values}  # type: ignore[call-overload]
    return out
