"""Participants with real (tiny) models federate with a real coordinator."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import torch
from structlog.testing import capture_logs
from support.coordinators import memory_coordinator
from support.tiny_models import PRIVATE, CrashOnSecondTrain, coordinator_config, tiny_participant

from broker.memory import MemoryBroker
from broker.topology import COORDINATOR_USER, control_key, full_topology, generation_key
from participant.data import Example
from participant.learner import FunctionLearner, LoraLearner
from participant.models import load_model
from participant.service import Participant
from participant.settings import ParticipantSettings, TrainSettings
from schemas.ids import batch_id, label_revision_id, report_id
from schemas.messages import (
    AggregatedAdapter,
    Label,
    Prompt,
    PromptShard,
    PseudoLabels,
    RoundClosed,
    RoundOpened,
)


async def test_two_architectures_complete_rounds_together(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.declare(full_topology(["llama", "gpt2"]))
    coordinator = memory_coordinator(coordinator_config(tmp_path, rounds=2), broker)
    llama = tiny_participant(broker.connect("llama"), tmp_path, "llama", "tiny-llama")
    gpt2 = tiny_participant(broker.connect("gpt2"), tmp_path, "gpt2", "tiny-gpt2")
    assert llama.learner.model_id != gpt2.learner.model_id
    await coordinator.start()
    runs = [asyncio.create_task(p.run_until(rounds=2)) for p in (llama, gpt2)]
    await asyncio.wait_for(coordinator.drive(), 120)
    await asyncio.wait_for(asyncio.gather(*runs), 120)
    await coordinator.stop_intake()
    assert [s.answered for s in coordinator.closed_rounds] == [["gpt2", "llama"], ["gpt2", "llama"]]
    for participant in (llama, gpt2):
        assert participant.rounds_done == [1, 2]
        assert {"rouge_l", "embedding_similarity"} <= participant.reports[-1].metrics.keys()
        assert (tmp_path / participant.pid / "checkpoints" / "round-2").is_dir()
    reports = coordinator.store.reports()
    assert {(r, p) for r, p, _ in reports} == {(1, "gpt2"), (1, "llama"), (2, "gpt2"), (2, "llama")}


async def test_killed_participant_resumes_from_checkpoint_and_applies_missed_labels(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.declare(full_topology(["llama", "gpt2"]))
    coordinator = memory_coordinator(coordinator_config(tmp_path, rounds=2), broker)
    await coordinator.start()
    llama = tiny_participant(broker.connect("llama"), tmp_path, "llama", "tiny-llama")
    doomed = tiny_participant(broker.connect("gpt2"), tmp_path, "gpt2", "tiny-gpt2")
    crashing = CrashOnSecondTrain(doomed.learner)  # type: ignore[arg-type]
    doomed.learner = crashing
    llama_run = asyncio.create_task(llama.run_until(rounds=2))
    doomed_run = asyncio.create_task(doomed.run_until(rounds=2))
    drive = asyncio.create_task(coordinator.drive())
    # gpt2 answered round 1 and is training on its labels when it dies
    assert await asyncio.to_thread(crashing.entered.wait, 60)
    doomed_run.cancel()  # stop intake; the training in flight then dies
    await asyncio.sleep(0.1)
    crashing.release.set()
    with contextlib.suppress(asyncio.CancelledError):
        await doomed_run
    await doomed.transport.close()  # unacked deliveries go back to gpt2's queue
    assert doomed.reports == []

    restarted = tiny_participant(broker.connect("gpt2"), tmp_path, "gpt2", "tiny-gpt2")
    restarted_run = asyncio.create_task(restarted.run_until(rounds=2))
    await asyncio.wait_for(asyncio.gather(drive, llama_run, restarted_run), 120)
    await coordinator.stop_intake()
    assert restarted.rounds_done == [1, 2]  # the missed labels of round 1 applied once, then round 2
    assert [r.round_id for r in restarted.reports] == [1, 2]
    assert [s.answered for s in coordinator.closed_rounds] == [["gpt2", "llama"], ["gpt2", "llama"]]
    assert (tmp_path / "gpt2" / "checkpoints" / "round-0").is_dir()  # the warm-up it resumed from


async def test_fedavg_round_averages_adapters_of_the_same_architecture(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.declare(full_topology(["one", "two"]))
    config = coordinator_config(tmp_path, rounds=1)
    config.write_text(config.read_text().replace('federation = "t"', 'federation = "t"\nstrategy = "fedavg"'))
    coordinator = memory_coordinator(config, broker)
    one = tiny_participant(broker.connect("one"), tmp_path, "one", "tiny-llama")
    two = tiny_participant(broker.connect("two"), tmp_path, "two", "tiny-llama")
    # different local data, so the two adapters differ before averaging
    two.private_train = [Example(prompt=e.prompt, response=e.response.upper()) for e in PRIVATE]
    await coordinator.start()
    runs = [asyncio.create_task(p.run_until(rounds=1)) for p in (one, two)]
    await asyncio.wait_for(coordinator.drive(), 120)
    await asyncio.wait_for(asyncio.gather(*runs), 120)
    await coordinator.stop_intake()
    (summary,) = coordinator.closed_rounds
    assert summary.answered == ["one", "two"]
    assert summary.bytes_received["one"] > 1000  # adapter tensors crossed the wire
    state_one = one.learner.adapter_state()  # type: ignore[attr-defined]
    state_two = two.learner.adapter_state()  # type: ignore[attr-defined]
    assert state_one.keys() == state_two.keys()
    for name in state_one:  # both now hold the same averaged adapter
        assert torch.equal(state_one[name], state_two[name])
    assert [r.round_id for r in one.reports] == [1]


def lone_participant(tmp_path: Path, train: TrainSettings) -> Participant:
    """alice with a tiny model on a broker of her own, for checking what she trains on."""
    settings = ParticipantSettings(
        federation="t",
        participant_id="alice",
        model="tiny-llama",
        state_dir=str(tmp_path / "alice"),
        progress=False,
        train=train,
    )
    learner = LoraLearner(load_model("tiny-llama"), TrainSettings(batch_size=4, max_length=64))
    return Participant(settings, MemoryBroker().connect("alice"), learner, private_train=PRIVATE)


def test_label_weight_scales_pseudo_labels_not_private_examples(tmp_path: Path) -> None:
    participant = lone_participant(tmp_path, TrainSettings(private_examples_per_round=2, label_weight=0.5))
    participant.ledger.save_prompts(1, [("q0", "Say 0."), ("q1", "Say 1.")])
    participant.ledger.save_labels(1, [("q0", "zero", 0.8), ("q1", "one", 1.0)])
    mix = participant._training_mix(1)
    labels = {e.response: e.weight for e in mix if e.prompt.startswith("Say")}
    assert labels == {"zero": 0.5 * 0.8, "one": 0.5}  # label_weight times the confidence
    private = [e for e in mix if not e.prompt.startswith("Say")]
    assert len(private) == 2 and all(e.weight == 1.0 for e in private)


def test_disagreement_weighting_skips_labels_that_are_our_own_answer(tmp_path: Path) -> None:
    train = TrainSettings(private_examples_per_round=0, label_weighting="disagreement")
    participant = lone_participant(tmp_path, train)
    participant.ledger.save_prompts(1, [("q0", "Say 0."), ("q1", "Say 1."), ("q2", "Say 2.")])
    participant.ledger.save_answers(1, [("q0", "zero"), ("q1", "uno")])  # q2: not answered
    participant.ledger.save_labels(1, [("q0", "zero", 0.9), ("q1", "one", 0.8), ("q2", "two", 0.5)])
    mix = participant._training_mix(1)
    # q0's label is what we said: skipped; q1 we got wrong: full confidence; q2: confidence alone.
    assert [(e.response, e.weight) for e in mix] == [("one", 0.8), ("two", 0.5)]


async def test_a_label_revision_is_trained_on_once_with_the_next_rounds_labels(tmp_path: Path) -> None:
    participant = lone_participant(tmp_path, TrainSettings(private_examples_per_round=0))
    participant.ledger.save_prompts(1, [("q0", "Say 0."), ("q1", "Say 1.")])
    participant.ledger.save_prompts(2, [("q2", "Say 2.")])
    participant.ledger.save_labels(1, [("q0", "zero", 1.0)])
    assert [e.response for e in participant._training_mix(1)] == ["zero"]  # round 1's training
    revision = PseudoLabels(
        federation="t",
        round_id=1,
        message_id=label_revision_id("t", 1, 0),
        participant_id=COORDINATOR_USER,
        shard_id=0,
        labels=[Label(prompt_id="q1", text="one", confidence=0.5, support=2, source="bob")],
        revision=1,
    )
    await participant._handle(revision)
    participant.ledger.save_labels(2, [("q2", "two", 1.0)])
    round_two = participant._training_mix(2)
    assert [(e.response, e.weight) for e in round_two] == [("two", 1.0), ("one", 0.5)]
    assert [e.response for e in participant._training_mix(2)] == ["two", "one"]  # a retry takes it again
    assert [e.response for e in participant._training_mix(3)] == []  # and no later round
    participant.ledger.close()


class RecordingTransport:
    """Just enough of a transport for `Participant._handle`: remembers what was published where."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str]] = []

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, *, message_id: str, **_: Any
    ) -> None:
        self.published.append((routing_key, message_id))


