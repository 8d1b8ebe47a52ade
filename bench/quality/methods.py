"""Training each method; every one leaves adapter checkpoints per participant and round for scoring.

- warm-up: each participant's warm-up epochs on its private data (round 0), shared by every method
  but centralized;
- local-only: from the warm-up, each round the private slice a federated participant mixes in;
- FedAvg, semantic, shipped recipe: `chorus-run` on the embedded memory broker, from the warm-up;
- centralized: one model on the pooled private data (the same warm-up epochs, each round the union
  of every participant's private slice);
- reference labels (a ceiling): from the warm-up, each round's public prompts with their true
  references as the labels, mixed with the private slice;
- oracle labels (a ceiling): the same, with each prompt's best member answer against its reference.

Federated participants get an empty test set, so they do not evaluate during the rounds: the bench
scores their checkpoints afterwards, the same way for every method.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import msgspec

from bench.quality.scoring import STATE_DIR, checkpoint_dir
from common.rouge import rouge_l
from coordinator.prompts import PromptSampler, PublicPrompt, load_prompts
from coordinator.replay.label_sources import label_quality_of_run
from coordinator.replay.references import load_references
from federation.config import LoadedConfig
from federation.data import DataPaths, prepare_data
from federation.launch import run_to_end
from federation.local import private_slice, train_local_rounds
from federation.runner import RunOptions
from federation.settings import coordinator_settings, participant_settings
from participant.data import Example
from participant.label_weights import label_example_weight
from participant.learner import Learner, TrainableLearner, trainer
from participant.settings import ParticipantSettings, TrainSettings
from participant.wiring import build_learner, load_data

CENTRAL = "central"  # the centralized run's one model
NO_TEST = "no-test.jsonl"  # an empty test set: federated participants skip their own evaluation


@dataclass
class Trained:
    """What a training step leaves for scoring."""

    run_dir: Path
    settings: dict[str, ParticipantSettings]  # participant (or CENTRAL) -> its settings
    test: list[Example]  # the task's global test set
    test_path: Path
    rounds: int
    bytes_up: int = 0
    bytes_down: int = 0
    participant_rounds: int = 0
    label_quality: dict[str, Any] | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    warm_started: list[str] = field(default_factory=list)  # whose round 0 is the shared warm-up


def _prepared(config: LoadedConfig, run_dir: Path) -> tuple[DataPaths, dict[str, ParticipantSettings]]:
    run_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(config, run_dir)
    settings = {e.id: participant_settings(config, e, data, run_dir) for e in config.run.participants}
    return data, settings


def _trained(
    config: LoadedConfig, run_dir: Path, data: DataPaths, settings: dict[str, ParticipantSettings]
) -> Trained:
    # The task's global test set, or (own data) the first participant's test_data (bench.quality.grid)
    scored_by = next(pid for pid, path in data.test.items() if path is not None)
    test_path = data.test[scored_by]
    assert test_path is not None
    entry = next(e for e in config.run.participants if e.id == scored_by)
    _, test = load_data(participant_settings(config, entry, data, run_dir))
    return Trained(run_dir, settings, test, test_path, config.run.rounds)


def train_warmup(config: LoadedConfig, run_dir: Path) -> Trained:
    """Each participant's warm-up, saved as its round-0 checkpoint."""
    data, settings = _prepared(config, run_dir)
    record_warmup_models(run_dir, settings)
    for pid, participant in settings.items():
        learner = trainer(build_learner(participant))
        if learner is not None:  # one that only answers has nothing to warm up or keep
            private, _ = load_data(participant)
            learner.train(private * participant.train.warmup_epochs)
            learner.save_checkpoint(checkpoint_dir(run_dir, pid, 0))
        del learner
        gc.collect()
    return _trained(config, run_dir, data, settings)


def train_local(config: LoadedConfig, run_dir: Path, warmup_dir: Path) -> Trained:
    """From the warm-up, each round the participant's private slice; no federation."""
    data, settings = _prepared(config, run_dir)
    for pid, participant in settings.items():
        learner = _from_warmup(participant, warmup_dir)
        if learner is None:
            continue  # only answers: scored as it is
        private, _ = load_data(participant)
        save = partial(_save_round, learner, run_dir, pid)
        train_local_rounds(learner, private, participant.train, range(1, config.run.rounds + 1), save)
        del learner
        gc.collect()
    trained = _trained(config, run_dir, data, settings)
    trained.warm_started = list(settings)
    return trained


