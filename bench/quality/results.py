"""One finished run's result, written as JSON the moment the run ends; a rerun skips finished runs.

A result is reused only when its fingerprint (the run's config and the bench's scoring sizes) matches,
so changing a method's settings reruns that method and nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec

from bench.quality.grid import RENAMED_METHODS, RunKey, current_method


class ParticipantScores(msgspec.Struct, kw_only=True):
    """One model's scores: per test prompt after the last round, and a mean per round on the subset."""

    model: str
    learner: str = ""  # how it trains (scoring.learner_description); empty in results written before
    nll: list[float] = []  # per prompt of the whole test set, after the last round (nats per token)
    rouge_l: list[float] = []  # per prompt of the generation subset, greedy answers after the last round
    embedding_similarity: list[float] = []  # same prompts as rouge_l
    subset_nll_by_round: list[float] = []  # mean over the round subset; index = round (0 = start)


class RunResult(msgspec.Struct, kw_only=True):
    task: str
    seed: int
    method: str
    fingerprint: str
    rounds: int = 0
    test_sha256: str = ""  # the test set; identical for every method of one (task, seed)
    test_prompts: int = 0
    subset: list[int] = []  # indices into the test set of the generation subset
    round_subset: list[int] = []  # the NLL-every-round subset (part of `subset`)
    participants: dict[str, ParticipantScores] = {}
    bytes_up: int = 0  # on the wire, every participant and round
    bytes_down: int = 0
    participant_rounds: int = 0
    label_quality: dict[str, Any] | None = None  # label_quality_of_run(...).as_dict()
    seconds: dict[str, float] = {}  # "train", "score"
    error: str | None = None
    notes: list[str] = []
    extra: dict[str, Any] = {}  # method-specific evidence (the junk member's FedAvg refusal)

    @property
    def bytes_per_participant_round(self) -> float:
        total = self.bytes_up + self.bytes_down
        return total / self.participant_rounds if self.participant_rounds else 0.0


class ResultStore:
    """`<root>/<task>__seed<k>__<method>.json`, one file per finished run. Results stored under a
    method's old name (grid.RENAMED_METHODS) are read as the method's now, so a rename reruns nothing."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: RunKey) -> Path:
        return self.root / f"{key.name}.json"

    def finished(self, key: RunKey, fingerprint: str) -> RunResult | None:
        """The stored result of this very run, or None (absent, unreadable, failed, or another config)."""
        for path in (self.path(key), *self._old_paths(key)):
            if path.is_file():
                result = _read(path)
                break
        else:
            return None
        if result is None or result.fingerprint != fingerprint or result.error is not None:
            return None
        return result

    def save(self, result: RunResult) -> Path:
        """Write atomically: an interrupted write never leaves a half file that looks finished."""
        key = RunKey(result.task, result.seed, result.method)
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".json.tmp")
        staging.write_text(json.dumps(msgspec.to_builtins(result), indent=1) + "\n")
        os.replace(staging, path)
        for old in self._old_paths(key):
            old.unlink(missing_ok=True)  # superseded: one result per run
        return path

    def all(self) -> list[RunResult]:
        """Every readable result, one per run: under its current name where both names hold one."""
        found: dict[str, RunResult] = {}
        for path in sorted(self.root.glob("*.json")):
            result = _read(path)
            if result is None:
                continue
            name = RunKey(result.task, result.seed, result.method).name
            if path.stem == name or name not in found:
                found[name] = result
        return list(found.values())

    def _old_paths(self, key: RunKey) -> list[Path]:
        return [
            self.path(RunKey(key.task, key.seed, old))
            for old, new in RENAMED_METHODS.items()
            if new == key.method
        ]


def _read(path: Path) -> RunResult | None:
    try:
        result = msgspec.json.decode(path.read_bytes(), type=RunResult)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    result.method = current_method(result.method)
    return result