async def test_a_fedavg_round_reaching_a_generate_only_learner_sends_nothing(tmp_path: Path) -> None:
    settings = ParticipantSettings(
        federation="t",
        participant_id="box",
        model="tiny-llama",
        state_dir=str(tmp_path / "box"),
        progress=False,
    )
    transport = RecordingTransport()
    learner = FunctionLearner(lambda prompt: "an answer", model_id="box")
    participant = Participant(settings, transport, learner, private_train=PRIVATE)  # type: ignore[arg-type]
    sent: dict[str, Any] = {"federation": "t", "round_id": 1, "participant_id": "coordinator"}
    opened = RoundOpened(
        **sent,
        message_id="t.r1.opened",
        strategy="fedavg",
        shards=[PromptShard(shard_id=0, prompts=[Prompt(prompt_id="q0", text="Say 0.")])],
        expected=["box", "other"],
        quorum=1,
        deadline_unix=60.0,
        opened_unix=0.0,
    )
    average = AggregatedAdapter(**sent, message_id="t.r1.adapter", tensors=[], contributors=["other"])
    with capture_logs() as logs:
        await participant._handle(opened)
        await participant._handle(average)
    assert transport.published == []  # PROTOCOL §7.1 step 9: no AdapterUpdate, no GenerationBatch
    warnings = {entry["event"]: entry["reason"] for entry in logs if entry["log_level"] == "warning"}
    assert "cannot train" in warnings["fedavg_unsupported"]
    assert "FunctionLearner cannot load an adapter" in warnings["fedavg_adapter_ignored"]
    closed = RoundClosed(
        **sent, message_id="t.r1.closed", shards=[], answered=["other"], opened_unix=0.0, closed_unix=1.0
    )
    await participant._handle(closed)
    assert transport.published == [(control_key("box"), report_id("box", 1))]  # the round still reports
    participant.ledger.close()


