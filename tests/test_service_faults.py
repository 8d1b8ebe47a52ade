"""Real participants (tiny models) and the coordinator on RabbitMQ, one of them killed mid-round.

The coordinator is killed between publishing a shard's pseudo-labels and
recording that it did, so its successor (same database) publishes them again:
participants must take them once. A participant killed while training on its
labels rejoins and applies what it missed, once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from support.coordinators import coordinator_at
from support.tiny_models import CrashOnSecondTrain, coordinator_config, tiny_participant

from broker.amqp import AmqpTransport
from broker.topology import DIRECT_EXCHANGE
from broker.transport import DEFAULT_PREFETCH, DEFAULT_PUBLISH_TIMEOUT, Handler, Headers, Subscription
from coordinator.service import Coordinator
from participant.data import Example
from participant.generation import GeneratedAnswer
from participant.learner import LoraLearner, PromptBatch
from participant.ledger import ParticipantLedger
from participant.service import Participant
from participant.training import TrainStats
from schemas.messages import GenerationParams

pytestmark = [pytest.mark.amqp, pytest.mark.slow]

NAMES = ("llama", "gpt2")
SPECS = {"llama": "tiny-llama", "gpt2": "tiny-gpt2"}


class CountingLearner:
    """Wraps a learner and counts its `train` calls: warm-up once, then one per applied round.

    It generates with the real model but answers with agreed text, so that consensus labels
    every prompt (two tiny random models agree on nothing) and the label counts mean something.
    """

    def __init__(self, inner: LoraLearner) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.trained: list[int] = []  # examples per call

    def train(self, examples: Sequence[Example]) -> TrainStats:
        self.trained.append(len(examples))
        return self.inner.train(examples)

    def generate(self, prompts: PromptBatch, params: GenerationParams) -> list[GeneratedAnswer]:
        answers = self.inner.generate(prompts, params)
        return [replace(a, text=f"The agreed answer to {a.prompt_id}.") for a in answers]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def participant_at(url: str, tmp_path: Path, name: str) -> Participant:
    transport = AmqpTransport(url, connection_name=f"test {name}")
    return tiny_participant(transport, tmp_path, name, SPECS[name], wrap=CountingLearner)


class FreezesAfterPublishing:
    """The coordinator's transport; after the `after`-th reply is confirmed the process "dies".

    The publish never returns, so the coordinator never records it: its successor sends it again.
    """

    def __init__(self, inner: AmqpTransport, after: int) -> None:
        self.inner = inner
        self.user = inner.user
        self.after = after
        self.replies = 0
        self.frozen = asyncio.Event()

    async def __aenter__(self) -> FreezesAfterPublishing:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.inner.close()

    async def declare(self, topology: Any) -> None:
        await self.inner.declare(topology)

    def is_connected(self) -> bool:
        return self.inner.is_connected()

    async def consume(
        self, queue: str, handler: Handler, *, prefetch: int = DEFAULT_PREFETCH
    ) -> Subscription:
        return await self.inner.consume(queue, handler, prefetch=prefetch)

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: Headers | None = None,
        timeout: float = DEFAULT_PUBLISH_TIMEOUT,
        bcc: Sequence[str] = (),
    ) -> None:
        await self.inner.publish(exchange, routing_key, body, message_id=message_id, timeout=timeout, bcc=bcc)
        if exchange == DIRECT_EXCHANGE:
            self.replies += 1
            if self.replies == self.after:
                self.frozen.set()
                await asyncio.Event().wait()

    async def close(self) -> None:
        await self.inner.close()


async def test_coordinator_killed_mid_round_no_label_applied_twice(
    tmp_path: Path, rabbit_vhost: Callable[..., dict[str, str]]
) -> None:
    urls = rabbit_vhost(participants=NAMES)
    config = coordinator_config(tmp_path, rounds=2)
    first = await coordinator_at(urls["coordinator"], config)
    assert isinstance(first.transport, AmqpTransport)
    freezing = FreezesAfterPublishing(first.transport, after=1)
    first.transport = freezing
    participants = [participant_at(urls[name], tmp_path, name) for name in NAMES]
    runs: list[asyncio.Task[None]] = []
    second: Coordinator | None = None
    try:
        await first.start()
        runs = [asyncio.create_task(p.run_until(rounds=2)) for p in participants]
        drive = asyncio.create_task(first.drive())
        # Round 1: both answered, shard 0's labels reached both participants (one BCC publish), then the
        # coordinator dies before recording that: its successor sends them again.
        await asyncio.wait_for(freezing.frozen.wait(), 120)
        (closing,) = [c for c in first.store.closings(1) if c.labels is not None][:1]
        drive.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drive
        await freezing.inner.close()  # the crash: its unacked deliveries go back to the queues
        first.store.close()
        assert first.closed_rounds == []

        second = await coordinator_at(urls["coordinator"], config, "test coordinator 2")
        await second.start()
        await asyncio.wait_for(second.drive(), 120)
        await asyncio.wait_for(asyncio.gather(*runs), 120)

        assert [s.round_id for s in second.closed_rounds] == [1, 2]
        for summary in second.closed_rounds:
            assert summary.answered == sorted(NAMES) and summary.missing == []
            assert [o.status for o in summary.shards] == ["labelled", "labelled"]
        labelled = {s.round_id: sum(o.labelled for o in s.shards) for s in second.closed_rounds}
        assert closing.shard_id == 0
        for participant in participants:
            learner = participant.learner
            assert isinstance(learner, CountingLearner)
            # Warm-up, then one training per round: no round's labels applied twice.
            assert len(learner.trained) == 3, learner.trained
            assert participant.rounds_done == [1, 2]
            assert [r.round_id for r in participant.reports] == [1, 2]
            ledger = ParticipantLedger(tmp_path / participant.pid / "participant.sqlite3")
            for round_id in (1, 2):
                # Every label the coordinator decided is kept once (a republished shard adds nothing).
                assert len(ledger.labelled_examples(round_id)) == labelled[round_id]
            assert learner.trained[1:] == [labelled[1] + 2, labelled[2] + 2]  # labels + 2 private examples
            assert ledger.last_applied_round() == 2
            ledger.close()
        assert labelled == {1: 4, 2: 4}  # every prompt labelled: the counts above are not vacuous
        reports = second.store.reports()
        assert sorted((r, p) for r, p, _ in reports) == sorted((r, p) for r in (1, 2) for p in NAMES)
    finally:
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        for participant in participants:
            await participant.transport.close()
        for coordinator in (first, second):
            if coordinator is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(coordinator.stop_intake(), 10)
                await coordinator.transport.close()
        if second is not None:
            second.store.close()


async def test_killed_participant_rejoins_and_applies_missed_labels_on_rabbitmq(
    tmp_path: Path, rabbit_vhost: Callable[..., dict[str, str]]
) -> None:
    urls = rabbit_vhost(participants=NAMES)
    coordinator = await coordinator_at(urls["coordinator"], coordinator_config(tmp_path, rounds=2))
    llama = participant_at(urls["llama"], tmp_path, "llama")
    doomed = participant_at(urls["gpt2"], tmp_path, "gpt2")
    crashing = CrashOnSecondTrain(doomed.learner)  # type: ignore[arg-type]
    doomed.learner = crashing
    restarted: Participant | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        await coordinator.start()
        llama_run = asyncio.create_task(llama.run_until(rounds=2))
        doomed_run = asyncio.create_task(doomed.run_until(rounds=2))
        drive = asyncio.create_task(coordinator.drive())
        tasks = [llama_run, doomed_run, drive]
        # gpt2 answered round 1 and is training on its labels when it dies
        assert await asyncio.to_thread(crashing.entered.wait, 60)
        doomed_run.cancel()
        await asyncio.sleep(0.1)
        crashing.release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await doomed_run
        await doomed.transport.close()  # its unacked RoundClosed goes back to its reply queue
        assert doomed.reports == []

        restarted = participant_at(urls["gpt2"], tmp_path, "gpt2")
        restarted_run = asyncio.create_task(restarted.run_until(rounds=2))
        tasks.append(restarted_run)
        await asyncio.wait_for(asyncio.gather(drive, llama_run, restarted_run), 120)
        assert restarted.rounds_done == [1, 2]  # round 1's labels applied after the restart, then round 2
        assert [r.round_id for r in restarted.reports] == [1, 2]
        learner = restarted.learner
        assert isinstance(learner, CountingLearner)
        assert len(learner.trained) == 2  # no warm-up again (resumed from its checkpoint), one per round
        assert [s.answered for s in coordinator.closed_rounds] == [["gpt2", "llama"], ["gpt2", "llama"]]
        assert (tmp_path / "gpt2" / "checkpoints" / "round-0").is_dir()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        crashing.release.set()
        for participant in (llama, doomed, restarted):
            if participant is not None:
                await participant.transport.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(coordinator.stop_intake(), 10)
        await coordinator.transport.close()
        coordinator.store.close()
