"""Duplicated and reordered generation batches change nothing: same labels, each label message once."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from support.coordinators import memory_coordinator, run_with_participants, write_config
from support.scripted import ScriptedParticipant, consensus_answers

from broker.memory import MemoryBroker
from broker.topology import full_topology
from schemas import RoundOpened

NAMES = ["alice", "bob", "carol"]


@dataclass
class DuplicatingParticipant(ScriptedParticipant):
    """Publishes every batch twice (same message id, as after a lost confirm), shards shuffled."""

    protocol_ids: bool = True
    seed: int = 0

    async def _answer(self, opened: RoundOpened) -> None:
        sends = [self.batch(opened, shard) for shard in opened.shards] * 2
        random.Random(self.seed).shuffle(sends)
        for batch in sends:
            await self.send(batch)


async def run(tmp_path: Path, duplicating: bool) -> tuple[list[ScriptedParticipant], int, int]:
    broker = MemoryBroker()
    broker.declare(full_topology(NAMES))
    coordinator = memory_coordinator(write_config(tmp_path, min_participants=3, quorum=3), broker)
    participants: list[ScriptedParticipant] = [
        DuplicatingParticipant(n, broker.connect(n), consensus_answers, seed=i)
        if duplicating
        else ScriptedParticipant(n, broker.connect(n), consensus_answers)
        for i, n in enumerate(NAMES)
    ]
    await run_with_participants(coordinator, participants)
    coordinator.store.close()
    return participants, coordinator.counters.duplicates, coordinator.counters.dead_lettered


async def test_duplicated_and_shuffled_batches_give_the_clean_runs_labels_once(tmp_path: Path) -> None:
    (tmp_path / "clean").mkdir()
    (tmp_path / "dup").mkdir()
    clean, clean_duplicates, _ = await run(tmp_path / "clean", duplicating=False)
    noisy, duplicates, dead = await run(tmp_path / "dup", duplicating=True)
    assert clean_duplicates == 0
    assert dead == 0  # a duplicate is acked, never dead-lettered while its round is open
    # each second copy counts as a duplicate, or (after its shard closed) is acked as late
    assert 0 < duplicates <= len(NAMES) * 3
    for a, b in zip(clean, noisy, strict=True):
        assert a.labels.keys() == b.labels.keys() and len(b.labels) == 3
        for key in a.labels:
            assert a.labels[key].labels == b.labels[key].labels
            assert a.labels[key].abstained == b.labels[key].abstained
        assert b.label_deliveries == 3  # each PseudoLabels message received once
        assert len(b.closed) == 1
