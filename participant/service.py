"""The participant service: answers rounds, learns from pseudo-labels, reports.

Handles its reply queue in order: RoundOpened -> generate and publish one
GenerationBatch per shard; PseudoLabels -> keep the labels; RoundClosed ->
train on labels mixed with private data, checkpoint, evaluate, report.
FedAvg rounds: train locally, upload the adapter, load the average. A round of a strategy it does
not know (ROUND_ROLES): sent nothing, trained nothing, said so in the log and the round's report.
Torch work runs in a worker thread, so heartbeats and acks keep flowing.
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import structlog

from broker.topology import UP_EXCHANGE, control_key, generation_key, reply_queue
from broker.transport import Delivery, Subscription, Transport
from participant.data import Example
from participant.evaluation import Embedder
from participant.label_weights import label_example_weight
from participant.leak_guard import LeakGuard
from participant.learner import (
    AdapterLearner,
    EvaluatingLearner,
    Learner,
    LearnerError,
    TrainableLearner,
    TrainStats,
    trainer,
)
from participant.ledger import ParticipantLedger
from participant.metrics import ParticipantMetrics
from participant.settings import ParticipantSettings
from schemas.codec import decode_reply, encode
from schemas.errors import SchemaError
from schemas.ids import adapter_update_id, batch_id, report_id
from schemas.messages import (
    AdapterUpdate,
    AggregatedAdapter,
    Answer,
    GenerationBatch,
    Heartbeat,
    Join,
    Message,
    ParticipantReport,
    PseudoLabels,
    RoundClosed,
    RoundOpened,
    new_message_id,
)

log = structlog.get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^round-(\d+)$")
# What each announced strategy (RoundOpened.strategy, PROTOCOL.md §5.4) asks of a member: "answer" the
# prompts and train on the labels, or train and send an "adapter". A round of any other is sat out.
ROUND_ROLES: dict[str, Literal["answer", "adapter"]] = {
    "semantic": "answer",
    "majority": "answer",
    "fedavg": "adapter",
}
# The report metric that says a round was sat out because its strategy is unknown here.
UNKNOWN_STRATEGY_METRIC = "unknown_strategy"
# The report metric with the privacy budget spent so far, for a member with [train.privacy].
DP_EPSILON_METRIC = "dp_epsilon"
# The Join is sent again after this many seconds, then twice as long each time (up to heartbeat_seconds),
# until a RoundOpened expects this participant (PROTOCOL.md §5.3).
JOIN_RESEND_SECONDS = 1.0


class Participant:
    def __init__(
        self,
        settings: ParticipantSettings,
        transport: Transport,
        learner: Learner,
        *,
        private_train: Sequence[Example] = (),
        test: Sequence[Example] = (),
        embed: Embedder | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.transport = transport
        self.learner = learner
        self.private_train = list(private_train)
        self.test = list(test)
        self.embed = embed
        self.clock = clock
        self.state_dir = Path(settings.state_dir)
        self.ledger = ParticipantLedger(self.state_dir / "participant.sqlite3")
        self.rounds_done: list[int] = []  # rounds whose labels (or adapter) were applied in this process
        self.reports: list[ParticipantReport] = []
        self.round_seen = asyncio.Event()
        self.federation_ended = False  # a final RoundClosed was handled
        self._model_lock = asyncio.Lock()  # one torch job at a time: generation and training share weights
        self._subscription: Subscription | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._rejoin: asyncio.Task[None] | None = None
        self._admitted = asyncio.Event()  # a RoundOpened listed us in `expected`: the Join got through
        self._stopping = asyncio.Event()
        self._fedavg_rounds: set[int] = set()
        self._sat_out: set[int] = set()  # rounds of a strategy this participant does not know
        self._roles = {"answer": self._answer, "adapter": self._adapter_round}
        self.metrics = ParticipantMetrics()
        self._leak_guard: LeakGuard | None = None  # built from the private examples on first use
        self._withheld: dict[int, int] = {}  # round -> answers the leak guard withheld, for its report
        self._epsilon: float | None = None  # with [train.privacy]: the budget spent, reported each round

    @property
    def pid(self) -> str:
        return self.settings.participant_id

    @property
    def _trainer(self) -> TrainableLearner | None:
        """The learner, if it trains; None when it only answers (a black box, a frozen model)."""
        return trainer(self.learner)

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Serve metrics (when enabled), restore the last checkpoint, warm up on private data if new,
        subscribe, join."""
        # First, so that /healthz answers during a long warm-up.
        await self.metrics.serve(
            self.settings.metrics,
            self.transport.is_connected,
            self.metrics.health_facts,
            service=f"participant {self.pid}",
        )
        try:
            await self._start()
        except BaseException:
            await self.metrics.stop_serving()
            raise

    async def _start(self) -> None:
        restored = await asyncio.to_thread(self._restore_checkpoint)
        await asyncio.to_thread(self._guard)
        self.metrics.started(self.ledger.last_applied_round())
        if (
            restored is None
            and self._trainer is not None
            and self.private_train
            and self.settings.train.warmup_epochs
        ):
            await self._warm_up()
        # prefetch 1: replies are handled strictly in order, one at a time (a RoundClosed must not
        # race the PseudoLabels or AggregatedAdapter before it).
        self._subscription = await self.transport.consume(reply_queue(self.pid), self._on_reply, prefetch=1)
        join = Join(
            federation=self.settings.federation,
            round_id=self.ledger.last_applied_round(),
            message_id=new_message_id(),
            participant_id=self.pid,
            model_id=self.learner.model_id[:256],
            can_train=self._trainer is not None,
        )
        await self._publish_control(join)
        self._heartbeat = asyncio.create_task(self._beat())
        self._rejoin = asyncio.create_task(self._join_until_admitted(join))
        log.info(
            "participant_joined", participant=self.pid, model=self.learner.model_id, restored_round=restored
        )

    async def stop(self) -> None:
        """Stop intake; a delivery being handled finishes first (it holds the model lock)."""
        self._stopping.set()
        for task in (self._heartbeat, self._rejoin):
            if task is not None:
                task.cancel()
        try:
            if self._subscription is not None:
                await self._subscription.cancel()
            async with self._model_lock:
                self.ledger.close()
        finally:
            await self.metrics.stop_serving()

    async def run_until(self, rounds: int | None = None) -> None:
        """Serve until `rounds` rounds were applied in this process, or until stopped."""
        await self.start()
        try:
            while not self._stopping.is_set():
                if self.federation_ended or (rounds is not None and len(self.rounds_done) >= rounds):
                    return
                self.round_seen.clear()
                stop = asyncio.create_task(self._stopping.wait())
                seen = asyncio.create_task(self.round_seen.wait())
                await asyncio.wait({stop, seen}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                seen.cancel()
        finally:
            await self.stop()

    def request_stop(self) -> None:
        self._stopping.set()

    async def _join_until_admitted(self, join: Join) -> None:
        """Send the same `join` again, waiting longer each time, until a RoundOpened expects us: another
        member's flood can push a Join out of the coordinator's lobby, and a repeated one changes nothing."""
        wait = JOIN_RESEND_SECONDS
        while True:
            try:
                await asyncio.wait_for(self._admitted.wait(), wait)
                return
            except TimeoutError:
                pass
            try:
                await self._publish_control(join)
            except Exception as e:  # counted in publish_errors; the next try may pass
                log.warning("join_not_sent", participant=self.pid, error=repr(e), retry_seconds=wait)
            wait = min(2 * wait, self.settings.heartbeat_seconds)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            await self._publish_control(
                Heartbeat(
                    federation=self.settings.federation,
                    round_id=self.ledger.last_applied_round(),
                    message_id=new_message_id(),
                    participant_id=self.pid,
                    sent_unix=self.clock(),
                )
            )

    # -- checkpoints -------------------------------------------------------

    def _checkpoint_dir(self, round_id: int) -> Path:
        return self.state_dir / "checkpoints" / f"round-{round_id}"

    def _checkpoint_rounds(self) -> list[int]:
        """The rounds that have a checkpoint, in order."""
        root = self.state_dir / "checkpoints"
        if not root.is_dir():
            return []
        names = (CHECKPOINT_PATTERN.match(p.name) for p in root.glob("round-*"))
        return sorted(int(m.group(1)) for m in names if m)

    def _restore_checkpoint(self) -> int | None:
        """Load the newest checkpoint; its round counts as applied even if the ledger missed it."""
        if self._trainer is None:
            return None
        for round_id in reversed(self._checkpoint_rounds()):
            if self._trainer.load_checkpoint(self._checkpoint_dir(round_id)):
                if round_id and not self.ledger.was_applied(round_id):
                    self.ledger.mark_applied(round_id, {})
                return round_id
        return None

    async def _warm_up(self) -> None:
        learner = self._trainer
        assert learner is not None  # _start warms up only a learner that trains
        async with self._model_lock:
            settings = self.settings.train
            examples = self.private_train * settings.warmup_epochs
            stats = self._trained(await asyncio.to_thread(learner.train, examples))
            await asyncio.to_thread(learner.save_checkpoint, self._checkpoint_dir(0))
        log.info("warm_up", participant=self.pid, samples=getattr(stats, "samples", 0))

    # -- replies -----------------------------------------------------------

    async def _on_reply(self, delivery: Delivery) -> None:
        try:
            message = decode_reply(delivery.body)
        except SchemaError as e:
            log.warning("bad_reply", participant=self.pid, reason=str(e))
            await delivery.dead_letter(f"participant {self.pid}: {e}")
            return
        if message.federation != self.settings.federation:
            await delivery.dead_letter(
                f"participant {self.pid}: federation {message.federation!r} is not ours"
            )
            return
        key = f"{message.message_id}@{message.round_id}"
        if isinstance(message, RoundOpened):
            await self._enter_run(message, key)
        if self.ledger.was_handled(key):
            if isinstance(message, RoundOpened):  # never skip a round in silence
                log.warning(
                    "round_already_handled",
                    round=message.round_id,
                    participant=self.pid,
                    run=message.announced_run(),
                    state_dir=str(self.state_dir),
                    hint="a redelivery after a restart; if the coordinator's state is new and it announces "
                    "no run_id, this round is not answered: give this participant a fresh state_dir",
                )
            await delivery.ack()  # a redelivery of something already handled
            return
        # Handlers are idempotent (answered/applied flags, stable message ids), so a crash
        # anywhere before mark_handled just means the redelivery does the work again.
        await self._handle(message)
        self.ledger.mark_handled(key)
        await delivery.ack()
        if isinstance(message, RoundClosed) and message.final:
            self.federation_ended = True  # applied and reported: nothing more will come
            self.round_seen.set()

    # -- federation runs ---------------------------------------------------

    async def _enter_run(self, opened: RoundOpened, key: str) -> None:
        """Before an announcement is looked up: if it is of a run this state holds nothing of, start
        that run afresh. Round ids begin again at 1 in a new run (a new coordinator state), so the old
        run's ledger would take the new rounds for ones already handled."""
        announced = opened.announced_run()
        if announced is None:
            return  # a coordinator that names no run: rounds are taken as the ledger's (PROTOCOL §7.2)
        held = self.ledger.run_id()
        if held == announced:
            return
        if held is None and not self.ledger.knows_round(opened.round_id, key):
            # A fresh ledger, or one from before run ids whose rounds this one carries on: the same run.
            self.ledger.adopt_run(announced)
            return
        await self._start_run(announced, held, opened.round_id)

    async def _start_run(self, run_id: str, previous: str | None, round_id: int) -> None:
        """Archive the previous run's ledger and round checkpoints under state_dir/runs/, start the
        ledger afresh, and go back to the warm-up model (round 0) when there is one."""
        archive = self.state_dir / "runs" / (previous or f"before-{run_id}")
        async with self._model_lock:
            # Checkpoints first: a crash before the ledger restarts leaves the old run's ledger, which
            # the next announcement restarts again; never a new ledger beside an old run's checkpoint.
            moved = await asyncio.to_thread(self._archive_round_checkpoints, archive / "checkpoints")
            self.ledger.start_run(run_id, archive / "participant.sqlite3")
            self._fedavg_rounds.clear()
            self._sat_out.clear()
            model = await asyncio.to_thread(self._model_for_new_run, moved)
        self.metrics.started(0)
        log.warning(
            "run_changed",
            participant=self.pid,
            state_dir=str(self.state_dir),
            previous_run=previous,
            run=run_id,
            round=round_id,
            archived=str(archive),
            archived_rounds=moved,
            model=model,
            hint="the coordinator's state is new (a re-run): this participant's rounds start afresh",
        )

    def _archive_round_checkpoints(self, into: Path) -> list[int]:
        """Move every round's checkpoint but the warm-up (round 0) into `into`; the rounds moved."""
        moved = []
        for round_id in self._checkpoint_rounds():
            if round_id == 0:
                continue
            target = into / f"round-{round_id}"
            if target.exists():  # left by an archiving that a crash interrupted
                shutil.rmtree(target)
            into.mkdir(parents=True, exist_ok=True)
            self._checkpoint_dir(round_id).rename(target)
            moved.append(round_id)
        return moved

    def _model_for_new_run(self, moved: list[int]) -> str:
        """Load the warm-up checkpoint for a new run; without one, keep (and checkpoint as round 0) the
        model trained in the previous run, so that a restart resumes this same model."""
        learner = self._trainer
        if learner is None:
            return "unchanged (never trained)"
        if learner.load_checkpoint(self._checkpoint_dir(0)):
            return "warm-up checkpoint (round 0)"
        if not moved:
            return "unchanged (never trained)"
        learner.save_checkpoint(self._checkpoint_dir(0))
        return f"carried over from round {max(moved)} (no warm-up checkpoint)"

    async def _handle(self, message: Message) -> None:
        if isinstance(message, RoundOpened):
            if self.pid not in message.expected:
                log.info("round_skipped", round=message.round_id, participant=self.pid, reason="not expected")
                return
            self._admitted.set()
            self.metrics.round_announced(message.round_id)
            role = ROUND_ROLES.get(message.strategy)
            if role is None:
                self._sit_out(message)
            else:
                await self._roles[role](message)
            self.round_seen.set()
        elif isinstance(message, PseudoLabels):
            labels = [(label.prompt_id, label.text, label.confidence) for label in message.labels]
            if message.revision:  # an earlier round's labels that late answers changed: train on them next
                self.ledger.save_revisions(message.round_id, labels)
            else:
                self.ledger.save_labels(message.round_id, labels)
        elif isinstance(message, RoundClosed):
            if message.round_id in self._fedavg_rounds or message.round_id in self._sat_out:
                await self._finish_round(message.round_id, 0, 0.0)  # no average came: keep the local adapter
            else:
                await self._apply_labels(message)
        elif isinstance(message, AggregatedAdapter):
            await self._apply_adapter(message)

    def _sit_out(self, opened: RoundOpened) -> None:
        """A round of a strategy this participant does not know: nothing is sent, nothing trained, and
        the round's report says why (PROTOCOL.md §7.1 step 8)."""
        self._sat_out.add(opened.round_id)
        log.warning(
            "round_sat_out",
            round=opened.round_id,
            participant=self.pid,
            strategy=opened.strategy,
            known=sorted(ROUND_ROLES),
            hint="the coordinator runs a strategy this participant does not know: upgrade it to take part",
        )

    async def _adapter_round(self, opened: RoundOpened) -> None:
        self._fedavg_rounds.add(opened.round_id)
        await self._fedavg_train_and_upload(opened)

    async def _answer(self, opened: RoundOpened) -> None:
        prompts = [(p.prompt_id, p.text) for shard in opened.shards for p in shard.prompts]
        self.ledger.save_prompts(opened.round_id, prompts)
        if self.ledger.was_answered(opened.round_id):
            self._log_answered_before(opened)
            return
        started = time.perf_counter()
        try:
            async with self._model_lock:
                answers = await asyncio.to_thread(self.learner.generate, prompts, opened.generation)
        except LearnerError as e:
            # The learner already retried what could pass (an HTTP endpoint's back-off): a redelivery
            # would repeat that whole wait while the round runs on without us. This round is missed.
            log.warning("round_not_answered", round=opened.round_id, participant=self.pid, error=str(e))
            return
        self.metrics.generated(time.perf_counter() - started, sum(a.completion_tokens for a in answers))
        self.ledger.save_answers(opened.round_id, [(a.prompt_id, a.text) for a in answers])
        by_prompt = self._screen(opened.round_id, [a.to_answer() for a in answers], prompts)
        for shard in opened.shards:
            batch = GenerationBatch(
                federation=self.settings.federation,
                round_id=opened.round_id,
                # stable per (round, shard, participant): a republish after a crash is a duplicate
                message_id=batch_id(self.pid, opened.round_id, shard.shard_id),
                participant_id=self.pid,
                shard_id=shard.shard_id,
                model_id=self.learner.model_id[:256],
                answers=[by_prompt[p.prompt_id] for p in shard.prompts if p.prompt_id in by_prompt],
            )
            await self._publish(generation_key(shard.shard_id, self.pid), encode(batch), batch.message_id)
        self.ledger.mark_answered(opened.round_id)
        log.info(
            "round_answered",
            round=opened.round_id,
            participant=self.pid,
            prompts=len(prompts),
            withheld=self._withheld.get(opened.round_id, 0),
            seconds=round(time.perf_counter() - started, 2),
        )

    def _guard(self) -> LeakGuard:
        """The leak guard over this participant's private examples (training and test), built once."""
        if self._leak_guard is None:
            self._leak_guard = LeakGuard(self.settings.leak_guard, [*self.private_train, *self.test])
            log.info("leak_guard_ready", participant=self.pid, **self._leak_guard.summary())
        return self._leak_guard

    def _screen(
        self, round_id: int, answers: list[Answer], prompts: list[tuple[str, str]]
    ) -> dict[str, Answer]:
        """Prompt id -> the answer to publish, after the leak guard; what it withheld is counted in the
        log, the metrics and the round's report, by prompt id and never by text."""
        screened = self._guard().screen(answers, dict(prompts))
        counts = screened.counts()
        self._withheld[round_id] = counts["withheld"]
        if counts["withheld"]:
            self.metrics.answers_withheld.inc(counts["withheld"])
            first = sorted(screened.withheld)[:10]
            log.warning("answers_withheld", round=round_id, participant=self.pid, prompt_ids=first, **counts)
        return screened.answers

    def _log_answered_before(self, opened: RoundOpened) -> None:
        log.warning(
            "round_already_answered",
            round=opened.round_id,
            participant=self.pid,
            run=opened.announced_run(),
            state_dir=str(self.state_dir),
            hint="answered before a restart: the coordinator keeps the batches it stored then",
        )

    def _training_mix(self, round_id: int) -> list[Example]:
        settings = self.settings.train
        examples = []
        for labelled in [*self.ledger.labelled_examples(round_id), *self.ledger.revised_examples(round_id)]:
            weight = label_example_weight(
                settings.label_weighting,
                settings.label_weight,
                labelled.confidence,
                labelled.label,
                labelled.own_answer,
            )
            if weight > 0.0:  # a label that is already our own answer teaches nothing
                examples.append(
                    Example(prompt=labelled.prompt, response=labelled.label, weight=weight, public=True)
                )
        private = list(self.private_train)
        random.Random(f"{settings.seed}:{round_id}").shuffle(private)
        return examples + private[: settings.private_examples_per_round]

    def _trained(self, stats: TrainStats | None) -> TrainStats | None:
        if stats is not None and stats.epsilon is not None:
            self._epsilon = stats.epsilon
            self.metrics.privacy_spent(stats.epsilon)
        return stats

    async def _apply_labels(self, closed: RoundClosed) -> None:
        round_id = closed.round_id
        if self.ledger.was_applied(round_id):
            return
        examples = self._training_mix(round_id)
        train_seconds, samples = 0.0, 0
        learner = self._trainer
        if learner is not None and examples:
            started = time.perf_counter()
            async with self._model_lock:
                stats = self._trained(await asyncio.to_thread(learner.train, examples))
                await asyncio.to_thread(learner.save_checkpoint, self._checkpoint_dir(round_id))
            train_seconds, samples = time.perf_counter() - started, getattr(stats, "samples", len(examples))
            self.metrics.trained(train_seconds, len(self.ledger.labelled_examples(round_id)))
        await self._finish_round(round_id, samples, train_seconds)

    async def _fedavg_train_and_upload(self, opened: RoundOpened) -> None:
        if self.ledger.was_answered(opened.round_id):
            self._log_answered_before(opened)
            return
        learner = self.learner
        if not isinstance(learner, AdapterLearner) or self._trainer is None:
            # PROTOCOL §7.1 step 9: a participant that cannot do FedAvg sends nothing.
            reason = (
                "the learner cannot train"
                if self._trainer is None
                else f"{type(learner).__name__} has no adapter_state/load_adapter_state (see AdapterLearner)"
            )
            log.warning(
                "fedavg_unsupported",
                round=opened.round_id,
                participant=self.pid,
                reason=reason,
                sent="nothing",
            )
            return
        from participant.adapters import tensors_to_wire  # torch: only an adapter learner gets here

        private = self._training_mix(opened.round_id)
        started = time.perf_counter()
        async with self._model_lock:
            self._trained(await asyncio.to_thread(learner.train, private))
            state = await asyncio.to_thread(learner.adapter_state)
        self.metrics.trained(time.perf_counter() - started, 0)
        update = AdapterUpdate(
            federation=self.settings.federation,
            round_id=opened.round_id,
            message_id=adapter_update_id(self.pid, opened.round_id),
            participant_id=self.pid,
            tensors=tensors_to_wire(state),
            num_samples=max(1, len(private)),
        )
        await self._publish_control(update)
        self.ledger.mark_answered(opened.round_id)

    async def _apply_adapter(self, message: AggregatedAdapter) -> None:
        if self.ledger.was_applied(message.round_id):
            return
        learner = self.learner
        if not isinstance(learner, AdapterLearner):
            log.warning(
                "fedavg_adapter_ignored",
                round=message.round_id,
                participant=self.pid,
                reason=f"{type(learner).__name__} cannot load an adapter (see AdapterLearner)",
            )
            return
        from participant.adapters import tensors_from_wire  # torch: only an adapter learner gets here

        async with self._model_lock:
            await asyncio.to_thread(learner.load_adapter_state, tensors_from_wire(message.tensors))
            await asyncio.to_thread(learner.save_checkpoint, self._checkpoint_dir(message.round_id))
        await self._finish_round(message.round_id, 0, 0.0)

    async def _finish_round(self, round_id: int, samples: int, train_seconds: float) -> None:
        if self.ledger.was_applied(round_id):
            return
        metrics: dict[str, float] = {}
        learner = self.learner
        if (
            self.settings.evaluate
            and self.test
            and self.embed is not None
            and isinstance(learner, EvaluatingLearner)
        ):
            async with self._model_lock:
                metrics = await asyncio.to_thread(learner.evaluate, self.test, self.embed, None)
        if round_id in self._withheld:  # answered in this process: what the leak guard kept back
            metrics = {**metrics, "answers_withheld": float(self._withheld.pop(round_id))}
        if round_id in self._sat_out:
            metrics = {**metrics, UNKNOWN_STRATEGY_METRIC: 1.0}
        if self._epsilon is not None:
            metrics = {**metrics, DP_EPSILON_METRIC: self._epsilon}
        self.ledger.mark_applied(round_id, metrics)
        self.metrics.applied(round_id)
        report = ParticipantReport(
            federation=self.settings.federation,
            round_id=round_id,
            message_id=report_id(self.pid, round_id),
            participant_id=self.pid,
            metrics={k: float(v) for k, v in metrics.items()},
            train_samples=samples,
            train_seconds=train_seconds,
        )
        await self._publish_control(report)
        self.reports.append(report)
        self.rounds_done.append(round_id)
        self.round_seen.set()
        log.info("round_applied", round=round_id, participant=self.pid, samples=samples, **metrics)

    async def _publish_control(self, message: Message) -> None:
        await self._publish(control_key(self.pid), encode(message), message.message_id)

    async def _publish(self, routing_key: str, body: bytes, message_id: str) -> None:
        try:
            await self.transport.publish(UP_EXCHANGE, routing_key, body, message_id=message_id)
        except Exception:
            self.metrics.publish_errors.inc()
            raise
