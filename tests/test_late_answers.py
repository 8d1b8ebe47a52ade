"""Which batches for the previous round the coordinator still takes, for label revisions."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from broker.topology import COORDINATOR_USER, generation_key
from broker.transport import Delivery
from coordinator.decisions import Decision, Outgoing
from coordinator.late_answers import RevisionWindow
from coordinator.store import CoordinatorStore, NewBatch
from schemas import Answer, GenerationBatch, Prompt, PromptShard, RoundOpened, encode

SHARDS = {0: ["q0", "q1"], 1: ["q2", "q3"]}


@pytest.fixture
def store(tmp_path: Path) -> CoordinatorStore:
    """Round 1 expected ana, ben and cyd; shard 0 closed labelled on ana and ben, shard 1 failed."""
    store = CoordinatorStore(tmp_path / "state.sqlite3")
    opened = RoundOpened(
        federation="f",
        round_id=1,
        message_id="f.r1.opened",
        participant_id=COORDINATOR_USER,
        shards=[
            PromptShard(shard_id=s, prompts=[Prompt(prompt_id=p, text=f"{p}?") for p in prompts])
            for s, prompts in SHARDS.items()
        ],
        expected=["ana", "ben", "cyd"],
        quorum=2,
        deadline_unix=10.0,
        opened_unix=0.0,
    )
    store.insert_round(
        round_id=1,
        opened_unix=0.0,
        deadline_unix=10.0,
        quorum=2,
        expected=opened.expected,
        announcement=encode(opened),
    )
    store.save_closing(1, 0, "labelled", "quorum reached", ["ana", "ben"])
    store.save_closing(1, 1, "failed", "below quorum", ["ana"])
    store.close_round(1, 5.0, b"summary")
    return store


def late(
    participant: str, shard: int, prompts: list[str], round_id: int = 1
) -> tuple[Delivery, GenerationBatch]:
    batch = GenerationBatch(
        federation="f",
        round_id=round_id,
        message_id=f"{participant}.r{round_id}.s{shard}.gen",
        participant_id=participant,
        shard_id=shard,
        model_id="m",
        answers=[Answer(prompt_id=p, text="late") for p in prompts],
    )
    delivery = Delivery(
        body=encode(batch),
        exchange="chorus.up",
        routing_key=generation_key(shard, participant),
        message_id=batch.message_id,
        user_id=participant,
        redelivered=False,
    )
    return delivery, batch


def test_a_missing_members_answer_to_a_labelled_shard_is_taken_while_the_next_round_runs(
    store: CoordinatorStore,
) -> None:
    window = RevisionWindow(store)
    assert window.admits(*late("cyd", 0, ["q0", "q1"]), open_round=2)
    assert window.admits(*late("cyd", 0, ["q1"]), open_round=None)  # between rounds 1 and 2
    assert window.admits(*late("cyd", 0, ["q0"]), open_round=2)  # part of the shard is fine


@pytest.mark.parametrize(
    ("participant", "shard", "prompts", "open_round", "why"),
    [
        ("cyd", 0, ["q0"], 3, "round 1 is two rounds back: its revision is decided"),
        ("cyd", 0, ["q0"], 1, "round 1 itself is open: that is intake's ordinary late path"),
        ("ana", 0, ["q0"], 2, "ana answered shard 0 in time"),
        ("cyd", 1, ["q2"], 2, "shard 1 failed: its prompts come back in the next round instead"),
        ("dan", 0, ["q0"], 2, "dan was not expected in round 1"),
        ("cyd", 0, ["q2"], 2, "q2 is not a prompt of shard 0"),
        ("cyd", 0, ["q0", "q0"], 2, "a repeated prompt"),
        ("cyd", 7, ["q0"], 2, "round 1 has no shard 7"),
    ],
)
def test_other_batches_for_a_closed_round_are_not_taken(
    store: CoordinatorStore, participant: str, shard: int, prompts: list[str], open_round: int, why: str
) -> None:
    assert not RevisionWindow(store).admits(*late(participant, shard, prompts), open_round=open_round), why


def test_nothing_is_taken_for_a_round_once_it_was_revised(store: CoordinatorStore) -> None:
    store.save_decisions(1, "revised", [], round_done=True)
    assert store.stage_done(1, "revised") and store.decisions(1, "revised") == {}
    assert not RevisionWindow(store).admits(*late("cyd", 0, ["q0"]), open_round=2)


def test_a_batch_whose_routing_key_names_another_shard_is_not_taken(store: CoordinatorStore) -> None:
    delivery, batch = late("cyd", 0, ["q0"])
    moved = Delivery(
        body=delivery.body,
        exchange=delivery.exchange,
        routing_key=generation_key(1, "cyd"),
        message_id=delivery.message_id,
        user_id="cyd",
        redelivered=False,
    )
    assert not RevisionWindow(store).admits(moved, batch, open_round=2)


def test_revisions_are_stored_once_per_round(store: CoordinatorStore) -> None:
    assert not store.stage_done(1, "revised")  # not revised yet
    store.save_decisions(1, "revised", [revision(b"rev")], round_done=True)
    store.save_decisions(1, "revised", [revision(b"other")], round_done=True)  # a second changes nothing
    assert {shard: d.reply.body for shard, d in store.decisions(1, "revised").items()} == {0: b"rev"}


def revision(body: bytes) -> Decision:
    return Decision(0, Outgoing("test.r1.s0.labels.rev1", body, "label_revision"))


def test_one_late_batch_per_member_and_shard(store: CoordinatorStore) -> None:
    window = RevisionWindow(store)
    delivery, batch = late("cyd", 0, ["q0"])
    assert window.admits(delivery, batch, open_round=2)
    assert not window.holds(batch)
    window.taken(batch)  # intake stored it
    again = msgspec.structs.replace(batch, message_id="cyd.other-id")
    # Not taken again, and known as a duplicate of the stored one (PROTOCOL §6.5) without the store.
    assert not window.admits(delivery, again, open_round=2) and window.holds(again)
    # A window that starts after the batch was stored sees it too.
    store.add_batches([NewBatch(batch.message_id, 1, 0, "cyd", 6.0, True, delivery.body)])
    fresh = RevisionWindow(store)
    assert not fresh.admits(delivery, again, open_round=2)
    assert fresh.holds(again)