def generate_only(tmp_path: Path) -> tuple[Participant, RecordingTransport]:
    settings = ParticipantSettings(
        federation="t",
        participant_id="box",
        model="tiny-llama",
        state_dir=str(tmp_path / "box"),
        progress=False,
    )
    transport = RecordingTransport()
    learner = FunctionLearner(lambda prompt: "an answer", model_id="box")
    return Participant(settings, transport, learner, private_train=PRIVATE), transport  # type: ignore[arg-type]


def round_of(strategy: str) -> RoundOpened:
    return RoundOpened(
        federation="t",
        round_id=1,
        participant_id="coordinator",
        message_id="t.r1.opened",
        strategy=strategy,
        shards=[PromptShard(shard_id=0, prompts=[Prompt(prompt_id="q0", text="Say 0.")])],
        expected=["box", "other"],
        quorum=1,
        deadline_unix=60.0,
        opened_unix=0.0,
    )


async def test_a_round_of_an_unknown_strategy_is_sat_out_and_reported(tmp_path: Path) -> None:
    participant, transport = generate_only(tmp_path)
    with capture_logs() as logs:
        await participant._handle(round_of("not_yet_invented"))
    assert transport.published == []  # no answer to a round it does not understand
    (line,) = [entry for entry in logs if entry["event"] == "round_sat_out"]
    assert line["strategy"] == "not_yet_invented" and line["log_level"] == "warning"
    closed = RoundClosed(
        federation="t",
        round_id=1,
        participant_id="coordinator",
        message_id="t.r1.closed",
        shards=[],
        answered=["other"],
        opened_unix=0.0,
        closed_unix=1.0,
    )
    await participant._handle(closed)
    assert transport.published == [(control_key("box"), report_id("box", 1))]
    assert participant.reports[-1].metrics["unknown_strategy"] == 1.0
    participant.ledger.close()


async def test_a_majority_round_is_answered_like_a_semantic_one(tmp_path: Path) -> None:
    participant, transport = generate_only(tmp_path)
    await participant._handle(round_of("majority"))
    assert transport.published == [(generation_key(0, "box"), batch_id("box", 1, 0))]
    participant.ledger.close()
