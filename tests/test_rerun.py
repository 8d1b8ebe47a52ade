"""A federation run has an identity: re-running a federation on a fresh coordinator state, with
participants that hold an earlier run's rounds, must not stall (issue 21, point 1).

The coordinator makes a run id with its state and announces it in every RoundOpened; a participant
that meets a run it holds no state for archives the old run's ledger and checkpoints and starts the
new run afresh, from its warm-up model. A participant never skips an announcement in silence.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from support.coordinators import coordinator_at, write_config

from broker.amqp import AmqpTransport
from broker.transport import Delivery
from coordinator.store import CoordinatorStore
from participant.data import Example
from participant.evaluation import Embedder
from participant.generation import GeneratedAnswer
from participant.service import Participant
from participant.settings import ParticipantSettings, TrainSettings
from schemas.codec import decode_reply, encode
from schemas.ids import batch_id, round_closed_id, round_opened_id
from schemas.messages import (
    GenerationParams,
    Message,
    Prompt,
    PromptShard,
    RoundClosed,
    RoundOpened,
)

FEDERATION = "rerun"
PRIVATE = [Example(prompt=f"Private {i}?", response=f"Answer {i}.") for i in range(3)]


class NotebookLearner:
    """A learner whose weights are the list of prompts it trained on; a checkpoint is that list as JSON.

    So a checkpoint says exactly what the model learnt, and from which starting point."""

    model_id = "notebook"

    def __init__(self) -> None:
        self.trained: list[str] = []

    def generate(self, prompts: Sequence[tuple[str, str]], params: GenerationParams) -> list[GeneratedAnswer]:
        return [GeneratedAnswer(prompt_id, f"The answer to {text}", 3, 4) for prompt_id, text in prompts]

    def train(self, examples: Sequence[Example]) -> None:
        self.trained.extend(e.prompt for e in examples)

    def save_checkpoint(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "weights.json").write_text(json.dumps(self.trained))

    def load_checkpoint(self, directory: Path) -> bool:
        weights = directory / "weights.json"
        if not weights.is_file():
            return False
        self.trained = json.loads(weights.read_text())
        return True

    def evaluate(
        self, test: Sequence[Example], embed: Embedder, params: GenerationParams | None = None
    ) -> dict[str, float]:
        return {}


def weights(checkpoint: Path) -> list[str]:
    return list(json.loads((checkpoint / "weights.json").read_text()))


class RecordingTransport:
    """Just enough of a transport for `Participant._on_reply`: remembers the message ids published."""

    def __init__(self) -> None:
        self.published: list[str] = []

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, *, message_id: str, **_: Any
    ) -> None:
        self.published.append(message_id)


def notebook_participant(state_dir: Path, transport: Any, *, pid: str = "ana") -> Participant:
    settings = ParticipantSettings(
        federation=FEDERATION,
        participant_id=pid,
        state_dir=str(state_dir),
        heartbeat_seconds=0.5,
        evaluate=False,
        progress=False,
        train=TrainSettings(warmup_epochs=1, private_examples_per_round=1),
    )
    return Participant(settings, transport, NotebookLearner(), private_train=PRIVATE)


def announcement(round_id: int, run_id: str | None, *, expected: Sequence[str] = ("ana",)) -> RoundOpened:
    extra: dict[str, Any] = {} if run_id is None else {"run_id": run_id}
    return RoundOpened(
        federation=FEDERATION,
        round_id=round_id,
        message_id=round_opened_id(FEDERATION, round_id),
        participant_id="coordinator",
        shards=[PromptShard(shard_id=0, prompts=[Prompt(prompt_id=f"q{round_id}", text=f"Q{round_id}?")])],
        expected=list(expected),
        quorum=1,
        deadline_unix=1_800_000_060.0,
        opened_unix=1_800_000_000.0,
        **extra,
    )


def summary(round_id: int) -> RoundClosed:
    return RoundClosed(
        federation=FEDERATION,
        round_id=round_id,
        message_id=round_closed_id(FEDERATION, round_id),
        participant_id="coordinator",
        shards=[],
        answered=["ana"],
        opened_unix=1_800_000_000.0,
        closed_unix=1_800_000_001.0,
    )


async def deliver(participant: Participant, message: Message) -> None:
    """Hand `message` to the participant as its reply queue would, and check it was acked."""
    settled: list[str] = []

    async def settle(action: str, reason: str) -> None:
        settled.append(action)

    body = encode(message)
    await participant._on_reply(
        Delivery(body, "chorus.announce", "", message.message_id, None, False, {}, None, settle)
    )
    assert settled == ["ack"]


async def run_rounds(participant: Participant, rounds: Sequence[int], run_id: str | None) -> None:
    for round_id in rounds:
        await deliver(participant, announcement(round_id, run_id))
        await deliver(participant, summary(round_id))


def warnings(logs: Sequence[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == event and e["log_level"] == "warning"]


# ---- the participant, without a broker --------------------------------------------------------------


async def test_a_new_run_is_started_afresh_from_the_warm_up_and_the_old_run_is_archived(
    tmp_path: Path,
) -> None:
    transport = RecordingTransport()
    participant = notebook_participant(tmp_path / "ana", transport)
    await participant._warm_up()
    await run_rounds(participant, [1, 2], "run-a")
    assert transport.published == [
        batch_id("ana", 1, 0),
        "ana.r1.report",
        batch_id("ana", 2, 0),
        "ana.r2.report",
    ]
    run_a_round_1 = weights(tmp_path / "ana" / "checkpoints" / "round-1")

    with capture_logs() as logs:
        await run_rounds(participant, [1], "run-b")  # a re-run: round ids begin again
    # Round 1 of the new run was answered and applied, not taken for run-a's round 1.
    assert transport.published[4:] == [batch_id("ana", 1, 0), "ana.r1.report"]
    (changed,) = warnings(logs, "run_changed")
    assert changed["state_dir"] == str(tmp_path / "ana")
    assert (changed["previous_run"], changed["run"], changed["archived_rounds"]) == ("run-a", "run-b", [1, 2])
    assert changed["model"] == "warm-up checkpoint (round 0)"
    assert participant.ledger.run_id() == "run-b"
    assert participant.ledger.last_applied_round() == 1
    # The new run started from the warm-up, as run-a did: its round 1 learnt what run-a's round 1 did.
    state = tmp_path / "ana"
    assert weights(state / "checkpoints" / "round-1") == run_a_round_1
    assert sorted(p.name for p in (state / "checkpoints").iterdir()) == ["round-0", "round-1"]
    archive = state / "runs" / "run-a"
    assert sorted(p.name for p in (archive / "checkpoints").iterdir()) == ["round-1", "round-2"]
    with sqlite3.connect(archive / "participant.sqlite3") as old:
        assert old.execute("SELECT round_id FROM rounds WHERE applied = 1 ORDER BY 1").fetchall() == [
            (1,),
            (2,),
        ]
    participant.ledger.close()

    # A restart in the new run resumes the new run's model and ledger.
    restarted = notebook_participant(state, RecordingTransport())
    assert await asyncio.to_thread(restarted._restore_checkpoint) == 1
    assert restarted.ledger.run_id() == "run-b"
    restarted.ledger.close()


async def test_a_redelivered_announcement_of_the_same_run_is_skipped_with_a_warning(tmp_path: Path) -> None:
    transport = RecordingTransport()
    participant = notebook_participant(tmp_path / "ana", transport)
    await run_rounds(participant, [1], "run-a")
    with capture_logs() as logs:
        await deliver(participant, announcement(1, "run-a"))  # a coordinator restart re-announces it
    assert transport.published == [batch_id("ana", 1, 0), "ana.r1.report"]
    assert warnings(logs, "run_changed") == []
    (skipped,) = warnings(logs, "round_already_handled")
    assert (skipped["round"], skipped["run"], skipped["state_dir"]) == (1, "run-a", str(tmp_path / "ana"))
    participant.ledger.close()


async def test_an_announcement_with_no_run_id_that_looks_handled_is_skipped_with_a_warning(
    tmp_path: Path,
) -> None:
    """A coordinator written before run ids: the participant cannot tell a re-run, but says it skipped."""
    transport = RecordingTransport()
    participant = notebook_participant(tmp_path / "ana", transport)
    await run_rounds(participant, [1, 2], None)
    with capture_logs() as logs:
        await deliver(participant, announcement(1, None))
    assert len(transport.published) == 4
    (skipped,) = warnings(logs, "round_already_handled")
    assert skipped["run"] is None and "fresh state_dir" in skipped["hint"]
    participant.ledger.close()


async def test_a_ledger_from_before_run_ids_carries_on_into_a_later_round_and_restarts_on_a_rerun(
    tmp_path: Path,
) -> None:
    transport = RecordingTransport()
    participant = notebook_participant(tmp_path / "ana", transport)
    await participant._warm_up()
    await run_rounds(participant, [1, 2], None)  # what a participant wrote before run ids existed
    assert participant.ledger.run_id() is None
    with capture_logs() as logs:
        await run_rounds(participant, [3], "run-a")  # the same run, its coordinator upgraded
    assert warnings(logs, "run_changed") == []
    assert participant.ledger.run_id() == "run-a" and participant.ledger.last_applied_round() == 3
    # Round 3 carried on from round 2's model: one more private example on top of it.
    state = tmp_path / "ana"
    assert weights(state / "checkpoints" / "round-3")[:-1] == weights(state / "checkpoints" / "round-2")

    participant.ledger._db.execute("DELETE FROM meta")  # forget the run: a ledger of rounds, no run id ...
    with capture_logs() as logs:
        await run_rounds(participant, [1], "run-b")  # ... meets a re-run: round 1 is known, so a new run
    (changed,) = warnings(logs, "run_changed")
    assert changed["previous_run"] is None and changed["archived_rounds"] == [1, 2, 3]
    assert (state / "runs" / "before-run-b" / "participant.sqlite3").is_file()
    assert transport.published[-2:] == [batch_id("ana", 1, 0), "ana.r1.report"]
    participant.ledger.close()


async def test_a_participant_without_a_warm_up_carries_its_model_into_the_new_run(tmp_path: Path) -> None:
    participant = notebook_participant(tmp_path / "ana", RecordingTransport())
    await run_rounds(participant, [1], "run-a")  # no warm-up: no round-0 checkpoint
    trained = list(participant.learner.trained)  # type: ignore[attr-defined]
    with capture_logs() as logs:
        await deliver(participant, announcement(1, "run-b"))
    (changed,) = warnings(logs, "run_changed")
    assert changed["model"] == "carried over from round 1 (no warm-up checkpoint)"
    # Checkpointed as the new run's round 0, so a restart before round 1 resumes the same model.
    assert weights(tmp_path / "ana" / "checkpoints" / "round-0") == trained
    participant.ledger.close()


# ---- the coordinator: a run id made with its state ----------------------------------------------------


def test_the_run_id_lives_with_the_state_file(tmp_path: Path) -> None:
    first = CoordinatorStore(tmp_path / "a.sqlite3")
    run_id = first.run_id
    first.close()
    again = CoordinatorStore(tmp_path / "a.sqlite3")
    other = CoordinatorStore(tmp_path / "b.sqlite3")
    assert again.run_id == run_id != other.run_id
    assert len(run_id) == 32
    again.close()
    other.close()


def test_an_announcement_with_a_run_id_is_pinned_and_one_without_encodes_as_before() -> None:
    without = announcement(3, None)
    assert b"run_id" not in encode(without)
    with_run = announcement(3, "0123456789abcdef0123456789abcdef")
    body = encode(with_run)
    # The same map with one more entry at the end: 13 entries (0x8d) become 14 (0x8e).
    old = encode(without)
    assert old[0] == 0x8D
    assert body == b"\x8e" + old[1:] + b"\xa6run_id\xd9\x200123456789abcdef0123456789abcdef"
    assert hashlib.sha256(body).hexdigest() == PINNED_WITH_RUN
    assert decode_reply(body) == with_run
    old_reader = decode_reply(encode(without))
    assert isinstance(old_reader, RoundOpened) and old_reader.announced_run() is None


PINNED_WITH_RUN = "5811d1dc2170b393f30968649738c6847e03b488450a6d797c65ed0dc2e38fa4"


# ---- on RabbitMQ: the scenario of the issue -----------------------------------------------------------


@pytest.mark.amqp
async def test_a_rerun_on_a_fresh_coordinator_state_is_answered_within_seconds(
    tmp_path: Path, rabbit_vhost: Callable[..., dict[str, str]]
) -> None:
    urls = rabbit_vhost(participants=("ana",))
    state = tmp_path / "ana"
    # Each config directory holds its own state file: the second run is a fresh coordinator state.
    round_keys: dict[str, Any] = {
        "min_participants": 1,
        "quorum": 1,
        "prompts_per_round": 4,
        "shards": 2,
        "deadline_seconds": 60.0,  # what a stalled round would wait for
        "grace_seconds": 0.0,
    }
    first_config = write_config(tmp_path / "first", federation=FEDERATION, **round_keys, rounds=2)
    second_config = write_config(tmp_path / "second", federation=FEDERATION, **round_keys, rounds=1)

    async def run(config: Path) -> tuple[list[RoundClosed], str, list[MutableMapping[str, Any]]]:
        coordinator = await coordinator_at(urls["coordinator"], config)
        participant = notebook_participant(state, AmqpTransport(urls["ana"]))
        with capture_logs() as logs:
            await coordinator.start()
            serving = asyncio.create_task(participant.run_until())  # until the final RoundClosed
            await asyncio.wait_for(coordinator.drive(), 30)
            await asyncio.wait_for(serving, 30)
            await coordinator.stop_intake()
        await participant.transport.close()
        await coordinator.transport.close()
        return coordinator.closed_rounds, coordinator.store.run_id, logs

    first_rounds, first_run, _ = await run(first_config)
    assert [(r.round_id, r.answered) for r in first_rounds] == [(1, ["ana"]), (2, ["ana"])]
    assert (state / "checkpoints" / "round-2").is_dir()

    second_rounds, second_run, logs = await run(second_config)
    assert second_run != first_run
    (closed,) = second_rounds
    assert (closed.round_id, closed.answered, closed.missing) == (1, ["ana"], [])
    assert all(shard.status == "labelled" for shard in closed.shards)
    assert closed.closed_unix - closed.opened_unix < 10.0  # answered within seconds, not at the deadline
    joined = next(e for e in logs if e["event"] == "participant_joined")
    assert joined["restored_round"] == 2  # it did start from the earlier run's state
    (changed,) = warnings(logs, "run_changed")
    assert (changed["previous_run"], changed["run"], changed["state_dir"]) == (
        first_run,
        second_run,
        str(state),
    )
    assert (state / "runs" / first_run / "checkpoints" / "round-2").is_dir()
