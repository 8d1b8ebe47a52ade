"""The typed run configuration of `chorus-run`: one TOML file describes a whole federation.

    federation = "demo"
    rounds = 3
    [task]                      # generate the stdlib-docstring task into the results dir
    families = ["text", "data", "math"]
    [generation]                # the coordinator's generation parameters, also used for evaluation
    max_new_tokens = 32
    [coordinator]               # coordinator settings (inline); or: coordinator = "coordinator.toml"
    [coordinator.round]
    prompts_per_round = 12
    [[participants]]
    id = "p00"
    model = "smollm2-135m-instruct"

Without [task], give `prompts_path` (the public prompts) and each participant's `private_data`;
`test_data` is optional (a participant without it is not evaluated). `train_data`, the old name of
`private_data`, still loads, with a warning.

Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import structlog
from msgspec import Meta

from common.settings import SettingsError, read_toml
from coordinator.settings import settings_from_table
from federation.stdlib_task import TaskError
from federation.stdlib_task.split import default_families
from participant.data import DataFormat
from participant.settings import (
    Device,
    Dtype,
    LeakGuardTable,
    LearnerSpec,
    TrainSettings,
    resolve_learner_file,
)
from schemas.messages import GenerationParams, Id

__all__ = ["ParticipantEntry", "RunConfig", "RunConfigError", "TaskTable", "load_run_config"]

log = structlog.get_logger(__name__)

# Old participant keys that still load, each with the name that replaced it (and a warning).
DEPRECATED_PARTICIPANT_KEYS = {"train_data": "private_data"}


class RunConfigError(SettingsError):
    """The `chorus-run` configuration is missing, unreadable or invalid."""


class _Table(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class TaskTable(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The stdlib-docstring task (`federation.stdlib_task`), generated into `<results>/data`."""

    families: list[str] | None = None  # names from stdlib_task.split.DEFAULT_FAMILIES; default all
    modules: list[str] | None = None  # or explicit modules, each optionally "module:family"
    seed: int = 0
    split: Literal["family", "dirichlet"] = "family"
    alpha: Annotated[float, Meta(gt=0.0)] = 0.5
    home_share: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.8
    public_fraction: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.3
    test_fraction: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.15
    # Caps keep a CPU run short; 0 means "all of them".
    max_public: Annotated[int, Meta(ge=0)] = 0
    max_train: Annotated[int, Meta(ge=0)] = 0  # per participant
    max_test: Annotated[int, Meta(ge=0)] = 0  # the global test set every participant is scored on


