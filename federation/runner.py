"""Run a whole federation in one process: the coordinator and every participant, on one broker.

The broker is chosen in `federation.brokers`, each service's settings come from
`federation.settings`, the data from `federation.data`; this module loads the models, warms the
members up and scores them (round 0, the baseline), drives the rounds, one participant's model work
at a time when the config asks for it, and with `--compare local` trains each member's local-only
twin (`federation.local`) from the same warm-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import structlog

from common.embedding import Embedder
from coordinator.prompts import load_prompts
from coordinator.replay.recording import with_recording
from coordinator.service import Coordinator, build_coordinator
from coordinator.settings import ConsensusSettingsTable, CoordinatorSettings, SettingsError
from coordinator.store import CoordinatorStore
from coordinator.wiring import build_embedder
from federation.brokers import BrokerPlan, plan_broker
from federation.config import LoadedConfig, RunConfigError
from federation.data import DataPaths, prepare_data
from federation.local import train_local_rounds
from federation.observe import ObservedTransport
from federation.report import Baseline, Reporter
from federation.settings import STATE_DIR, coordinator_settings, participant_settings
from participant.data import Example
from participant.learner import EvaluatingLearner, Learner, trainer
from participant.service import Participant
from participant.wiring import build_learner, load_data
from schemas.errors import ChorusError
from schemas.messages import GenerationParams

log = structlog.get_logger(__name__)

POLL_SECONDS = 0.25
FINISH_TIMEOUT_SECONDS = 600.0  # after the last round closes: participants train, evaluate, report


class StopRequested(ChorusError):
    """The run is stopping; queued model work is skipped."""


@dataclass(frozen=True)
class RunOptions:
    results: Path
    broker: str = "memory"  # "memory", "local", or an amqp:// URL for the coordinator
    rounds: int | None = None  # overrides the config
    broker_dir: Path | None = None  # with amqp://: a chorus-broker node dir to create participant users in
    # participant id -> an adapter checkpoint it starts from instead of warming up (bench/quality/methods.py
    # gives every method the same warm-up this way)
    warm_start: Mapping[str, Path] = field(default_factory=dict)
    compare: str | None = None  # "local": after the run, each trainable member's local-only twin


# ---- compute: one participant at a time, and what each phase cost --------------------------------


@dataclass
class Phases:
    """Who is doing what now, and seconds spent per (participant, phase); shared by all threads."""

    current: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    compute: threading.Lock | None = None
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self, pid: str, phase: str, work: Callable[[], Any]) -> Any:
        if self.stopping.is_set():
            raise StopRequested(f"{pid}: run stopping; {phase} skipped")
        self.current[pid] = f"waiting to {phase}"
        with self.compute or contextlib.nullcontext():
            if self.stopping.is_set():
                self.current[pid] = "stopped"
                raise StopRequested(f"{pid}: run stopping; {phase} skipped")
            self.current[pid] = phase
            started = time.perf_counter()
            try:
                return work()
            finally:
                spent = self.seconds.setdefault(pid, {})
                spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - started
                self.current[pid] = "idle"


class TrackedLearner:
    """A participant's learner, timed per phase, evaluated with the run's generation parameters. It has
    exactly the methods the learner has, so the participant service sees the same capabilities (a
    black box stays one that does not train)."""

    def __init__(self, pid: str, inner: Learner, phases: Phases, evaluation: GenerationParams) -> None:
        self.pid = pid
        self.inner = inner
        self.phases = phases
        self.evaluation = evaluation
        self.model_id = inner.model_id

    def generate(self, prompts: Any, params: GenerationParams) -> Any:
        return self.phases.run(self.pid, "generate", lambda: self.inner.generate(prompts, params))

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copying, unpickling): no inner learner to ask
            raise AttributeError(name)
        found = getattr(self.inner, name)  # AttributeError when the learner lacks it: capabilities show
        if name == "train":
            return lambda examples: self.phases.run(self.pid, "train", lambda: found(examples))
        if name == "evaluate":

            def evaluate(test: Sequence[Example], embed: Any, params: GenerationParams | None = None) -> Any:
                chosen = params or self.evaluation
                return self.phases.run(self.pid, "evaluate", lambda: found(test, embed, chosen))

            return evaluate
        return found  # checkpoints, adapters: not timed phases


def track(pid: str, inner: Learner, phases: Phases, evaluation: GenerationParams) -> Learner:
    """Wrap a learner for the run, keeping what it can do visible to the participant service."""
    return cast("Learner", TrackedLearner(pid, inner, phases, evaluation))


# ---- the run --------------------------------------------------------------------------------------


class FederationRun:
    """Compose and drive one run; `request_stop()` (SIGINT) stops it cleanly with what finished."""

    def __init__(self, config: LoadedConfig, options: RunOptions, reporter: Reporter) -> None:
        self.config = config
        self.options = options
        self.reporter = reporter
        self.rounds = options.rounds or config.run.rounds
        self.phases = Phases(compute=threading.Lock() if config.run.serialize_compute else None)
        self.coordinator: Coordinator | None = None
        self.participants: list[Participant] = []
        self.stopping = asyncio.Event()
        self.interrupted = False

    def request_stop(self) -> None:
        if self.stopping.is_set():
            return
        self.interrupted = True
        self.stopping.set()
        self.phases.stopping.set()
        self.reporter.note("stopping: finishing the step in flight (Ctrl-C again to abort)")
        if self.coordinator is not None:
            self.coordinator.request_stop()
        for participant in self.participants:
            participant.request_stop()

    async def run(self) -> None:
        results = self.options.results
        results.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(results / STATE_DIR, ignore_errors=True)  # a run starts fresh
        unknown = sorted(set(self.options.warm_start) - {p.id for p in self.config.run.participants})
        if unknown:
            raise RunConfigError(f"warm_start names participants not in {self.config.path}: {unknown}")
        for pid, checkpoint in self.options.warm_start.items():
            # the participant restores its newest checkpoint on start; round 0 is the warm-up's
            shutil.copytree(checkpoint, results / STATE_DIR / pid / "checkpoints" / "round-0")
        for stale in ("rounds.jsonl", "summary.json"):
            (results / stale).unlink(missing_ok=True)
        reporter = self.reporter
        if self.config.run.torch_threads:
            import torch

            torch.set_num_threads(self.config.run.torch_threads)
        with reporter.phase("data"):
            data = await asyncio.to_thread(prepare_data, self.config, results)
        with reporter.phase("models"):
            learners, datasets, embedder = await asyncio.to_thread(self._load, data, results)
        with reporter.phase("warm-up"):
            baseline = await asyncio.to_thread(self._warm_up, data, learners, datasets, embedder)
        if baseline:
            reporter.show_baseline(baseline)
        settings = coordinator_settings(self.config, data, results, self.rounds, "memory://")
        plan = plan_broker(self.options.broker, self.options.broker_dir, self.config, results, reporter.note)
        reporter.start_rounds(plan.description)
        try:
            await self._federate(settings, plan, data, learners, datasets, embedder)
        finally:
            await asyncio.to_thread(plan.close)
        if self.options.compare == "local" and not self.stopping.is_set():
            reporter.stop_status()
            with reporter.phase("compare"):
                reporter.compare = await asyncio.to_thread(
                    self._compare_local, data, learners, datasets, embedder
                )

    def _warmup_checkpoint(self, pid: str) -> Path:
        return self.options.results / STATE_DIR / pid / "checkpoints" / "round-0"

    def _warm_up(
        self,
        data: DataPaths,
        learners: dict[str, Learner],
        datasets: dict[str, tuple[list[Example], list[Example]]],
        embedder: Embedder,
    ) -> Baseline:
        """Round 0: each trainable member warmed up on its private data, as its participant would on
        start, and checkpointed where the participant restores it from (so it does not warm up again,
        and `--compare local` starts its twin there); then each member with test data scored."""
        baseline: Baseline = {}
        for entry in self.config.run.participants:
            if self.stopping.is_set():
                raise StopRequested("stopped while warming up")
            learner, (private, test) = learners[entry.id], datasets[entry.id]
            settings = participant_settings(self.config, entry, data, self.options.results)
            checkpoint = self._warmup_checkpoint(entry.id)
            trains = trainer(learner)
            if trains is not None and entry.id in self.options.warm_start:
                trains.load_checkpoint(checkpoint)
            elif trains is not None:
                if private and settings.train.warmup_epochs:
                    trains.train(private * settings.train.warmup_epochs)
                trains.save_checkpoint(checkpoint)
            if test and settings.evaluate and isinstance(learner, EvaluatingLearner):
                baseline[entry.id] = learner.evaluate(test, embedder.embed)
        return baseline

    def _compare_local(
        self,
        data: DataPaths,
        learners: dict[str, Learner],
        datasets: dict[str, tuple[list[Example], list[Example]]],
        embedder: Embedder,
    ) -> dict[str, dict[str, Any]]:
        """Each trainable, evaluated member's local-only twin (federation.local): from the same warm-up,
        the same private slices for as many rounds as the member was scored after; both scores."""
        out: dict[str, dict[str, Any]] = {}
        for entry in self.config.run.participants:
            learner, (private, test) = learners[entry.id], datasets[entry.id]
            federated = self.reporter.last_scores(entry.id)
            checkpoint = self._warmup_checkpoint(entry.id)
            trains = trainer(learner)
            if federated is None or trains is None or not isinstance(learner, EvaluatingLearner):
                continue
            if not test or not checkpoint.is_dir():
                continue
            if self.stopping.is_set():
                break
            round_id, scores = federated
            self.reporter.note(f"{entry.id}: local-only twin, rounds 1-{round_id}")
            settings = participant_settings(self.config, entry, data, self.options.results)
            if not trains.load_checkpoint(checkpoint):
                raise ChorusError(f"{entry.id}: cannot load its warm-up checkpoint {checkpoint}")
            train_local_rounds(trains, private, settings.train, range(1, round_id + 1))
            local = learner.evaluate(test, embedder.embed)
            out[entry.id] = {
                "rounds": round_id,
                "federated": scores,
                "local": local,
                # federated minus local-only: what the federation added
                "difference": {k: round(v - local[k], 4) for k, v in scores.items() if k in local},
            }
        return out

    def _load(
        self, data: DataPaths, results: Path
    ) -> tuple[dict[str, Learner], dict[str, tuple[list[Example], list[Example]]], Embedder]:
        run = self.config.run
        embedder = build_embedder(ConsensusSettingsTable(embedder=run.embedder))
        learners: dict[str, Learner] = {}
        datasets = {}
        for entry in run.participants:
            if self.stopping.is_set():
                raise StopRequested("stopped while loading models")
            self.reporter.note(f"loading {entry.learner or entry.model} for {entry.id}")
            settings = participant_settings(self.config, entry, data, results)
            learners[entry.id] = track(entry.id, build_learner(settings), self.phases, run.generation)
            datasets[entry.id] = load_data(settings)
            if not datasets[entry.id][1]:
                self.reporter.note(f"{entry.id}: no test_data, so it is not evaluated (its scores show as -)")
        return learners, datasets, embedder

    async def _federate(
        self,
        settings: CoordinatorSettings,
        plan: BrokerPlan,
        data: DataPaths,
        learners: dict[str, Learner],
        datasets: dict[str, tuple[list[Example], list[Example]]],
        embedder: Embedder,
    ) -> None:
        store = CoordinatorStore(settings.state_path)
        try:
            async with contextlib.AsyncExitStack() as stack:
                coordinator_transport = await stack.enter_async_context(
                    with_recording(ObservedTransport(plan.coordinator(), self.reporter.observe), settings)
                )
                self.coordinator = build_coordinator(
                    settings,
                    coordinator_transport,
                    store=store,
                    prompts=load_prompts(data.prompts),
                    embedder=embedder if settings.consensus.embedder == self.config.run.embedder else None,
                )
                await self.coordinator.start()
                for entry in self.config.run.participants:
                    transport = await stack.enter_async_context(
                        ObservedTransport(plan.participants[entry.id](), self.reporter.observe)
                    )
                    train, test = datasets[entry.id]
                    psettings = participant_settings(self.config, entry, data, self.options.results)
                    self.participants.append(
                        Participant(
                            psettings,
                            transport,
                            learners[entry.id],
                            private_train=train,
                            test=test,
                            embed=embedder.embed,
                        )
                    )
                if self.stopping.is_set():
                    self.request_stop_all()
                await self._drive()
                await self.coordinator.stop_intake()
        finally:
            self.reporter.flush(final=True)
            store.close()

    def request_stop_all(self) -> None:
        assert self.coordinator is not None
        self.coordinator.request_stop()
        for participant in self.participants:
            participant.request_stop()

    async def _drive(self) -> None:
        coordinator = self.coordinator
        assert coordinator is not None
        runs = {asyncio.create_task(p.run_until(self.rounds)): p.pid for p in self.participants}
        drive = asyncio.create_task(coordinator.drive())
        pending: set[asyncio.Task[None]] = {drive, *runs}
        finished_at: float | None = None
        try:
            while pending:
                done, pending = await asyncio.wait(pending, timeout=POLL_SECONDS)
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        error = task.exception()
                        if isinstance(error, StopRequested) and self.stopping.is_set():
                            continue
                        who = runs.get(task, "coordinator")
                        self.request_stop()
                        raise ChorusError(f"{who} failed: {error}") from error
                self.reporter.poll(self.phases)
                if drive.done() and finished_at is None:
                    finished_at = time.monotonic()
                if finished_at is not None and time.monotonic() - finished_at > FINISH_TIMEOUT_SECONDS:
                    self.reporter.note("participants did not finish the last round in time; stopping them")
                    self.request_stop()
                    finished_at = float("inf")
        finally:
            for task in pending:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.gather(*pending, return_exceptions=True)


def check_options(options: RunOptions) -> None:
    if options.rounds is not None and options.rounds < 1:
        raise SettingsError(f"--rounds must be at least 1, got {options.rounds}")
