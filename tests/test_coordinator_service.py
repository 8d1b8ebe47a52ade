"""The coordinator service end to end with scripted participants (no models)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from support.coordinators import memory_coordinator, run_with_participants, write_config
from support.faults import GatedParticipant
from support.scripted import ScriptedParticipant, consensus_answers
from support.waiting import eventually

from broker.memory import MemoryBroker
from broker.topology import (
    ANNOUNCE_EXCHANGE,
    DEAD_LETTER_QUEUE,
    SHARED_REPLY_KEY,
    UP_EXCHANGE,
    control_key,
    full_topology,
    generation_key,
    intake_queue,
    intake_topology,
    reply_key,
)
from broker.transport import REASON_HEADER, Delivery, Topology
from coordinator.settings import load_coordinator_settings
from schemas import Answer, GenerationBatch, ParticipantReport, encode, new_message_id
from schemas.ids import report_id


async def test_round_closes_on_time_with_a_straggler(tmp_path: Path) -> None:
    broker = MemoryBroker()
    coordinator = memory_coordinator(write_config(tmp_path, grace_seconds=0.3), broker)
    names = ["alice", "bob", "carol", "dave", "erin"]
    broker.declare(full_topology(names))
    participants = [
        ScriptedParticipant(n, broker.connect(n), consensus_answers, delay=5.0 if n == "erin" else 0.0)
        for n in names
    ]
    loop = asyncio.get_running_loop()
    started = loop.time()
    await run_with_participants(coordinator, participants)
    assert loop.time() - started < 3.0  # quorum + grace, well before the deadline
    (summary,) = coordinator.closed_rounds
    assert summary.answered == ["alice", "bob", "carol", "dave"]
    assert summary.missing == ["erin"]
    assert all(o.status == "labelled" for o in summary.shards)
    assert sum(o.labelled for o in summary.shards) == 6  # every prompt labelled
    for participant in participants:  # the straggler gets the labels too
        assert len(participant.labels) == 3
        assert participant.closed and participant.closed[0].round_id == 1
    assert summary.bytes_received.keys() == {"alice", "bob", "carol", "dave"}
    assert all(v > 0 for v in summary.bytes_sent.values())


async def test_outlier_never_labels_and_ranks_last(tmp_path: Path) -> None:
    broker = MemoryBroker()
    coordinator = memory_coordinator(write_config(tmp_path, min_participants=4, quorum=4), broker)
    names = ["alice", "bob", "carol", "mallory"]
    broker.declare(full_topology(names))
    participants = [ScriptedParticipant(n, broker.connect(n), consensus_answers) for n in names]
    await run_with_participants(coordinator, participants)
    (summary,) = coordinator.closed_rounds
    labels = [label for p in participants[:1] for m in p.labels.values() for label in m.labels]
    assert labels and all(label.source != "mallory" for label in labels)
    assert min(summary.agreement, key=lambda p: summary.agreement[p]) == "mallory"


async def test_bad_generations_are_dead_lettered_with_reasons(tmp_path: Path) -> None:
    broker = MemoryBroker()
    coordinator = memory_coordinator(write_config(tmp_path, min_participants=1, quorum=1, rounds=1), broker)
    broker.declare(full_topology(["alice", "mallory"]))
    dead: list[Delivery] = []

    async def collect(delivery: Delivery) -> None:
        dead.append(delivery)

    await broker.connect("inspector").consume(DEAD_LETTER_QUEUE, collect)
    await coordinator.start()
    alice = ScriptedParticipant("alice", broker.connect("alice"), consensus_answers, delay=0.5)
    await alice.join()
    drive = asyncio.create_task(coordinator.drive())
    await asyncio.sleep(0.1)
    assert coordinator.round is not None
    shard = coordinator.round.shards[0]
    mallory = broker.connect("mallory")

    def batch(participant: str, **changes: object) -> bytes:
        fields: dict[str, object] = {
            "federation": "test",
            "round_id": 1,
            "message_id": new_message_id(),
            "participant_id": participant,
            "shard_id": 0,
            "model_id": "x",
            "answers": [Answer(prompt_id=shard.prompt_ids[0], text="hi")],
        }
        return encode(GenerationBatch(**(fields | changes)))  # type: ignore[arg-type]

    bad = [
        (generation_key(0, "mallory"), b"\x93garbage", "schema malformed"),
        (generation_key(0, "alice"), batch("alice"), "does not match participant_id"),  # forged identity
        (generation_key(0, "mallory"), batch("mallory", round_id=9), "round 9 is not open"),
        (generation_key(0, "mallory"), batch("mallory", federation="other"), "federation"),
        (generation_key(1, "mallory"), batch("mallory"), "does not match shard_id"),
        (
            generation_key(0, "mallory"),
            batch("mallory", answers=[Answer(prompt_id="zzz", text="x")]),
            "not in shard",
        ),
        (generation_key(0, "mallory"), batch("mallory"), "not_expected"),
    ]
    for key, body, _ in bad:
        await mallory.publish(UP_EXCHANGE, key, body, message_id=new_message_id())
    await asyncio.wait_for(drive, 10.0)
    await coordinator.stop_intake()
    reasons = [str(d.headers[REASON_HEADER]) for d in dead]
    assert len(reasons) == len(bad)
    for (_, _, expected), reason in zip(bad, reasons, strict=True):
        assert expected in reason
    assert coordinator.counters.dead_lettered == len(bad)
    (summary,) = coordinator.closed_rounds
    assert summary.answered == ["alice"]  # good traffic undisturbed


async def test_restart_mid_round_finishes_with_the_same_labels(tmp_path: Path) -> None:
    names = ["alice", "bob", "carol"]
    # reference run, no crash
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    broker = MemoryBroker()
    broker.declare(full_topology(names))
    reference = memory_coordinator(write_config(reference_dir, min_participants=3, quorum=3), broker)
    clean = [ScriptedParticipant(n, broker.connect(n), consensus_answers) for n in names]
    await run_with_participants(reference, clean)

    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    config = write_config(crash_dir, min_participants=3, quorum=3)
    broker = MemoryBroker()
    broker.declare(full_topology(names))
    first = memory_coordinator(config, broker)
    await first.start()
    participants = [
        ScriptedParticipant(n, broker.connect(n), consensus_answers, delay=0.0 if n != "carol" else 0.5)
        for n in names
    ]
    for participant in participants:
        await participant.join()
    drive = asyncio.create_task(first.drive())
    await asyncio.sleep(0.2)  # round open, alice and bob answered, carol not yet
    drive.cancel()  # the crash: no clean shutdown
    await first.transport.close()
    first.store.close()
    assert first.closed_rounds == []

    second = memory_coordinator(config, broker)
    await run_with_participants(second, [], timeout=10.0)  # the successor, on the same database
    assert len(second.closed_rounds) == 1
    for before, after in zip(clean, participants, strict=True):
        assert {k: v.labels for k, v in before.labels.items()} == {
            k: v.labels for k, v in after.labels.items()
        }
        assert after.label_deliveries == len(after.labels)  # no label published twice


def test_settings_errors_are_clear(tmp_path: Path) -> None:
    from coordinator.settings import SettingsError

    config = write_config(tmp_path)
    config.write_text(config.read_text() + "typo_key = 1\n")
    with pytest.raises(SettingsError, match="typo_key"):
        load_coordinator_settings(config, env={})
    with pytest.raises(SettingsError, match="does not exist"):
        load_coordinator_settings(tmp_path / "nope.toml", env={})


async def test_crash_while_publishing_labels_resumes_without_duplicates(tmp_path: Path) -> None:
    names = ["alice", "bob", "carol"]
    config = write_config(tmp_path, min_participants=3, quorum=3)
    broker = MemoryBroker()
    broker.declare(full_topology(names))
    first = memory_coordinator(config, broker)
    participants = [ScriptedParticipant(n, broker.connect(n), consensus_answers) for n in names]
    publish = first.transport.publish
    label_publishes = 0

    async def crash_on_second_label(exchange: str, routing_key: str, body: bytes, **kwargs: Any) -> None:
        nonlocal label_publishes
        if routing_key == SHARED_REPLY_KEY:
            assert sorted(kwargs["bcc"]) == [reply_key(n) for n in names]  # one publish for all three
            label_publishes += 1
            if label_publishes == 2:  # shard 0 went to all three; the process dies publishing shard 1
                raise RuntimeError("killed while publishing")
        await publish(exchange, routing_key, body, **kwargs)

    first.transport.publish = crash_on_second_label  # type: ignore[method-assign]
    await first.start()
    for participant in participants:
        await participant.join()
    with pytest.raises(RuntimeError, match="killed"):
        await asyncio.wait_for(first.drive(), 10.0)
    await first.transport.close()
    first.store.close()
    assert first.closed_rounds == []

    second = memory_coordinator(config, broker)
    await run_with_participants(second, [], timeout=10.0)  # the successor, on the same database
    (summary,) = second.closed_rounds
    assert summary.answered == names
    for participant in participants:
        assert len(participant.labels) == 3
        assert participant.label_deliveries == 3  # the labels published before the crash were not re-sent


async def test_a_shard_never_closes_over_a_batch_still_waiting_for_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import coordinator.intake as intake

    monkeypatch.setattr(intake, "GROUP_COMMIT_PAUSE", 30.0)  # intake writes stay pending
    monkeypatch.setattr(intake, "GROUP_COMMIT_WAIT", 60.0)
    broker = MemoryBroker()
    names = ["alice", "bob"]
    broker.declare(full_topology(names))
    coordinator = memory_coordinator(write_config(tmp_path, min_participants=2, quorum=2, shards=1), broker)
    await coordinator.start()
    participants = [ScriptedParticipant(n, broker.connect(n), consensus_answers) for n in names]
    for participant in participants:
        await participant.join()
    await coordinator._open_round()
    state = coordinator.round
    assert state is not None
    await eventually(
        lambda: len(coordinator.intake._pending_writes) == 2, timeout=5.0
    )  # both recorded, neither committed
    assert coordinator.store.batches(1) == []
    await coordinator._advance_round()  # closes the shard ("all answered")
    (closing,) = coordinator.store.closings(1)
    assert closing.answered == ("alice", "bob")
    assert {b.participant_id for b in coordinator.store.batches(1)} == {"alice", "bob"}
    assert sum(o.labelled for o in coordinator.closed_rounds[0].shards) == 6  # both answers were counted
    await coordinator.stop_intake()


async def test_labels_reach_every_member_once_across_bcc_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import coordinator.outbox as outbox

    monkeypatch.setattr(outbox, "MAX_BCC_KEYS", 2)  # 5 recipients: publishes of 2, 2 and 1 keys
    names = ["alice", "bob", "carol", "dave", "erin"]
    broker = MemoryBroker()
    broker.declare(full_topology(names))
    coordinator = memory_coordinator(write_config(tmp_path, min_participants=5, quorum=5), broker)
    publishes: list[tuple[str, list[str]]] = []
    publish = coordinator.transport.publish

    async def noting(exchange: str, routing_key: str, body: bytes, **kwargs: Any) -> None:
        if routing_key == SHARED_REPLY_KEY or routing_key.startswith("reply."):
            publishes.append((routing_key, list(kwargs.get("bcc", []))))
        await publish(exchange, routing_key, body, **kwargs)

    coordinator.transport.publish = noting  # type: ignore[method-assign]
    participants = [ScriptedParticipant(n, broker.connect(n), consensus_answers) for n in names]
    await run_with_participants(coordinator, participants)
    (summary,) = coordinator.closed_rounds
    assert [o.status for o in summary.shards] == ["labelled"] * 3
    assert sorted(len(bcc) for _, bcc in publishes) == [0, 0, 0, 2, 2, 2, 2, 2, 2]  # 3 per shard
    assert sorted(key for key, bcc in publishes if not bcc) == [reply_key("erin")] * 3  # a lone key: its own
    for participant in participants:
        assert len(participant.labels) == 3
        assert participant.label_deliveries == 3  # each shard's labels once, whichever chunk carried them


async def test_an_answer_stored_while_labels_are_published_closes_its_shard_at_once(tmp_path: Path) -> None:
    # Bob's last batches arrive while the coordinator publishes shard 0's labels; the driver must not
    # then sleep until the deadline as if nothing had come.
    names = ["alice", "bob"]
    broker = MemoryBroker()
    broker.declare(full_topology(names))
    coordinator = memory_coordinator(
        write_config(tmp_path, min_participants=2, quorum=2, deadline_seconds=60.0, grace_seconds=30.0),
        broker,
    )
    gate = asyncio.Event()
    bob = GatedParticipant("bob", broker.connect("bob"), consensus_answers, gate=gate, hold_after=1)
    publish = coordinator.transport.publish

    async def slow_first_labels(exchange: str, routing_key: str, body: bytes, **kwargs: Any) -> None:
        if routing_key == SHARED_REPLY_KEY and not gate.is_set():
            gate.set()  # bob sends shards 1 and 2 now, and they are stored before this publish ends
            await eventually(lambda: len(coordinator.store.batches(1)) == 6, timeout=5.0)
        await publish(exchange, routing_key, body, **kwargs)

    coordinator.transport.publish = slow_first_labels  # type: ignore[method-assign]
    participants = [ScriptedParticipant("alice", broker.connect("alice"), consensus_answers), bob]
    loop = asyncio.get_running_loop()
    started = loop.time()
    await run_with_participants(coordinator, participants, timeout=30.0)
    assert loop.time() - started < 5.0  # all answered: neither the 30 s grace nor the 60 s deadline
    (summary,) = coordinator.closed_rounds
    assert [o.status for o in summary.shards] == ["labelled"] * 3


async def test_a_round_opening_during_a_join_is_announced_once_the_members_queues_exist(
    tmp_path: Path,
) -> None:
    # The Joins store both members at once, and a round opens while their intake queues are still being
    # declared: RoundOpened must wait for them, or what a member sends at once finds no intake queue.
    names = ["alice", "bob"]
    broker = MemoryBroker()
    broker.declare(full_topology(names))  # reply queues; intake queues come with the Joins
    coordinator = memory_coordinator(write_config(tmp_path, min_participants=2, quorum=2), broker)
    release = asyncio.Event()
    existing: set[str] = set()
    announced_with: list[set[str]] = []
    declare, publish = coordinator.transport.declare, coordinator.transport.publish

    async def slow_intake_declare(topology: Topology) -> None:
        queues = {q.name for q in topology.queues}
        if queues & {intake_queue(n) for n in names}:
            await release.wait()
        await declare(topology)
        existing.update(queues)

    async def noting(exchange: str, routing_key: str, body: bytes, **kwargs: Any) -> None:
        if exchange == ANNOUNCE_EXCHANGE:
            announced_with.append(set(existing))
        await publish(exchange, routing_key, body, **kwargs)

    coordinator.transport.declare = slow_intake_declare  # type: ignore[method-assign]
    coordinator.transport.publish = noting  # type: ignore[method-assign]
    await coordinator.start()
    for name in names:
        await ScriptedParticipant(name, broker.connect(name), consensus_answers).join()
    await eventually(lambda: len(coordinator.store.members()) == 2, timeout=5.0)
    opening = asyncio.create_task(coordinator._open_round())
    await asyncio.sleep(0.2)
    assert announced_with == []  # waiting for the declarations the Joins started
    release.set()
    assert await asyncio.wait_for(opening, 5.0)
    assert {intake_queue(n) for n in names} <= announced_with[0]
    await coordinator.stop_intake()


async def test_a_control_message_judged_from_the_lobby_is_not_judged_again_from_the_intake_queue(
    tmp_path: Path,
) -> None:
    # Control traffic lands in the lobby and in the sender's intake queue. Before the coordinator
    # consumes that queue, the lobby's copy is judged; the queue's copy must then be acked unread.
    broker = MemoryBroker()
    broker.declare(full_topology(["alice", "mallory"]).merged(intake_topology(["mallory"])))
    coordinator = memory_coordinator(write_config(tmp_path, min_participants=1, quorum=1), broker)
    dead: list[Delivery] = []

    async def collect(delivery: Delivery) -> None:
        dead.append(delivery)

    await broker.connect("inspector").consume(DEAD_LETTER_QUEUE, collect)
    await coordinator.start()  # consumes the lobby; mallory has not joined, so not its intake queue
    forged = ParticipantReport(
        federation="test",
        round_id=1,
        message_id=report_id("alice", 1),  # names alice: refused
        participant_id="mallory",
        metrics={"loss": 0.0},
    )
    mallory = broker.connect("mallory")
    await mallory.publish(UP_EXCHANGE, control_key("mallory"), encode(forged), message_id=forged.message_id)
    await eventually(lambda: len(dead) == 1, timeout=5.0)
    await coordinator.intake.consume(["mallory"])  # as a Join would have it
    await eventually(lambda: broker.queue_depth(intake_queue("mallory")) == 0, timeout=5.0)
    await asyncio.sleep(0.1)
    assert len(dead) == 1 and coordinator.counters.dead_lettered == 1  # judged once
    await coordinator.stop_intake()


async def test_reputation_weighting_reads_the_earlier_rounds_agreement(tmp_path: Path) -> None:
    config = write_config(tmp_path, min_participants=4, quorum=4, rounds=2)
    config.write_text(config.read_text().replace("[consensus]", '[consensus]\nvote_weighting = "reputation"'))
    broker = MemoryBroker()
    names = ["alice", "bob", "carol", "mallory"]
    broker.declare(full_topology(names))
    coordinator = memory_coordinator(config, broker)
    participants = [ScriptedParticipant(n, broker.connect(n), consensus_answers) for n in names]
    await run_with_participants(coordinator, participants)
    first, second = coordinator.closed_rounds
    assert coordinator.strategy._agreement_history(2) == [first.agreement]  # type: ignore[attr-defined]
    assert min(first.agreement, key=lambda p: first.agreement[p]) == "mallory"
    labels = [label for p in participants for m in p.labels.values() for label in m.labels]
    assert labels and all(label.source != "mallory" for label in labels)
    assert [o.status for o in second.shards] == ["labelled"] * 3