class ParticipantEntry(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: Id
    model: str = "smollm2-135m-instruct"  # smollm2-135m-instruct, tiny-llama, tiny-gpt2, or a HF dir
    # Or your own learner object instead of a model: "package.module:factory" or "file.py:factory" (a path
    # against this file's folder), as in participant settings (examples/custom_learner.py).
    learner: LearnerSpec | None = None
    # The participant settings' names: examples to train on (prompt_response, alpaca or chat records,
    # see participant/data.py); default: the generated task's share.
    private_data: str | None = None
    test_data: str | None = None  # default: the generated task's global test set; none: not evaluated
    data_format: DataFormat = "auto"  # both files' record format; "auto" finds it from each record's keys
    broker_url: str | None = None  # --broker amqp://...: this participant's own URL (its user)
    generation_batch_size: Annotated[int, Meta(ge=1, le=512)] = 16
    train: TrainSettings | None = None  # keys given here override the run's [train] table
    leak_guard: LeakGuardTable | None = None  # the participant settings' [leak_guard]; default: on


class RunConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    federation: Id = "chorus-run"
    rounds: Annotated[int, Meta(ge=1, le=10_000)] = 3
    prompts_path: str | None = None  # public prompts; default: the generated task's
    embedder: str = "minilm"  # scores answers, and builds consensus unless [coordinator.consensus] says
    serialize_compute: bool = True  # one participant uses the CPU at a time (faster on few cores)
    torch_threads: Annotated[int, Meta(ge=0)] = 0  # 0: torch's default
    device: Device = "cpu"  # every participant's local model: "cpu", "cuda", "cuda:N" or "auto"
    dtype: Dtype = "float32"  # their weights: "float32", "bfloat16" or "auto" (bfloat16 where native)
    task: TaskTable | None = None
    generation: GenerationParams = GenerationParams()
    train: TrainSettings = TrainSettings()
    coordinator: dict[str, object] | str = {}
    participants: Annotated[list[ParticipantEntry], Meta(min_length=1)]


@dataclass(frozen=True)
class LoadedConfig:
    path: Path
    run: RunConfig
    coordinator_raw: dict[str, object]  # coordinator table, paths resolved against its file


def _participant_train_over_run_train(raw: dict[str, object]) -> dict[str, object]:
    """A participant's own [participants.train] keys override the run's [train]; the rest it shares
    (so a member that differs in its adapter does not silently fall back to default budgets)."""
    shared = raw.get("train")
    participants = raw.get("participants")
    if not isinstance(shared, dict) or not isinstance(participants, list):
        return raw
    merged = [
        {**entry, "train": {**shared, **entry["train"]}}
        if isinstance(entry, dict) and isinstance(entry.get("train"), dict)
        else entry
        for entry in participants
    ]
    return {**raw, "participants": merged}


def load_run_config(path: Path) -> LoadedConfig:
    """Read and validate a run config; relative paths are resolved against the file's folder."""
    try:
        raw = read_toml(path)
    except SettingsError as e:
        raise RunConfigError(str(e)) from e
    try:
        run = msgspec.convert(
            _participant_train_over_run_train(_renamed_deprecated_keys(raw, path)), RunConfig
        )
    except msgspec.ValidationError as e:
        raise RunConfigError(f"{path}: {e}") from e
    base = path.parent
    coordinator_raw = _coordinator_table(run.coordinator, base)
    entries = [_resolved_entry(entry, base) for entry in run.participants]
    ids = [entry.id for entry in entries]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise RunConfigError(f"{path}: participant ids must be unique; repeated: {', '.join(duplicates)}")
    if "COORDINATOR" in {i.upper() for i in ids} or "coordinator" in ids:
        raise RunConfigError(f"{path}: 'coordinator' is reserved; pick another participant id")
    prompts = _resolve(run.prompts_path, base)
    if run.task is not None and run.task.families:
        try:
            default_families(run.task.families)
        except TaskError as e:
            raise RunConfigError(f"{path}: [task] {e}") from e
    if run.task is None:
        missing = [e.id for e in entries if e.private_data is None and _trains(e, run)]
        if prompts is None or missing:
            raise RunConfigError(
                f"{path}: without a [task] table, give prompts_path and each participant's private_data "
                f"(missing for: {', '.join(missing) or 'prompts_path'}); or add [task] to generate the "
                "stdlib-docstring benchmark"
            )
    run = msgspec.structs.replace(run, participants=entries, prompts_path=prompts)
    for key in ("federation", "prompts_path"):
        if key in coordinator_raw:
            raise RunConfigError(
                f"{path}: set {key!r} at the top of the run config, not in the coordinator table"
            )
    _check_coordinator(coordinator_raw, path)
    return LoadedConfig(path=path.resolve(), run=run, coordinator_raw=coordinator_raw)


def _renamed_deprecated_keys(raw: dict[str, object], path: Path) -> dict[str, object]:
    """Participant entries with their deprecated keys under the current names (each warned about once)."""
    participants = raw.get("participants")
    if not isinstance(participants, list):
        return raw
    renamed: list[object] = []
    warned: set[str] = set()
    for entry in participants:
        if isinstance(entry, dict):
            entry = dict(entry)
            for old, new in DEPRECATED_PARTICIPANT_KEYS.items():
                if old not in entry:
                    continue
                if new in entry:
                    raise RunConfigError(
                        f"{path}: participant {entry.get('id')!r} gives both {old!r} and {new!r}; "
                        f"keep {new!r} ({old!r} is its deprecated name)"
                    )
                entry[new] = entry.pop(old)
                if old not in warned:
                    warned.add(old)
                    log.warning(
                        "deprecated_key", file=str(path), key=old, use=new,
                        hint=f"rename {old} to {new} in [[participants]]: {old} will stop loading",
                    )  # fmt: skip
        renamed.append(entry)
    return {**raw, "participants": renamed}


def _trains(entry: ParticipantEntry, run: RunConfig) -> bool:
    return (entry.train or run.train).method != "none"


def _coordinator_table(given: dict[str, object] | str, base: Path) -> dict[str, object]:
    if isinstance(given, str):
        file = (base / given).resolve()
        try:
            return read_toml(file)
        except SettingsError as e:
            raise RunConfigError(f"coordinator settings: {e}") from e
    return dict(given)


def _check_coordinator(raw: dict[str, object], path: Path) -> None:
    """Validate the coordinator table now, so a typo fails before any model loads."""
    try:
        settings_from_table({**raw, "prompts_path": "-"})
    except msgspec.ValidationError as e:
        raise RunConfigError(f"{path}: [coordinator] {e}") from e


def _resolve(value: str | None, base: Path) -> str | None:
    return None if value is None else str((base / value).resolve())


def _resolved_entry(entry: ParticipantEntry, base: Path) -> ParticipantEntry:
    model = entry.model
    if model.startswith(".") or "/" in model:
        model = str((base / model).resolve())
    return msgspec.structs.replace(
        entry,
        model=model,
        learner=None if entry.learner is None else resolve_learner_file(entry.learner, base),
        private_data=_resolve(entry.private_data, base),
        test_data=_resolve(entry.test_data, base),
    )
