"""What one hostile participant could do to the others, tried on a real RabbitMQ node.

Each test runs a real coordinator with honest scripted participants in a vhost of its own, has a
participant attack with nothing but its own broker login, and checks that the honest members'
rounds, answers and labels are what they are without the attack.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
from support.attackers import Attacker, DeadLetters, IdThief, directory_bytes, reset_peak_rss, rss_status
from support.coordinators import coordinator_at
from support.driving import drive, names, seconds
from support.faults import FEDERATION, SHARDS, label_table, reference_labels, round_config, stored_batches
from support.lobby_attackers import LobbyAttacker, bodies_held, member_ids, participant_service_at
from support.scripted import ScriptedParticipant, consensus_answers, participant_at
from support.waiting import eventually

from broker.amqp import AmqpTransport
from broker.recorder import RECEIVED_HEADER_BYTES, Recorder, RecordingTransport
from broker.topology import (
    COORDINATOR_USER,
    DEAD_LETTER_MAX_BYTES,
    DEAD_LETTER_QUEUE,
    UP_EXCHANGE,
    control_key,
    generation_key,
    intake_topology,
)
from broker.transport import BODY_BYTES_HEADER, DEAD_LETTER_BODY_BYTES, ORIGINAL_USER_HEADER, REASON_HEADER
from coordinator.service import Coordinator
from coordinator.settings import RoundSettings
from participant.service import Participant
from schemas import (
    Answer,
    GenerationBatch,
    Heartbeat,
    ParticipantReport,
    RoundClosed,
    RoundOpened,
    encode,
    new_message_id,
)
from schemas.ids import batch_id, report_id

pytestmark = pytest.mark.amqp

Vhost = Callable[..., dict[str, str]]


@asynccontextmanager
async def federation(
    urls: dict[str, str], config: Path, dead: DeadLetters | None = None, records: Path | None = None
) -> AsyncIterator[tuple[Coordinator, list[ScriptedParticipant]]]:
    """A started coordinator (recording into `records` if given, and an inspector on chorus.dead);
    whatever the test opens is closed after."""
    coordinator = await coordinator_at(urls[COORDINATOR_USER], config)
    if records is not None:
        recorder = Recorder(records, federation=FEDERATION, settings={})
        recorder.open()
        coordinator.transport = RecordingTransport(coordinator.transport, recorder)
    inspector = AmqpTransport(urls[COORDINATOR_USER], connection_name="test inspector")
    await inspector.__aenter__()
    if dead is not None:
        await inspector.consume(DEAD_LETTER_QUEUE, dead)
    participants: list[ScriptedParticipant] = []
    await coordinator.start()
    try:
        yield coordinator, participants
    finally:
        for participant in participants:
            await participant.leave()
            await participant.transport.close()
        await coordinator.stop_intake()
        await coordinator.transport.close()
        coordinator.store.close()
        await inspector.close()


# -- 1. somebody else's message ids ------------------------------------------


async def test_a_participant_using_another_ones_message_ids_erases_nothing(
    tmp_path: Path, rabbit_vhost: Vhost
) -> None:
    alice, bob, mallory = names("alice", "bob", "mallory")
    urls = rabbit_vhost(participants=(alice, bob, mallory))
    reference = await reference_labels(tmp_path / "reference", [alice, bob, mallory])
    dead = DeadLetters()
    async with federation(urls, round_config(tmp_path / "attack", 3), dead) as (coordinator, participants):
        thief_transport = AmqpTransport(urls[mallory], connection_name="test thief")
        await thief_transport.__aenter__()
        thief = IdThief(mallory, thief_transport, consensus_answers, federation=FEDERATION, victim=alice)
        # The victim and bob answer a second later, with PROTOCOL §7.4's deterministic ids: the thief's
        # copies of those ids are in first.
        for name in (alice, bob):
            participants.append(
                await participant_at(urls[name], name, FEDERATION, protocol_ids=True, delay=1.0)
            )
        participants.append(thief)
        for participant in participants:
            await participant.join()
        try:
            (summary,) = await drive(coordinator, 1)
        except AssertionError as e:
            sent = {p.participant_id: (sorted(p.confirmed_at), p.errors) for p in participants}
            raise AssertionError(f"{e}; confirmed and errors by participant: {sent}") from None
        victim = participants[0]
        await eventually(lambda: len(victim.labels) == SHARDS)

        assert label_table(victim) == reference  # as if there had been no attack
        assert summary.answered == sorted([alice, bob, mallory])
        assert all(o.status == "labelled" and alice in o.answered for o in summary.shards)
        assert {(1, s, alice) for s in range(SHARDS)} <= stored_batches(coordinator, 1)
        stolen = f"names participant {alice!r}, not the sender {mallory!r}"

        # Every theft (3 batches, 1 report) dead-lettered as such (a control message is judged from its
        # lobby copy or its intake-queue copy, whichever comes first, once).
        def stolen_ids() -> set[str | None]:
            return {d.message_id for d in dead.deliveries if stolen in str(d.headers.get(REASON_HEADER, ""))}

        await eventually(lambda: stolen_ids() == set(thief.thefts) and len(thief.thefts) == SHARDS + 1)
        assert any(f"arrived in participant {alice!r}'s intake queue" in r for r in dead.reasons())

        # The victim's report, sent after the thief's copy of its id, is stored as its own.
        report = ParticipantReport(
            federation=FEDERATION,
            round_id=1,
            message_id=report_id(alice, 1),
            participant_id=alice,
            metrics={"loss": 1.5},
        )
        await victim.transport.publish(
            UP_EXCHANGE, control_key(alice), encode(report), message_id=report.message_id
        )
        await eventually(lambda: any(p == alice for _, p, _ in coordinator.store.reports(1)))
        assert [(p, m) for _, p, m in coordinator.store.reports(1)] == [(alice, {"loss": 1.5})]


# -- 2. one huge control message ---------------------------------------------


async def test_a_huge_hostile_control_message_delays_no_round_and_costs_little_memory(
    tmp_path: Path, rabbit_vhost: Vhost
) -> None:
    alice, bob, mallory = names("alice", "bob", "mallory")
    urls = rabbit_vhost(participants=(alice, bob, mallory))
    config = round_config(tmp_path, 2, grace_seconds=0.0)
    dead = DeadLetters()
    # Eight million keys: decoding it into Python objects takes seconds and most of a gigabyte.
    attacker = Attacker(urls[mallory], mallory, FEDERATION, "huge", 8_000_000)
    try:
        async with federation(urls, config, dead) as (coordinator, participants):
            for name in (alice, bob):
                participants.append(await participant_at(urls[name], name, FEDERATION, delay=2.0))
                await participants[-1].join()
            await attacker.ready()
            (quiet,) = await drive(coordinator, 1)
            reset_peak_rss()
            rss_before = rss_status("VmRSS")
            attacker.go()  # lands while round 2 waits for the honest answers
            (attacked,) = await drive(coordinator, 2)
            await attacker.finish()
            await eventually(lambda: any("too_large" in r for r in dead.reasons()), timeout=30)
            peak = rss_status("VmHWM") - rss_before
    finally:
        attacker.kill()
    print(
        f"round without attack {seconds(quiet):.2f}s, with {seconds(attacked):.2f}s; peak +{peak >> 20} MiB"
    )
    assert all(o.status == "labelled" for o in attacked.shards)
    assert seconds(attacked) < seconds(quiet) + 1.5
    # The body itself (48 MB) arrives once, in AMQP frames; nothing of it is decoded.
    assert peak < 256 * 1024 * 1024


# -- 3. one member's flood ---------------------------------------------------


async def test_a_flooding_member_delays_no_one_and_fills_no_shared_storage(
    tmp_path: Path, rabbit_vhost: Vhost
) -> None:
    alice, bob, mallory = names("alice", "bob", "mallory")
    urls = rabbit_vhost(participants=(alice, bob, mallory))
    config = round_config(tmp_path, 2, min_participants=3, grace_seconds=0.0)
    records = tmp_path / "records"
    dead = DeadLetters()
    # Small malformed batches as fast as it can, and a 4 MiB + 1 byte body every tenth burst.
    attacker = Attacker(urls[mallory], mallory, FEDERATION, "flood", 0, seconds=14.0)
    try:
        async with federation(urls, config, dead, records) as (coordinator, participants):
            await attacker.ready()
            await eventually(lambda: len(coordinator.store.members()) == 1)  # the flooder joined
            for name in (alice, bob):
                participants.append(await participant_at(urls[name], name, FEDERATION, delay=1.0))
                await participants[-1].join()
            (quiet,) = await drive(coordinator, 1)
            # The flood builds a backlog while the coordinator is away (as behind a slow consensus or a
            # restart), and goes on through round 2.
            await coordinator.stop_intake()
            attacker.go()
            await asyncio.sleep(6.0)
            reset_peak_rss()
            rss_before = rss_status("VmRSS")
            await coordinator.start()
            (flooded,) = await drive(coordinator, 2)
            peak = rss_status("VmHWM") - rss_before
            tally = await attacker.finish()
            assert isinstance(coordinator.transport, RecordingTransport)
            coordinator.transport.recorder.flush()
            await eventually(lambda: len(dead.deliveries) >= coordinator.counters.dead_lettered, timeout=30)
    finally:
        attacker.kill()
    dead_bytes = sum(len(d.body) for d in dead.deliveries)
    print(
        f"round without flood {seconds(quiet):.2f}s, with {seconds(flooded):.2f}s; attacker {tally}; "
        f"peak +{peak >> 20} MiB; {len(dead.deliveries)} dead letters, {dead_bytes} B; "
        f"records {directory_bytes(records)} B"
    )
    assert all(o.status == "labelled" for o in flooded.shards)
    assert sorted(flooded.answered) == sorted([alice, bob])
    assert seconds(flooded) < seconds(quiet) + 3.0
    assert any(int(str(d.headers[BODY_BYTES_HEADER])) > DEAD_LETTER_BODY_BYTES for d in dead.deliveries)
    assert all(len(d.body) <= DEAD_LETTER_BODY_BYTES for d in dead.deliveries)
    assert dead_bytes <= DEAD_LETTER_MAX_BYTES
    assert directory_bytes(records) < 16 * 1024 * 1024
    assert peak < 512 * 1024 * 1024


# -- 4. a silent member ------------------------------------------------------


async def test_a_silent_member_is_sidelined_and_comes_back_when_it_answers(
    tmp_path: Path, rabbit_vhost: Vhost
) -> None:
    alice, bob, carol = names("alice", "bob", "carol")
    urls = rabbit_vhost(participants=(alice, bob, carol))
    # The default quorum (1.0: every active member) and a short deadline.
    config = round_config(tmp_path, 3, quorum=1.0, deadline_seconds=1.5, sideline_after_missed_rounds=2)
    async with federation(urls, config) as (coordinator, participants):
        for name in (alice, bob, carol):
            participants.append(await participant_at(urls[name], name, FEDERATION, silent=name == carol))
            await participants[-1].join()
        first, second, third = await drive(coordinator, 3)
        assert [o.status for o in first.shards + second.shards] == ["failed"] * 2 * SHARDS
        assert first.missing == second.missing == [carol]
        # Sidelined after two silent rounds: asked, not waited for.
        assert coordinator.counters.sidelined == [(3, carol)]
        assert all(o.status == "labelled" for o in third.shards)
        assert seconds(third) < 1.0
        assert carol in coordinator.store.expected(3)
        participants[2].silent = False  # it answers round 4, and is waited for again in round 5
        fourth, fifth = await drive(coordinator, 5)
        assert carol in fourth.answered or carol in fourth.late
        assert all(carol in o.answered for o in fifth.shards)


# -- 5. smaller holes ---------------------------------------------------------


async def test_forged_audit_headers_replayed_ids_and_non_finite_numbers_are_refused(
    tmp_path: Path, rabbit_vhost: Vhost
) -> None:
    alice, mallory = names("alice", "mallory")
    urls = rabbit_vhost(participants=(alice, mallory))
    dead = DeadLetters()
    config = round_config(tmp_path, 2, grace_seconds=0.0)
    async with federation(urls, config, dead) as (coordinator, participants):
        for name in (alice, mallory):
            participants.append(await participant_at(urls[name], name, FEDERATION, protocol_ids=True))
            await participants[-1].join()
        await drive(coordinator, 1)
        hostile = participants[1].transport
        assert isinstance(hostile, AmqpTransport)
        expected_reasons: list[str] = []

        async def attack(reason: str, send: Awaitable[None]) -> None:
            expected_reasons.append(reason)
            await send

        # No user_id, and headers that would name the victim and a reason in the dead letter.
        heartbeat = Heartbeat(
            federation=FEDERATION,
            round_id=1,
            message_id=new_message_id(),
            participant_id=mallory,
            sent_unix=1.0,
        )
        await attack(
            "user_id is missing",
            hostile.publish_with_user_id_for_tests(
                UP_EXCHANGE,
                control_key(mallory),
                encode(heartbeat),
                message_id=heartbeat.message_id,
                user_id=None,
                headers={ORIGINAL_USER_HEADER: alice, "x-chorus-reason": "alice did it"},
            ),
        )
        # Heartbeat times and report metrics must be finite.
        for bad in (math.inf, math.nan):
            beat = Heartbeat(
                federation=FEDERATION,
                round_id=1,
                message_id=new_message_id(),
                participant_id=mallory,
                sent_unix=bad,
            )
            await attack(
                "schema invalid",
                hostile.publish(UP_EXCHANGE, control_key(mallory), encode(beat), message_id=beat.message_id),
            )
            report = ParticipantReport(
                federation=FEDERATION,
                round_id=1,
                message_id=new_message_id(),
                participant_id=mallory,
                metrics={"loss": bad},
            )
            await attack(
                "schema invalid",
                hostile.publish(
                    UP_EXCHANGE, control_key(mallory), encode(report), message_id=report.message_id
                ),
            )
        await eventually(lambda: len(dead.deliveries) == len(expected_reasons))
        for delivery, reason in zip(dead.deliveries, expected_reasons, strict=True):
            assert reason in str(delivery.headers["x-chorus-reason"])
        forged = dead.deliveries[0]
        assert ORIGINAL_USER_HEADER not in forged.headers  # no user_id, and the forged one is gone
        assert forged.headers[BODY_BYTES_HEADER] == len(encode(heartbeat))

        # Round 2: mallory replays its round-1 batch id for shard 0 before answering: refused, and
        # it is not counted as having answered with it.
        participants[1].delay = 1.0
        drive_two = asyncio.create_task(drive(coordinator, 2))
        await eventually(lambda: coordinator.round is not None and coordinator.round.round_id == 2)
        state = coordinator.round
        assert state is not None
        replayed = GenerationBatch(
            federation=FEDERATION,
            round_id=2,
            message_id=batch_id(mallory, 1, 0),
            participant_id=mallory,
            shard_id=0,
            model_id="scripted",
            answers=[Answer(prompt_id=p, text="replayed") for p in state.shards[0].prompt_ids],
        )
        await hostile.publish(
            UP_EXCHANGE, generation_key(0, mallory), encode(replayed), message_id=replayed.message_id
        )
        (second,) = await drive_two
        await eventually(lambda: any("was already used for (1, 0)" in r for r in dead.reasons()))

        # A recovering participant republishes its round-1 batches after round 1 closed: duplicates, not
        # rejections.
        duplicates, rejections = coordinator.counters.duplicates, coordinator.counters.dead_lettered
        batch = coordinator.store.batches(1, 0)[0]
        await participants[0].transport.publish(
            UP_EXCHANGE, generation_key(0, alice), batch.body, message_id=batch_id(alice, 1, 0)
        )
        await eventually(lambda: coordinator.counters.duplicates == duplicates + 1)
        assert coordinator.counters.dead_lettered == rejections
        assert second.round_id == 2


# -- 6. one member sets everyone's pace (issue 20.4) ----------------------------


class LastSecond(ScriptedParticipant):
    """Answers every shard of every round with a valid batch, a second before the deadline."""

    async def _answer(self, opened: RoundOpened) -> None:
        await asyncio.sleep(max(0.0, opened.deadline_unix - opened.opened_unix - 1.0))
        await super()._answer(opened)


class OneEmptyBatch(ScriptedParticipant):
    """Sends one batch a round, with no answers, for shard 0, and nothing for the other shards."""

    async def _answer(self, opened: RoundOpened) -> None:
        empty = msgspec.structs.replace(self.batch(opened, opened.shards[0]), answers=[])
        await self.send(empty)


async def run_paced_by(
    tmp_path: Path, rabbit_vhost: Vhost, attacker_class: type[ScriptedParticipant]
) -> tuple[list[RoundClosed], Coordinator, str]:
    """Three honest members and `attacker_class` under the default quorum (1.0) and straggler bound,
    a 10 s deadline and 1 s of grace: three rounds."""
    alice, bob, carol, mallory = names("alice", "bob", "carol", "mallory")
    urls = rabbit_vhost(participants=(alice, bob, carol, mallory))
    defaults = RoundSettings()
    config = round_config(
        tmp_path,
        4,
        quorum=defaults.quorum,
        straggler_factor=defaults.straggler_factor,
        deadline_seconds=10.0,
        grace_seconds=1.0,
    )
    async with federation(urls, config) as (coordinator, participants):
        for name in (alice, bob, carol):
            participants.append(await participant_at(urls[name], name, FEDERATION))
        transport = AmqpTransport(urls[mallory], connection_name="test attacker")
        await transport.__aenter__()
        participants.append(attacker_class(mallory, transport, consensus_answers, federation=FEDERATION))
        for participant in participants:
            await participant.join()
        summaries = await drive(coordinator, 3, timeout=90.0)
    labels = [sum(o.labelled for o in s.shards) for s in summaries]
    print(
        f"{attacker_class.__name__}: rounds {[round(seconds(s), 2) for s in summaries]} s (deadline 10 s), "
        f"labels {labels} of {2 * SHARDS} a round, "
        f"shards {[[o.status for o in s.shards] for s in summaries]}, "
        f"sidelined {coordinator.counters.sidelined}"
    )
    return summaries, coordinator, mallory


async def test_a_member_answering_just_before_the_deadline_holds_no_round(
    tmp_path: Path, rabbit_vhost: Vhost
) -> None:
    summaries, coordinator, mallory = await run_paced_by(tmp_path, rabbit_vhost, LastSecond)
    for summary in summaries:
        # Each shard waited for mallory at most max(grace, the time the honest majority took): not 9 s.
        assert seconds(summary) < 3.0
        assert all(o.status == "labelled" and mallory not in o.answered for o in summary.shards)
        assert sum(o.labelled for o in summary.shards) == 2 * SHARDS
    assert "straggler bound" in summaries[0].shards[0].reason
    # Its answers come after the round closed, so it missed the first two rounds: sidelined in the third.
    assert coordinator.counters.sidelined == [(3, mallory)]


async def test_a_member_sending_one_empty_batch_fails_no_shard(tmp_path: Path, rabbit_vhost: Vhost) -> None:
    summaries, coordinator, mallory = await run_paced_by(tmp_path, rabbit_vhost, OneEmptyBatch)
    for summary in summaries:
        assert seconds(summary) < 3.0
        assert [o.status for o in summary.shards] == ["labelled"] * SHARDS
        assert sum(o.labelled for o in summary.shards) == 2 * SHARDS
    # It answered shard 0 and left the others unanswered: it missed the round, as a silent member does.
    assert summaries[0].missing == summaries[1].missing == [mallory]
    assert coordinator.counters.sidelined == [(3, mallory)]


# -- 7. the lobby: a newcomer's Join, and what is refused unread (issue 20.5) ----


async def test_newcomers_join_while_another_member_floods_the_lobby(
    tmp_path: Path, rabbit_vhost: Vhost
) -> None:
    mallory, nina, olga, paula = names("mallory", "nina", "olga", "paula")
    urls = rabbit_vhost(participants=(mallory, nina, olga, paula))
    config = round_config(tmp_path, 3, min_participants=4)
    # Valid heartbeats padded to 60 KB (decoders skip unknown keys): the lobby keeps 279 of them.
    attacker = LobbyAttacker(urls[mallory], mallory, FEDERATION, "heartbeats", 60_000, seconds=8.0)
    services: list[Participant] = []
    try:
        async with federation(urls, config) as (coordinator, participants):
            async with AmqpTransport(urls[COORDINATOR_USER], connection_name="test provisioning") as operator:
                await operator.declare(intake_topology([olga]))  # as `chorus-broker add-participant` does
            await attacker.ready()
            await eventually(lambda: mallory in member_ids(coordinator))
            # The coordinator is away (a restart, a long step) while nina (the participant service) and
            # olga (one Join, as a client of PROTOCOL.md's first text sends) join, and the flood pushes
            # both Joins out of the lobby; paula joins while the flood goes on.
            await coordinator.stop_intake()
            services.append(await participant_service_at(urls[nina], nina, FEDERATION, tmp_path / nina))
            participants.append(await participant_at(urls[olga], olga, FEDERATION))
            await participants[-1].join()
            attacker.go()
            started = time.monotonic()
            await asyncio.sleep(2.0)
            await coordinator.start()
            services.append(await participant_service_at(urls[paula], paula, FEDERATION, tmp_path / paula))
            newcomers = {nina, olga, paula}
            while not newcomers <= member_ids(coordinator) and time.monotonic() - started < 20.0:
                # olga heartbeats, as every participant does (every 15 s by default; here every second)
                beat = Heartbeat(
                    federation=FEDERATION,
                    round_id=0,
                    message_id=new_message_id(),
                    participant_id=olga,
                    sent_unix=time.time(),
                )
                await participants[-1].transport.publish(
                    UP_EXCHANGE, control_key(olga), encode(beat), message_id=beat.message_id
                )
                await asyncio.sleep(1.0)
            joined = sorted(newcomers & member_ids(coordinator))
            waited = time.monotonic() - started
            print(f"members {joined} after {waited:.1f} s; attacker {await attacker.finish()}")
            assert joined == sorted(newcomers)
            (summary,) = await drive(coordinator, 1)
            assert newcomers <= set(summary.answered)
            # Expected in a round: the services stop sending their Join again.
            await eventually(lambda: all(s._rejoin is not None and s._rejoin.done() for s in services))
    finally:
        attacker.kill()
        for service in services:
            await service.stop()
            await service.transport.close()


async def test_refused_control_messages_are_recorded_cut_and_their_bodies_freed(
    tmp_path: Path, rabbit_vhost: Vhost
) -> None:
    (mallory,) = names("mallory")
    urls = rabbit_vhost(participants=(mallory,))
    records = tmp_path / "records"
    size = 64 * 1024 * 1024
    # Three control messages of 64 MiB, then 5 s of valid heartbeats padded to 60 KB with 60 KB of
    # headers: each is refused unread from mallory's intake queue, and its lobby copy acked unread.
    oversized = LobbyAttacker(urls[mallory], mallory, FEDERATION, "oversized", size, count=3)
    flood = LobbyAttacker(
        urls[mallory], mallory, FEDERATION, "heartbeats", 60_000, seconds=5.0, header_bytes=60_000
    )
    try:
        async with federation(urls, round_config(tmp_path, 1), records=records) as (coordinator, _):
            assert isinstance(coordinator.transport, RecordingTransport)
            await oversized.ready()
            await flood.ready()
            await eventually(lambda: mallory in member_ids(coordinator))
            gc.collect()  # what earlier tests left for the collector
            rss_before, records_before = rss_status("VmRSS"), directory_bytes(records)
            oversized.go()
            await oversized.finish()
            flood.go()
            sent = 3 + int((await flood.finish()).split()[1])
            received = -1
            for _ in range(30):  # until intake took nothing more for a second
                if coordinator.counters.received_bytes == received:
                    break
                received = coordinator.counters.received_bytes
                await asyncio.sleep(1.0)
            coordinator.transport.recorder.flush()
            grown = directory_bytes(records) - records_before
            held = bodies_held(32 * 1024)
            rss_grown = rss_status("VmRSS") - rss_before
    finally:
        oversized.kill()
        flood.kill()
    print(f"{sent} messages: records +{grown >> 10} KiB, RSS +{rss_grown >> 20} MiB, bodies held {held}")
    # Each message leaves two copies, each recorded with its body and headers cut to 4 KiB.
    assert grown <= 2 * sent * (DEAD_LETTER_BODY_BYTES + RECEIVED_HEADER_BYTES + 1024)
    # Nothing keeps a body once its delivery is settled (a reference cycle between a delivery and its
    # settlers kept every one until the cyclic collector ran): its memory is given back at once.
    assert held == []
    assert rss_grown < size
