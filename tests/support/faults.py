"""Shared pieces of the fault tests: gated scripted participants, a round with a fault in it, a reference run.

A fault test runs one round over RabbitMQ while something breaks, then checks
three things against what a fault-free run produces from the same inputs:
the round closed with everyone answered, every generation a participant saw
confirmed is in the coordinator's store, and the pseudo-labels are identical.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.amqp import AmqpTransport
from broker.errors import BrokerError, PublishTimeout
from broker.memory import MemoryBroker
from broker.topology import full_topology
from coordinator.service import Coordinator
from schemas import GenerationBatch, RoundOpened
from support.coordinators import coordinator_at, memory_coordinator, write_config
from support.scripted import ScriptedParticipant, consensus_answers
from support.waiting import eventually

FEDERATION = "faults"
NAMES = ["ana", "ben", "cyd"]  # the participants of `run_round_with_fault`
SHARDS = 3
# Long enough to ride out a broker restart or a stalled link (each publish waits for its confirm).
PUBLISH_TIMEOUT = 90.0
ATTEMPT = 20.0  # one publish's wait for its confirm before the message is published again

LabelKey = tuple[int, int]  # (round, shard)
LabelTable = dict[LabelKey, list[tuple[str, str, float]]]


def round_config(directory: Path, participants: int, **overrides: object) -> Path:
    """One semantic round of 6 prompts in 3 shards that waits for all `participants` (deadline 120 s)."""
    settings: dict[str, Any] = {
        "min_participants": participants,
        "quorum": participants,
        "deadline_seconds": 120.0,
        "grace_seconds": 0.0,
    }
    top = {"publish_timeout_seconds": PUBLISH_TIMEOUT}
    return write_config(directory, federation=FEDERATION, top=top, **(settings | overrides))


@dataclass
class GatedParticipant(ScriptedParticipant):
    """Publishes its first `hold_after` shards at once, the rest once `gate` is set; publishes each
    batch again while no confirm comes (waiting `ATTEMPT` seconds a time, for up to `republish_for`)."""

    gate: asyncio.Event | None = None
    hold_after: int = 0
    publish_timeout: float = ATTEMPT
    republish_for: float = PUBLISH_TIMEOUT
    republished: int = 0  # publishes repeated after a confirm did not come in time

    async def _answer(self, opened: RoundOpened) -> None:
        for index, shard in enumerate(opened.shards):
            if self.gate is not None and index == self.hold_after:
                await self.gate.wait()
            if not await self.send(self.batch(opened, shard)):
                return

    async def publish(self, batch: GenerationBatch, bcc: Sequence[str] = ()) -> None:
        """Publish; when no confirm comes in time, publish the same message again (as the participant
        service does through redelivery of its RoundOpened): the coordinator dedupes by message id."""
        deadline = time.monotonic() + self.republish_for
        while True:
            try:
                await super().publish(batch, bcc)
                return
            except BrokerError as e:
                # No confirm in time, or a nack (a quorum queue electing a new leader refuses the
                # publish); anything else (unroutable, refused access) is not worth repeating.
                if not isinstance(e, PublishTimeout) and type(e) is not BrokerError:
                    raise
                self.republished += 1
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)


async def gated_at(
    url: str, name: str, gate: asyncio.Event | None = None, hold_after: int = 0
) -> GatedParticipant:
    transport = AmqpTransport(url, connection_name=f"test {name}")
    await transport.__aenter__()
    return GatedParticipant(
        name, transport, consensus_answers, federation=FEDERATION, gate=gate, hold_after=hold_after
    )


def label_table(participant: ScriptedParticipant) -> LabelTable:
    return {
        key: [(label.prompt_id, label.text, round(label.confidence, 6)) for label in message.labels]
        for key, message in participant.labels.items()
    }


async def reference_labels(directory: Path, names: list[str], **overrides: object) -> LabelTable:
    """The labels a fault-free run on the embedded broker gives for the same inputs."""
    broker = MemoryBroker()
    broker.declare(full_topology(names))
    coordinator = memory_coordinator(round_config(directory, len(names), **overrides), broker)
    participants = [
        ScriptedParticipant(n, broker.connect(n), consensus_answers, federation=FEDERATION) for n in names
    ]
    await coordinator.start()
    for participant in participants:
        await participant.join()
    await asyncio.wait_for(coordinator.drive(), 30)
    for _ in range(100):
        if all(len(p.labels) == SHARDS for p in participants):
            break
        await asyncio.sleep(0.02)
    await coordinator.stop_intake()
    tables = [label_table(p) for p in participants]
    assert all(t == tables[0] for t in tables), "the reference run gave participants different labels"
    assert len(tables[0]) == SHARDS
    coordinator.store.close()
    return tables[0]


def stored_batches(coordinator: Coordinator, round_id: int) -> set[tuple[int, int, str]]:
    return {(b.round_id, b.shard_id, b.participant_id) for b in coordinator.store.batches(round_id)}


async def close_all(coordinator: Coordinator | None, participants: list[GatedParticipant]) -> None:
    """Tear down whatever a test opened, even when it failed halfway (bounded in time)."""
    for participant in participants:
        with contextlib.suppress(Exception, asyncio.CancelledError):  # best effort: the test may have failed
            await asyncio.wait_for(participant.leave(), 10)
        await participant.transport.close()
    if coordinator is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(coordinator.stop_intake(), 10)
        await coordinator.transport.close()
        coordinator.store.close()


async def run_round_with_fault(
    tmp_path: Path,
    urls: dict[str, str],
    fault: Callable[[], object],
    after_fault: Callable[[], object] | None = None,
) -> tuple[Coordinator, list[GatedParticipant]]:
    """ana and ben answer at once, cyd answers shard 0 then waits; `fault` runs; cyd answers the rest."""
    coordinator: Coordinator | None = None
    participants: list[GatedParticipant] = []
    gate = asyncio.Event()
    try:
        coordinator = await coordinator_at(urls["coordinator"], round_config(tmp_path / "run", 3))
        await coordinator.start()
        for name in NAMES:
            held = name == "cyd"
            participant = await gated_at(urls[name], name, gate if held else None, hold_after=1)
            participants.append(participant)
            await participant.join()
        drive = asyncio.create_task(coordinator.drive())
        try:
            await eventually(lambda: coordinator.counters.accepted == 2 * SHARDS + 1, timeout=30)
            result = fault()
            if asyncio.iscoroutine(result):
                await result
            gate.set()  # cyd's last shards are published during (or right after) the fault
            if after_fault is not None:
                result = after_fault()
                if asyncio.iscoroutine(result):
                    await result
            await asyncio.wait_for(asyncio.shield(drive), 150)
        finally:
            if not drive.done():
                drive.cancel()
        await eventually(lambda: all(len(p.labels) == SHARDS and p.closed for p in participants), 60)
        return coordinator, participants
    except BaseException:
        await close_all(coordinator, participants)
        raise


async def check_round(tmp_path: Path, coordinator: Coordinator, participants: list[GatedParticipant]) -> None:
    (summary,) = coordinator.closed_rounds
    assert summary.answered == sorted(NAMES) and summary.missing == [] and summary.late == []
    assert [o.status for o in summary.shards] == ["labelled"] * SHARDS
    confirmed = {c for p in participants for c in p.confirmed}
    assert len(confirmed) == len(NAMES) * SHARDS
    assert confirmed == stored_batches(coordinator, summary.round_id)  # no confirmed generation lost
    expected = await reference_labels(tmp_path / "reference", NAMES)
    for participant in participants:
        assert label_table(participant) == expected
