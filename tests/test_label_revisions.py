"""late_policy "revise": a straggler's answers to a closed round revise that round's labels when the
next round closes, on a real RabbitMQ node; and the pieces that decide and apply a revision."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.coordinators import coordinator_at, write_config
from support.scripted import ScriptedParticipant, participant_at
from support.waiting import eventually

from broker.topology import COORDINATOR_USER
from coordinator.labelling import changed_labels
from schemas import Label, PseudoLabels, RoundOpened
from schemas.codec import decode_reply
from schemas.ids import label_revision_id, pseudo_labels_id

FEDERATION = "revisions"
FIRST = "Paris is the capital of France."
SECOND = "zebras juggle quantum xylophones"


def answers(participant_id: str, prompt_id: str) -> str:
    """alice says one thing, everyone else another: two answers tie, a third one settles it."""
    return FIRST if participant_id.startswith("alice") else SECOND


@dataclass
class Straggler(ScriptedParticipant):
    """Answers round 1 only once it saw round 1 close (a late answer), later rounds after that."""

    late_sent: asyncio.Event = field(default_factory=asyncio.Event)

    async def _answer(self, opened: RoundOpened) -> None:
        if opened.round_id == 1:
            await eventually(lambda: self.closing(1) is not None, timeout=30)
            await super()._answer(opened)
            self.late_sent.set()
        else:
            await self.late_sent.wait()
            await super()._answer(opened)


@pytest.mark.amqp
async def test_a_stragglers_late_answers_revise_the_labels_once_the_next_round_closes(
    tmp_path: Path, rabbit_vhost: Callable[..., dict[str, str]]
) -> None:
    names = ["alice", "bob", "carol"]
    urls = rabbit_vhost(participants=names)
    # quorum 2 with a grace of 2 s: round 1 closes on alice and bob; round 2 does not close before
    # carol's late round-1 answers (sent as round 1 closes) are in.
    config = write_config(
        tmp_path,
        federation=FEDERATION,
        rounds=2,
        min_participants=3,
        quorum=2,
        grace_seconds=2.0,
        deadline_seconds=60.0,
        late_policy="revise",
        staleness_weight=1.0,
    )
    coordinator = await coordinator_at(urls[COORDINATOR_USER], config)
    members = [await participant_at(urls[n], n, FEDERATION) for n in names[:2]]
    for member in members:
        member.answer = answers
    carol = await participant_at(urls["carol"], "carol", FEDERATION)
    straggler = Straggler(carol.participant_id, carol.transport, answers, federation=FEDERATION)
    everyone = [*members, straggler]
    await coordinator.start()
    try:
        for participant in everyone:
            await participant.join()
        await asyncio.wait_for(coordinator.drive(), 60)
        first, second = coordinator.closed_rounds
        assert first.answered == ["alice", "bob"] and first.missing == ["carol"]
        assert second.answered == names
        for participant in everyone:
            await eventually(lambda p=participant: p.closing(2) is not None and p.revisions, timeout=10)
    finally:
        for participant in everyone:
            await participant.leave()
            await participant.transport.close()
        await coordinator.stop_intake()
        await coordinator.transport.close()

    assert coordinator.counters.late == len(first.shards)  # carol's three batches, stored late
    originals = {(m.round_id, m.shard_id): m for m in members[0].labels.values()}
    for shard in first.shards:
        original = originals[(1, shard.shard_id)]
        assert original.labels == [] and original.abstained  # alice and bob disagreed: no label
    revisions = {m.shard_id: m for m in members[0].revisions}
    assert revisions.keys() == {s.shard_id for s in first.shards}
    for shard_id, revision in revisions.items():
        assert revision.round_id == 1 and revision.revision == 1
        assert revision.message_id == label_revision_id(FEDERATION, 1, shard_id)
        # bob's answer, now backed by carol's: each prompt alice and bob abstained on is labelled.
        assert {label.prompt_id for label in revision.labels} == set(originals[(1, shard_id)].abstained)
        assert {label.text for label in revision.labels} == {SECOND}
        assert {label.source for label in revision.labels} <= {"bob", "carol"}
    for participant in everyone:  # every member gets each revision once, before round 2's RoundClosed
        assert sorted(m.shard_id for m in participant.revisions) == sorted(revisions)
        assert max(participant.revised_at) <= participant.closed_at[2]
    # Decided once and stored: what a restart sends again is the very bodies that were sent.
    again = [decision.reply for _, decision in sorted(coordinator.store.decisions(1, "revised").items())]
    assert [decode_reply(o.body) for o in again] == [revisions[s] for s in sorted(revisions)]
    coordinator.store.close()


def label(prompt_id: str, text: str) -> Label:
    return Label(prompt_id=prompt_id, text=text, confidence=0.9, support=2, source="bob")


def labels_message(labels: list[Label], abstained: list[str]) -> PseudoLabels:
    return PseudoLabels(
        federation=FEDERATION,
        round_id=1,
        message_id=pseudo_labels_id(FEDERATION, 1, 0),
        participant_id=COORDINATOR_USER,
        shard_id=0,
        labels=labels,
        abstained=abstained,
    )


def test_a_revision_holds_new_texts_and_new_labels_never_withdrawals() -> None:
    original = labels_message([label("q1", "old"), label("q2", "same"), label("q3", "kept")], ["q4"])
    redone = labels_message([label("q1", "new"), label("q2", "same"), label("q4", "first")], ["q3"])
    in_time = {"q1": 3, "q2": 3, "q3": 3, "q4": 3}  # more answers than any label's support: none unanimous
    # q1 changed, q4 gained a label, q2 is unchanged, q3's label stays (a trained label is not withdrawn)
    assert changed_labels(original, redone, in_time) == [label("q1", "new"), label("q4", "first")]
    assert changed_labels(original, original, in_time) == []


def test_a_revision_does_not_overturn_a_label_every_in_time_answer_agreed_with() -> None:
    original = labels_message([label("q1", "old")], [])
    redone = labels_message([label("q1", "new")], [])
    support = original.labels[0].support
    assert changed_labels(original, redone, {"q1": support}) == []  # unanimous in time: kept
    assert changed_labels(original, redone, {"q1": support + 1}) == [label("q1", "new")]
