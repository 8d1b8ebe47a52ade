"""Run the grid: each (task, seed, method) trains, is scored, and its result is saved at once.

A run whose result is already stored under the same fingerprint is skipped, so an interrupted grid
resumes where it stopped and loses at most the run in progress.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import hashlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from statistics import fmean

from bench.quality import junk
from bench.quality.grid import (
    CEILINGS,
    FEDERATED,
    RENAMED_METHODS,
    WARMUP,
    Grid,
    RunKey,
    fingerprint,
    method_config,
    seeded,
    with_junk_member,
)
from bench.quality.methods import (
    Trained,
    train_centralized,
    train_federated,
    train_local,
    train_oracle_labels,
    train_reference_labels,
    train_warmup,
)
from bench.quality.results import ParticipantScores, ResultStore, RunResult
from bench.quality.scoring import Scorer, checkpoint_dir, generation_subset, learner_description
from common.rouge import rouge_l
from federation.config import LoadedConfig
from participant.wiring import load_data

Say = Callable[[str], None]
OWN_DATA_PROMPTS = 16  # private prompts per member for the precondition (after the warm-up)
FIRST_NAMES = {new: old for old, new in RENAMED_METHODS.items()}


class GridRunner:
    def __init__(self, grid: Grid, work: Path, store: ResultStore, scorer: Scorer, say: Say = print) -> None:
        self.grid = grid
        self.work = work
        self.store = store
        self.scorer = scorer
        self.say = say

    def config(self, key: RunKey) -> LoadedConfig:
        base = seeded(self.grid.tasks[key.task], key.seed)
        if key.method == "junk_member":
            assert self.grid.junk_member is not None
            return with_junk_member(
                method_config(base, "junk_member", self.grid.shipped), self.grid.junk_member
            )
        if key.method == WARMUP:
            return base
        if key.method == "fedavg_refusal":
            return method_config(base, "fedavg", self.grid.shipped)
        return method_config(base, key.method, self.grid.shipped)

    def fingerprint(self, key: RunKey) -> str:
        extra: dict[str, object] = {
            # The name a method's results were first stored under: a rename reruns nothing.
            "method": FIRST_NAMES.get(key.method, key.method),
            "generation_prompts": self.grid.generation_prompts,
            "round_nll_prompts": self.grid.round_nll_prompts,
        }
        if key.method == "junk_member" and self.grid.junk_member is not None:
            extra["junk"] = self.grid.junk_member.fedavg_deadline_seconds
        if key.method == "fedavg_refusal" and self.grid.fedavg_refusal is not None:
            extra["deadline"] = self.grid.fedavg_refusal.deadline_seconds
        return fingerprint(self.config(key), extra)

    def run_all(self) -> list[RunResult]:
        keys = [k for k in self.grid.runs() if self._runnable(k)]
        todo = [k for k in keys if self.store.finished(k, self.fingerprint(k)) is None]
        self.say(
            f"{len(keys)} runs in the grid; {len(keys) - len(todo)} already finished, {len(todo)} to run"
        )
        # The ETA learns each method's duration from runs finished before, in this invocation or earlier.
        durations: dict[str, list[float]] = {}
        for finished in self.store.all():
            if finished.error is None and finished.seconds:
                durations.setdefault(finished.method, []).append(sum(finished.seconds.values()))
        for index, key in enumerate(todo, start=1):
            self.say(f"[{index}/{len(todo)}] {key.name} ...{self._eta(todo[index - 1 :], durations)}")
            started = time.perf_counter()
            result = self.run_one(key)
            spent = time.perf_counter() - started
            durations.setdefault(key.method, []).append(spent)
            release_memory()
            path = self.store.save(result)
            status = "FAILED: " + result.error if result.error else "done"
            self.say(f"[{index}/{len(todo)}] {key.name} {status} in {spent:.0f} s -> {path}")
        return [r for k in keys if (r := self.store.finished(k, self.fingerprint(k))) is not None]

    def _runnable(self, key: RunKey) -> bool:
        if key.method in CEILINGS and self.grid.tasks[key.task].run.task is None:
            return False  # own data: the public prompts have no references to train on
        return not (key.method == "shipped" and self.grid.shipped_problem)

    def _eta(self, remaining: list[RunKey], durations: dict[str, list[float]]) -> str:
        seen = [d for values in durations.values() for d in values]
        if not seen:
            return ""
        fallback = fmean(seen)
        eta = sum(fmean(durations[k.method]) if k.method in durations else fallback for k in remaining)
        return f" ({len(remaining)} left, ETA {eta / 60:.0f} min)"

    def run_one(self, key: RunKey) -> RunResult:
        """Train, score, gather evidence; any failure becomes the result's `error`, not the grid's end."""
        result = RunResult(task=key.task, seed=key.seed, method=key.method, fingerprint=self.fingerprint(key))
        try:
            self._train_and_score(key, result)
        except Exception as e:
            result.error = f"{type(e).__name__}: {e}"
        finally:
            gc.collect()
        return result

    def _train_and_score(self, key: RunKey, result: RunResult) -> None:
        config = self.config(key)
        run_dir = self.run_dir(key)
        warmup_dir = self.run_dir(RunKey(key.task, key.seed, WARMUP))
        shutil.rmtree(run_dir, ignore_errors=True)  # a rerun starts clean
        started = time.perf_counter()
        if key.method == "fedavg_refusal":
            assert self.grid.fedavg_refusal is not None
            result.extra["fedavg"] = junk.fedavg_refusal(
                config, run_dir, self.grid.fedavg_refusal.deadline_seconds
            )
            result.seconds["train"] = round(time.perf_counter() - started, 1)
            return
        if key.method == WARMUP:
            trained = train_warmup(config, run_dir)
        elif key.method == "local":
            trained = train_local(config, run_dir, warmup_dir)
        elif key.method == "centralized":
            trained = train_centralized(config, run_dir)
        elif key.method == "reference_labels":
            trained = train_reference_labels(config, run_dir, warmup_dir)
        elif key.method == "oracle_labels":
            trained = train_oracle_labels(config, run_dir, warmup_dir)
        else:
            assert key.method in (*FEDERATED, "junk_member"), key.method
            trained = train_federated(config, run_dir, warmup_dir)
        result.seconds["train"] = round(time.perf_counter() - started, 1)
        self._fill(result, trained)
        if trained.error is not None:
            return
        started = time.perf_counter()
        self._score(key, result, trained)
        result.seconds["score"] = round(time.perf_counter() - started, 1)
        junk_member = self.grid.junk_member
        if key.method == "junk_member" and junk_member is not None:
            refusal_dir = self.work / key.task / f"seed{key.seed}" / "junk_member_fedavg"
            result.extra["fedavg"] = junk.fedavg_refusal(
                method_config(config, "fedavg", self.grid.shipped),
                refusal_dir,
                junk_member.fedavg_deadline_seconds,
            )

    def run_dir(self, key: RunKey) -> Path:
        return self.work / key.task / f"seed{key.seed}" / key.method

    def _fill(self, result: RunResult, trained: Trained) -> None:
        result.rounds = trained.rounds
        result.test_sha256 = hashlib.sha256(trained.test_path.read_bytes()).hexdigest()
        result.test_prompts = len(trained.test)
        # The same seed: the round subset is the first prompts of the generation subset's draw.
        name = f"{result.task}:{result.seed}"
        result.subset = generation_subset(len(trained.test), self.grid.generation_prompts, name)
        size = min(self.grid.round_nll_prompts, self.grid.generation_prompts)
        result.round_subset = generation_subset(len(trained.test), size, name)
        result.bytes_up, result.bytes_down = trained.bytes_up, trained.bytes_down
        result.participant_rounds = trained.participant_rounds
        result.label_quality = trained.label_quality
        result.error = trained.error
        result.notes = trained.notes

    def _score(self, key: RunKey, result: RunResult, trained: Trained) -> None:
        if key.method == WARMUP:
            result.extra["own_data"] = self._own_data(trained)
        test = trained.test
        subset = [test[i] for i in result.round_subset]
        last = trained.rounds
        for pid, settings in trained.settings.items():
            scores = ParticipantScores(model=settings.model, learner=learner_description(settings))
            if key.method == WARMUP:
                scores.subset_nll_by_round = [
                    self.scorer.subset_nll(settings, checkpoint_dir(trained.run_dir, pid, 0), subset)
                ]
                result.participants[pid] = scores
                continue
            # Round 0 is the shared warm-up (scored in its own run) except for the centralized model.
            first = 1 if pid in trained.warm_started else 0
            by_round = [
                self.scorer.subset_nll(settings, checkpoint_dir(trained.run_dir, pid, r), subset)
                for r in range(first, last)
            ]
            final = self.scorer.final(
                settings, checkpoint_dir(trained.run_dir, pid, last), test, result.subset
            )
            scores.nll, scores.rouge_l, scores.embedding_similarity = (
                final.nll,
                final.rouge_l,
                final.embedding_similarity,
            )
            scores.subset_nll_by_round = [*by_round, fmean(final.nll[i] for i in result.round_subset)]
            if first == 1:
                scores.subset_nll_by_round.insert(0, self._warmup_subset_nll(key, pid))
            result.participants[pid] = scores

    def _own_data(self, trained: Trained) -> dict[str, dict[str, float]]:
        """The experiment's precondition, after the warm-up: per member, the mean ROUGE-L of its greedy
        answers to each member's private prompts (its own among them) against their references."""
        private = {
            pid: list(dict.fromkeys(load_data(settings)[0]))[:OWN_DATA_PROMPTS]
            for pid, settings in trained.settings.items()
        }
        table: dict[str, dict[str, float]] = {}
        for pid, settings in trained.settings.items():
            checkpoint = checkpoint_dir(trained.run_dir, pid, 0)
            table[pid] = {
                owner: fmean(
                    rouge_l(answer, example.response)
                    for answer, example in zip(
                        self.scorer.greedy(settings, checkpoint, examples), examples, strict=True
                    )
                )
                for owner, examples in private.items()
                if examples
            }
        return table

    def _warmup_subset_nll(self, key: RunKey, pid: str) -> float:
        warm_key = RunKey(key.task, key.seed, WARMUP)
        warm = self.store.finished(warm_key, self.fingerprint(warm_key))
        if warm is None or pid not in warm.participants:
            return float("nan")
        return warm.participants[pid].subset_nll_by_round[0]


def release_memory() -> None:
    """Hand freed memory back to the OS after a run.

    Every run loads and frees several models; glibc keeps the freed heap, and one process running the
    whole grid grew by gigabytes without a live model to show for it.
    """
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is not None:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
