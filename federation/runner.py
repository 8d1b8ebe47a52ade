"""Run a whole federation in one process: the coordinator and every participant, on one broker.

Brokers: the embedded `MemoryBroker` (default); `local`, a RabbitMQ node started
in `<results>/rabbitmq` the way `chorus-broker up` starts one (participant users
with least privilege), stopped at the end; or `amqp://...`, an existing broker
whose participant users exist already (each `[[participants]]` entry names its
own `broker_url`) or are created in the local node directory given as `broker_dir`.
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
from typing import Any

import msgspec
import structlog

from broker.topology import COORDINATOR_USER, full_topology
from broker.transport import Transport
from common.embedding import Embedder
from coordinator.prompts import load_prompts
from coordinator.replay.recording import with_recording
from coordinator.service import Coordinator
from coordinator.settings import ConsensusSettingsTable, CoordinatorSettings, SettingsError
from coordinator.store import CoordinatorStore
from coordinator.strategies import build_round_strategy
from coordinator.wiring import build_embedder
from federation.config import LoadedConfig, ParticipantEntry, RunConfigError
from federation.data import DataPaths, prepare_data
from federation.observe import ObservedTransport
from federation.report import Reporter
from participant.data import Example
from participant.learner import AdapterLearner, AdapterState, Learner
from participant.service import Participant
from participant.settings import ParticipantSettings
from participant.training import TrainStats
from participant.wiring import build_learner, load_data
from schemas.errors import ChorusError
from schemas.messages import GenerationParams

log = structlog.get_logger(__name__)

STATE_DIR = "state"
NODE_DIR = "rabbitmq"
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
    # participant id -> an adapter checkpoint it starts from instead of warming up (bench/quality.py
    # gives every method the same warm-up this way)
    warm_start: Mapping[str, Path] = field(default_factory=dict)


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
    """A participant's learner, timed per phase, evaluated with the run's generation parameters."""

    def __init__(self, pid: str, inner: Learner, phases: Phases, evaluation: GenerationParams) -> None:
        self.pid = pid
        self.inner = inner
        self.phases = phases
        self.evaluation = evaluation
        self.model_id = inner.model_id
        self.can_train = inner.can_train

    def generate(self, prompts: Any, params: GenerationParams) -> Any:
        return self.phases.run(self.pid, "generate", lambda: self.inner.generate(prompts, params))

    def train(self, examples: Sequence[Example]) -> TrainStats | None:
        result: TrainStats | None = self.phases.run(self.pid, "train", lambda: self.inner.train(examples))
        return result

    def save_checkpoint(self, directory: Path) -> None:
        self.inner.save_checkpoint(directory)

    def load_checkpoint(self, directory: Path) -> bool:
        return self.inner.load_checkpoint(directory)

    def evaluate(
        self, test: Sequence[Example], embed: Any, params: GenerationParams | None = None
    ) -> dict[str, float]:
        chosen = params or self.evaluation
        result: dict[str, float] = self.phases.run(
            self.pid, "evaluate", lambda: self.inner.evaluate(test, embed, chosen)
        )
        return result


class TrackedAdapterLearner(TrackedLearner):
    """A tracked learner that can also do FedAvg; reading or loading its adapter is not a timed phase."""

    def __init__(self, pid: str, inner: AdapterLearner, phases: Phases, evaluation: GenerationParams) -> None:
        super().__init__(pid, inner, phases, evaluation)
        self.adapter_inner = inner

    def adapter_state(self) -> AdapterState:
        return self.adapter_inner.adapter_state()

    def load_adapter_state(self, state: AdapterState) -> None:
        self.adapter_inner.load_adapter_state(state)


def track(pid: str, inner: Learner, phases: Phases, evaluation: GenerationParams) -> TrackedLearner:
    """Wrap a learner for the run, keeping its FedAvg capability visible to the participant service."""
    if isinstance(inner, AdapterLearner):
        return TrackedAdapterLearner(pid, inner, phases, evaluation)
    return TrackedLearner(pid, inner, phases, evaluation)


# ---- settings -------------------------------------------------------------------------------------


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
        return msgspec.convert(raw, CoordinatorSettings)
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
        state_dir=str(results / STATE_DIR / entry.id),
        private_data=None if train is None else str(train),
        test_data=None if test is None else str(test),
        generation_batch_size=entry.generation_batch_size,
        heartbeat_seconds=5.0,
        progress=False,  # the runner shows what each participant does; bars would garble the table
        train=entry.train or config.run.train,
    )


# ---- brokers --------------------------------------------------------------------------------------


@dataclass
class BrokerPlan:
    coordinator: Callable[[], Transport]
    participants: dict[str, Callable[[], Transport]]
    description: str
    close: Callable[[], None] = lambda: None


def plan_broker(
    options: RunOptions, config: LoadedConfig, results: Path, on_node: Callable[[str], None]
) -> BrokerPlan:
    ids = [p.id for p in config.run.participants]
    if options.broker == "memory":
        from broker.memory import MemoryBroker

        memory = MemoryBroker()
        memory.declare(full_topology(ids))
        return BrokerPlan(
            coordinator=lambda: memory.connect(COORDINATOR_USER),
            participants={pid: (lambda pid=pid: memory.connect(pid)) for pid in ids},  # type: ignore[misc]
            description="embedded memory broker",
        )
    from broker.connect import open_transport

    if options.broker == "local":
        from broker.cli import bring_up
        from broker.local_node import LocalNode

        node_dir = results / NODE_DIR
        if (node_dir / "node.json").is_file():
            with contextlib.suppress(ChorusError):
                LocalNode.existing(node_dir).stop()
        shutil.rmtree(node_dir, ignore_errors=True)
        on_node(f"starting a local RabbitMQ node in {node_dir}")
        node, passwords = bring_up(node_dir, participants=ids)
        coordinator_url = node.coordinator_url
        urls = {pid: node.url_for(pid, passwords[pid]) for pid in ids}
        description = f"local RabbitMQ node {node.display_url()}"
        close: Callable[[], None] = node.stop
    elif options.broker.startswith(("amqp://", "amqps://")):
        coordinator_url = options.broker
        urls = _participant_urls(options, config)
        description = f"RabbitMQ at {_masked(options.broker)}"
        close = lambda: None  # noqa: E731 - someone else's broker
    else:
        raise RunConfigError(f"--broker must be memory, local or amqp://..., got {options.broker!r}")
    return BrokerPlan(
        coordinator=lambda: open_transport(coordinator_url, connection_name="chorus-run-coordinator"),
        participants={
            pid: (lambda pid=pid: open_transport(urls[pid], user=pid, connection_name=f"chorus-run-{pid}"))  # type: ignore[misc]
            for pid in ids
        },
        description=description,
        close=close,
    )


def _participant_urls(options: RunOptions, config: LoadedConfig) -> dict[str, str]:
    given = {p.id: p.broker_url for p in config.run.participants if p.broker_url}
    missing = [p.id for p in config.run.participants if p.id not in given]
    if not missing:
        return given
    if options.broker_dir is None:
        raise RunConfigError(
            f"with --broker amqp://..., every participant needs its own broker user: give broker_url = "
            f'"amqp://ID:PASSWORD@HOST:PORT/VHOST" in its [[participants]] entry (create users with '
            f"`chorus-broker add-participant ID`), or pass --broker-dir DIR of a chorus-broker node to "
            f"create them there (missing: {', '.join(missing)})"
        )
    from broker.local_node import LocalNode

    node = LocalNode.existing(options.broker_dir)
    passwords = node.add_participants(dict.fromkeys(missing))
    return given | {pid: node.url_for(pid, passwords[pid]) for pid in missing}


def _masked(url: str) -> str:
    head, at, tail = url.partition("@")
    if not at:
        return url
    scheme, _, credentials = head.partition("://")
    return f"{scheme}://{credentials.split(':')[0]}:***@{tail}"


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
        settings = coordinator_settings(self.config, data, results, self.rounds, "memory://")
        plan = plan_broker(self.options, self.config, results, reporter.note)
        reporter.start_rounds(plan.description)
        try:
            await self._federate(settings, plan, data, learners, datasets, embedder)
        finally:
            await asyncio.to_thread(plan.close)

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
            self.reporter.note(f"loading {entry.model} for {entry.id}")
            settings = participant_settings(self.config, entry, data, results)
            learners[entry.id] = track(entry.id, build_learner(settings), self.phases, run.generation)
            datasets[entry.id] = load_data(settings)
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
            strategy = build_round_strategy(
                settings,
                store,
                load_prompts(data.prompts),
                embedder if settings.consensus.embedder == self.config.run.embedder else None,
            )
            async with contextlib.AsyncExitStack() as stack:
                coordinator_transport = await stack.enter_async_context(
                    with_recording(ObservedTransport(plan.coordinator(), self.reporter.observe), settings)
                )
                self.coordinator = Coordinator(settings, coordinator_transport, store, strategy)
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
