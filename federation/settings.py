"""Each service's settings for a run, derived from the run config and where the run keeps its files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from coordinator.settings import CoordinatorSettings, settings_from_table
from federation.config import LoadedConfig, ParticipantEntry, RunConfigError
from federation.data import DataPaths
from participant.settings import LeakGuardTable, ParticipantSettings

STATE_DIR = "state"


def coordinator_settings(
    config: LoadedConfig, data: DataPaths, results: Path, rounds: int, broker_url: str
) -> CoordinatorSettings:
    run = config.run
    raw: dict[str, Any] = dict(config.coordinator_raw)
    round_table = dict(raw.get("round") or {})
    round_table["rounds"] = rounds
    round_table.setdefault("min_participants", len(run.participants))
    raw["round"] = round_table
    consensus = dict(raw.get("consensus") or {})
    consensus.setdefault("embedder", run.embedder)
    raw["consensus"] = consensus
    raw.setdefault("generation", msgspec.to_builtins(run.generation))
    raw.setdefault("roster", [p.id for p in run.participants])
    recording = dict(raw.get("recording") or {})  # on by default, as for chorus-coordinator
    recording.setdefault("directory", str(results / "records"))
    raw["recording"] = recording
    raw.update(
        federation=run.federation,
        prompts_path=str(data.prompts),
        state_path=str(results / STATE_DIR / "coordinator.sqlite3"),
        broker_url=broker_url,
    )
    try:
        return settings_from_table(raw)
    except msgspec.ValidationError as e:
        raise RunConfigError(f"{config.path}: [coordinator] {e}") from e


def participant_settings(
    config: LoadedConfig, entry: ParticipantEntry, data: DataPaths, results: Path
) -> ParticipantSettings:
    train, test = data.train[entry.id], data.test[entry.id]
    return ParticipantSettings(
        federation=config.run.federation,
        participant_id=entry.id,
        model=entry.model,
        learner=entry.learner,
        state_dir=str(results / STATE_DIR / entry.id),
        private_data=None if train is None else str(train),
        test_data=None if test is None else str(test),
        test_fraction=0.0,  # a run's member without test_data is not evaluated: none of its data is held out
        data_format=entry.data_format,
        generation_batch_size=entry.generation_batch_size,
        device=config.run.device,
        dtype=config.run.dtype,
        heartbeat_seconds=5.0,
        progress=False,  # the runner shows what each participant does; bars would garble the table
        train=entry.train or config.run.train,
        leak_guard=entry.leak_guard or LeakGuardTable(),
    )
