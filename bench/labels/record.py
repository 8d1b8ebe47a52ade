"""Recording a label corpus: real members answer the public set once, and compute every local signal.

Stages: "warmup" (each member after the task's warm-up, bench.quality's own) and "round1" (after one
round of the shipped recipe from that warm-up, run by chorus-run as the grid runs it). Per stage, each
member (one model in memory at a time) first answers every public prompt, then scores every member's
answers teacher forced. Each step's output is saved under the work folder as it finishes, so an
interrupted recording resumes where it stopped; the corpus is written when every step is done.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from bench.labels.corpus import MemberAnswer, PromptRecord, write_corpus
from bench.labels.signals import affinity, token_stats
from bench.quality.grid import Recipe, load_grid, method_config, seeded
from bench.quality.methods import train_federated, train_warmup
from bench.quality.scoring import checkpoint_dir
from coordinator.settings import ConsensusSettingsTable
from coordinator.wiring import build_embedder
from federation.config import LoadedConfig
from federation.data import DATA_DIR, prepare_data
from federation.settings import participant_settings
from participant.data import Example
from participant.generation import generate_answers
from participant.learners.local import LocalLearner, TrainableLocalLearner
from participant.settings import ParticipantSettings
from participant.wiring import build_learner, load_data
from schemas.messages import GenerationParams

STAGES = ("warmup", "round1")
AFFINITY_TOP_K = 5
Say = Callable[[str], None]


@dataclass(frozen=True)
class PublicPrompt:
    prompt_id: str
    prompt: str
    reference: str
    family: str


@dataclass(frozen=True)
class Recorder:
    """Records one (task, seed) of a grid file into `corpus`, keeping its work under `work`."""

    grid_file: Path
    task: str
    seed: int
    work: Path
    corpus: Path
    say: Say = print

    def run(self, stages: tuple[str, ...] = STAGES) -> list[PromptRecord]:
        grid = load_grid(self.grid_file, tasks=[self.task], seeds=[self.seed], junk_member=False)
        config = seeded(grid.tasks[self.task], self.seed)
        _set_threads(config)
        warmup = self.work / "warmup"
        settings = _settings(config, warmup)
        if not all(checkpoint_dir(warmup, pid, 0).is_dir() for pid in settings):
            self.say(f"warm-up of {sorted(settings)}")
            train_warmup(config, warmup)
        public = _public(warmup)
        experts = _experts(warmup, list(settings))
        affinities = self._affinities(config, settings, public)
        records: list[PromptRecord] = []
        for stage in stages:
            checkpoints = self._checkpoints(stage, config, grid.shipped, settings, warmup)
            signals = Signals(settings, checkpoints, config.run.generation, experts, affinities)
            records += self._stage(stage, signals, public)
        write_corpus(self.corpus, records)
        self.say(f"wrote {len(records)} records to {self.corpus}")
        return records

    def _checkpoints(
        self,
        stage: str,
        config: LoadedConfig,
        recipe: Recipe,
        settings: dict[str, ParticipantSettings],
        warmup: Path,
    ) -> dict[str, Path]:
        if stage == "warmup":
            return {pid: checkpoint_dir(warmup, pid, 0) for pid in settings}
        run_dir = self.work / stage
        if not all(checkpoint_dir(run_dir, pid, 1).is_dir() for pid in settings):
            self.say("one round of the shipped recipe")
            one_round = dataclasses.replace(config, run=msgspec.structs.replace(config.run, rounds=1))
            train_federated(method_config(one_round, "shipped", recipe), run_dir, warmup)
        return {pid: checkpoint_dir(run_dir, pid, 1) for pid in settings}

    def _stage(self, stage: str, signals: Signals, public: list[PublicPrompt]) -> list[PromptRecord]:
        steps = self.work / "signals" / stage
        settings = signals.settings
        answers = {}
        for pid in settings:
            self.say(f"{stage}: {pid} answers")
            answers[pid] = _step(steps / f"{pid}.answers.json", partial(signals.answer, pid, public))
        texts = {pid: [a["text"] for a in rows] for pid, rows in answers.items()}
        scores = {}
        for pid in settings:
            self.say(f"{stage}: {pid} scores every answer")
            scores[pid] = _step(steps / f"{pid}.scores.json", partial(signals.score, pid, public, texts))
        experts, affinities = signals.experts, signals.affinities
        return [
            PromptRecord(
                stage=stage,
                prompt_id=prompt.prompt_id,
                prompt=prompt.prompt,
                reference=prompt.reference,
                family=prompt.family,
                expert=experts[prompt.prompt_id],
                answers={
                    writer: MemberAnswer(
                        text=texts[writer][i],
                        logprob=answers[writer][i]["logprob"],
                        self_certainty=scores[writer][writer][i]["self_certainty"],
                        affinity=affinities[writer][i],
                        scored_by={scorer: scores[scorer][writer][i]["logprob"] for scorer in settings},
                    )
                    for writer in settings
                },
            )
            for i, prompt in enumerate(public)
        ]

    def _affinities(
        self, config: LoadedConfig, settings: dict[str, ParticipantSettings], public: list[PublicPrompt]
    ) -> dict[str, list[float]]:
        def compute() -> dict[str, list[float]]:
            embedder = build_embedder(ConsensusSettingsTable(embedder=config.run.embedder))
            prompts = np.asarray(embedder.embed([p.prompt for p in public]), dtype=np.float64)
            result = {}
            for pid, participant in settings.items():
                private = [e.prompt for e in load_data(participant)[0]]
                vectors = np.asarray(embedder.embed(private), dtype=np.float64)
                result[pid] = affinity(prompts, vectors, AFFINITY_TOP_K)
            return result

        computed: dict[str, list[float]] = _step(self.work / "signals" / "affinity.json", compute)
        return computed


def _set_threads(config: LoadedConfig) -> None:
    if config.run.torch_threads:
        import torch

        torch.set_num_threads(config.run.torch_threads)


def _settings(config: LoadedConfig, run_dir: Path) -> dict[str, ParticipantSettings]:
    run_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(config, run_dir)  # the task files, generated identically every time
    return {e.id: participant_settings(config, e, data, run_dir) for e in config.run.participants}


def _public(run_dir: Path) -> list[PublicPrompt]:
    data = run_dir / DATA_DIR
    prompts = [json.loads(line) for line in (data / "public_prompts.jsonl").read_text().splitlines()]
    references = {
        row["prompt_id"]: row
        for row in map(json.loads, (data / "public_references.jsonl").read_text().splitlines())
    }
    return [
        PublicPrompt(
            p["prompt_id"],
            p["prompt"],
            references[p["prompt_id"]]["response"],
            references[p["prompt_id"]]["family"],
        )
        for p in prompts
    ]


def _experts(run_dir: Path, ids: list[str]) -> dict[str, str | None]:
    """Prompt id -> the member whose home families hold the prompt's family (None: nobody's)."""
    summary = json.loads((run_dir / DATA_DIR / "task.json").read_text())
    generated = summary["counts"]["per_participant"]
    # federation.data pairs the config's participants, in order, with the task's sorted ones
    home = {
        family: pid
        for pid, gen in zip(ids, sorted(generated), strict=True)
        for family in generated[gen]["home_families"]
    }
    return {p.prompt_id: home.get(p.family) for p in _public(run_dir)}


def _local(settings: ParticipantSettings, checkpoint: Path) -> LocalLearner:
    learner = build_learner(settings)
    if not isinstance(learner, LocalLearner):
        raise TypeError(f"{settings.participant_id}: the recorder needs a local model, not a black box")
    if isinstance(learner, TrainableLocalLearner) and not learner.load_checkpoint(checkpoint):
        raise FileNotFoundError(f"{settings.participant_id}: no checkpoint in {checkpoint}")
    return learner


@dataclass(frozen=True)
class Signals:
    """One stage's members (settings and checkpoints) and the signals that do not depend on the stage."""

    settings: dict[str, ParticipantSettings]
    checkpoints: dict[str, Path]
    generation: GenerationParams
    experts: dict[str, str | None]
    affinities: dict[str, list[float]]

    def answer(self, pid: str, public: list[PublicPrompt]) -> list[dict[str, Any]]:
        """The member's greedy answer to every public prompt, and the log-probability it would send."""
        learner = _local(self.settings[pid], self.checkpoints[pid])
        prompts = [(p.prompt_id, p.prompt) for p in public]
        answers = generate_answers(learner.lm, prompts, self.generation, batch_size=16)
        del learner
        gc.collect()
        return [{"text": a.text, "logprob": a.logprob} for a in answers]

    def score(
        self, pid: str, public: list[PublicPrompt], texts: dict[str, list[str]]
    ) -> dict[str, list[dict[str, float]]]:
        """Writer -> per prompt, this member's teacher-forced statistics of the writer's answer."""
        learner = _local(self.settings[pid], self.checkpoints[pid])
        result = {}
        for writer, answers in texts.items():
            examples = [Example(p.prompt, text or " ") for p, text in zip(public, answers, strict=True)]
            stats = token_stats(learner.lm, examples, self.settings[pid].train.max_length)
            result[writer] = [{"logprob": s.logprob, "self_certainty": s.self_certainty} for s in stats]
        del learner
        gc.collect()
        return result


def _step(path: Path, compute: Callable[[], Any]) -> Any:
    """The step's saved output, or compute and save it (a resumed recording skips finished steps)."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value))
    temporary.replace(path)
    return value