def train_reference_labels(config: LoadedConfig, run_dir: Path, warmup_dir: Path) -> Trained:
    """A ceiling: from the warm-up, each round's public prompts (the ones chorus-run's coordinator would
    draw) labelled with their true references, weighted as the recipe weighs a label of full confidence,
    mixed with the round's private slice. What a perfect consensus could give with this public budget."""
    data, settings = _prepared(config, run_dir)
    references, prompts_of = _public_rounds(config, run_dir, data)
    for pid, participant in settings.items():
        learner = _from_warmup(participant, warmup_dir)
        if learner is None:
            continue  # only answers: scored as it is
        private, _ = load_data(participant)
        train = participant.train
        for round_id in range(1, config.run.rounds + 1):
            labels = _label_examples(prompts_of(round_id), references, train)
            learner.train(labels + private_slice(private, train, round_id))
            _save_round(learner, run_dir, pid, round_id)
        del learner
        gc.collect()
    trained = _trained(config, run_dir, data, settings)
    trained.warm_started = list(settings)
    return trained


def _public_rounds(
    config: LoadedConfig, run_dir: Path, data: DataPaths
) -> tuple[dict[str, str], Callable[[int], list[PublicPrompt]]]:
    """The task's public references, and each round's public prompts that have one (the prompts
    chorus-run's coordinator would draw)."""
    references_file = run_dir / "data" / "public_references.jsonl"
    if not references_file.is_file():
        raise FileNotFoundError(f"{references_file}: these labels need a generated task's references")
    references = load_references(references_file)
    rounds = coordinator_settings(config, data, run_dir, config.run.rounds, "memory://").round
    sampler = PromptSampler(load_prompts(data.prompts), rounds.seed)

    def prompts_of(round_id: int) -> list[PublicPrompt]:
        return [p for p in sampler.sample(round_id, rounds.prompts_per_round) if p.prompt_id in references]

    return references, prompts_of


def _label_examples(
    prompts: Sequence[PublicPrompt], labels: Mapping[str, str], train: TrainSettings
) -> list[Example]:
    """The prompts with their labels, weighted as the recipe weighs a label of full confidence."""
    weight = label_example_weight(train.label_weighting, train.label_weight, 1.0, "", None)
    return [
        Example(p.text, labels[p.prompt_id], weight=weight, public=True)
        for p in prompts
        if p.prompt_id in labels
    ]


def train_oracle_labels(config: LoadedConfig, run_dir: Path, warmup_dir: Path) -> Trained:
    """A ceiling: as reference labels, but each prompt's label is the members' answer (greedy, from
    their models at the round's start) closest to its reference by ROUGE-L. What a perfect choice among
    the answers a consensus chooses from could give."""
    data, settings = _prepared(config, run_dir)
    references, prompts_of = _public_rounds(config, run_dir, data)
    for round_id in range(1, config.run.rounds + 1):
        start = warmup_dir if round_id == 1 else run_dir
        prompts = prompts_of(round_id)
        answers: dict[str, list[str]] = {p.prompt_id: [] for p in prompts}
        for participant in settings.values():
            learner = _at_round(participant, start, round_id - 1)
            for answer in learner.generate([(p.prompt_id, p.text) for p in prompts], config.run.generation):
                answers[answer.prompt_id].append(answer.text)
            del learner
            gc.collect()
        labels = {pid: oracle_choice(texts, references[pid]) for pid, texts in answers.items() if texts}
        for pid, participant in settings.items():
            trainable = trainer(_at_round(participant, start, round_id - 1))
            if trainable is None:
                continue  # only answers: scored as it is
            private, _ = load_data(participant)
            train = participant.train
            trainable.train(_label_examples(prompts, labels, train) + private_slice(private, train, round_id))
            _save_round(trainable, run_dir, pid, round_id)
            del trainable
            gc.collect()
    trained = _trained(config, run_dir, data, settings)
    trained.warm_started = list(settings)
    return trained


def oracle_choice(answers: Sequence[str], reference: str) -> str:
    """The answer with the highest ROUGE-L against the reference; the first of equals."""
    scores = [rouge_l(a, reference) for a in answers]
    return answers[scores.index(max(scores))]


def _at_round(participant: ParticipantSettings, directory: Path, round_id: int) -> Learner:
    """The participant's learner at its checkpoint of `round_id` under `directory` (one that only
    answers as it is)."""
    learner = build_learner(participant)
    trainable = trainer(learner)
    pid = participant.participant_id
    if trainable is not None and not trainable.load_checkpoint(checkpoint_dir(directory, pid, round_id)):
        raise FileNotFoundError(f"{pid}: no checkpoint of round {round_id} under {directory}")
    return learner


def _from_warmup(participant: ParticipantSettings, warmup_dir: Path) -> TrainableLearner | None:
    """The participant's learner at its warm-up checkpoint; None when it only answers."""
    learner = trainer(build_learner(participant))
    pid = participant.participant_id
    if learner is not None and not learner.load_checkpoint(checkpoint_dir(warmup_dir, pid, 0)):
        raise FileNotFoundError(f"{pid}: no warm-up checkpoint under {warmup_dir}")
    return learner


def _save_round(learner: TrainableLearner, run_dir: Path, pid: str, round_id: int) -> None:
    learner.save_checkpoint(checkpoint_dir(run_dir, pid, round_id))


def train_centralized(config: LoadedConfig, run_dir: Path) -> Trained:
    """One model (the first participant's) on everyone's private data pooled."""
    data, settings = _prepared(config, run_dir)
    pooled = {pid: (load_data(s)[0], s.train) for pid, s in settings.items()}
    first = next(iter(settings.values()))
    central = msgspec.structs.replace(first, participant_id=CENTRAL)
    learner = trainer(build_learner(central))
    if learner is None:
        raise ValueError(f"centralized: {first.participant_id}'s model does not train ([train] method)")
    learner.train([e for private, t in pooled.values() for e in private * t.warmup_epochs])
    learner.save_checkpoint(checkpoint_dir(run_dir, CENTRAL, 0))
    for round_id in range(1, config.run.rounds + 1):
        learner.train([e for private, t in pooled.values() for e in private_slice(private, t, round_id)])
        learner.save_checkpoint(checkpoint_dir(run_dir, CENTRAL, round_id))
    del learner
    gc.collect()
    trained = _trained(config, run_dir, data, {CENTRAL: central})
    trained.notes.append(
        f"one {first.model} model; warm-up on all {sum(len(p) for p, _ in pooled.values())} pooled private "
        f"examples, then each round the union of the {len(pooled)} participants' private slices"
    )
    return trained


def train_federated(config: LoadedConfig, run_dir: Path, warmup_dir: Path) -> Trained:
    """A chorus-run federation whose participants start from the warm-up (where the model matches)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    no_test = run_dir / NO_TEST
    no_test.write_text("")
    entries = [msgspec.structs.replace(e, test_data=str(no_test)) for e in config.run.participants]
    silent = dataclasses.replace(config, run=msgspec.structs.replace(config.run, participants=entries))
    warm = {
        e.id: checkpoint_dir(warmup_dir, e.id, 0)
        for e in config.run.participants
        if checkpoint_dir(warmup_dir, e.id, 0).is_dir() and e.model == _warmup_model(warmup_dir, e.id)
    }
    finished = run_to_end(
        silent, RunOptions(results=run_dir, warm_start=warm), extra={"bench": "quality"}, handle_signals=False
    )
    records = finished.reporter.records
    error = finished.error
    del finished  # the run holds every participant's model; scoring needs none of them
    gc.collect()
    data, settings = _prepared(config, run_dir)  # the run's own task files, regenerated identically
    trained = _trained(config, run_dir, data, settings)
    trained.warm_started = sorted(warm)
    trained.error = error
    trained.rounds = len(records)
    for record in records:
        for row in record.participants:
            trained.bytes_up += row.bytes_up
            trained.bytes_down += row.bytes_down
    trained.participant_rounds = len(records) * len(entries)
    others = sorted(set(settings) - set(warm))
    trained.notes.append(
        f"started from the shared warm-up: {sorted(warm) or 'none'}"
        + (f"; warmed up in the run: {others}" if others else "")
    )
    references = run_dir / "data" / "public_references.jsonl"  # the task's; own data has none
    if silent.coordinator_raw.get("strategy") == "semantic" and records and references.is_file():
        state = run_dir / STATE_DIR / "coordinator.sqlite3"
        trained.label_quality = label_quality_of_run(state, references).as_dict()
    return trained


WARMUP_MODELS = "models.txt"  # under a warm-up run: "<participant> <model>" per line


def record_warmup_models(warmup_dir: Path, settings: dict[str, ParticipantSettings]) -> None:
    lines = [f"{pid} {s.model}" for pid, s in settings.items()]
    (warmup_dir / WARMUP_MODELS).write_text("\n".join(lines) + "\n")


def _warmup_model(warmup_dir: Path, pid: str) -> str | None:
    path = warmup_dir / WARMUP_MODELS
    if not path.is_file():
        return None
    models = dict(line.split(" ", 1) for line in path.read_text().splitlines() if " " in line)
    return models.get(pid)
