"""A third strategy takes one module and one registration line: here a toy one, "shortest answer wins",
defined in this test and registered the way coordinator/strategies/__init__.py registers its own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
from support.scripted import ScriptedParticipant

from broker.memory import MemoryBroker
from broker.topology import COORDINATOR_USER, full_topology
from coordinator import strategies
from coordinator.prompts import split_into_shards
from coordinator.rounds import ShardClosing
from coordinator.service import build_coordinator
from coordinator.settings import SettingsError, load_coordinator_settings
from coordinator.strategies.base import (
    TEXT_ANSWERS,
    AnswerRules,
    Decision,
    Observe,
    Outgoing,
    RoundStrategy,
    StrategyContext,
)
from schemas.codec import decode_generation, encode
from schemas.ids import pseudo_labels_id
from schemas.messages import AdapterUpdate, GenerationBatch, Label, PromptShard, PseudoLabels

ANSWERS = {"alice": "A long answer from alice.", "bob": "Short (bob).", "carol": "A middling one, carol's."}


class ShortestAnswer:
    """The toy strategy: every prompt's label is its shortest answer. It implements the whole
    `RoundStrategy` protocol and announces its own name."""

    announces = "shortest"
    answers: AnswerRules = TEXT_ANSWERS

    def __init__(self, context: StrategyContext) -> None:
        self.context = context

    def shards(self, round_id: int) -> list[PromptShard]:
        rounds = self.context.settings.round
        return split_into_shards(list(self.context.prompts[: rounds.prompts_per_round]), rounds.shards)

    def answer_slots(self, shards: Sequence[PromptShard]) -> dict[int, list[str]]:
        return {s.shard_id: [p.prompt_id for p in s.prompts] for s in shards}

    def answer_problem(self, round_id: int, answer: GenerationBatch | AdapterUpdate) -> str | None:
        return None

    def decide(
        self, round_id: int, closings: Sequence[ShardClosing], slots: Mapping[int, Sequence[str]]
    ) -> list[Decision]:
        store, federation = self.context.store, self.context.settings.federation
        decisions = []
        for closing in closings:
            if closing.status != "labelled":
                continue
            answers: dict[str, list[tuple[str, str]]] = {}
            for row in store.batches(round_id, closing.shard_id):
                batch = decode_generation(row.body)
                for answer in batch.answers:
                    answers.setdefault(answer.prompt_id, []).append((answer.text, batch.participant_id))
            labels = [
                Label(prompt_id=p, text=text, confidence=1.0, support=len(given), source=source)
                for p, given in sorted(answers.items())
                for text, source in [min(given, key=lambda a: len(a[0]))]
            ]
            message = PseudoLabels(
                federation=federation,
                round_id=round_id,
                message_id=pseudo_labels_id(federation, round_id, closing.shard_id),
                participant_id=COORDINATOR_USER,
                shard_id=closing.shard_id,
                labels=labels,
            )
            reply = Outgoing(message.message_id, encode(message), "pseudo_labels")
            decisions.append(Decision(closing.shard_id, reply, labelled=len(labels)))
        return decisions

    def revise(self, round_id: int, decided: Mapping[int, Decision]) -> list[Decision]:
        return []

    def time_parts(self, observe: Observe) -> None:
        return None


async def test_a_toy_third_strategy_runs_a_round_with_one_registration_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build: Callable[[StrategyContext], RoundStrategy] = ShortestAnswer  # the whole protocol, typed
    monkeypatch.setitem(strategies.STRATEGIES, "shortest", build)  # the one registration line
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt_id": f"q{i}", "prompt": f"Q{i}?"}) + "\n" for i in range(4))
    )
    config = tmp_path / "coordinator.toml"
    config.write_text(
        'federation = "toy"\nprompts_path = "prompts.jsonl"\nstate_path = "state.sqlite3"\n'
        'strategy = "shortest"\n[round]\nrounds = 1\nprompts_per_round = 4\nshards = 2\nquorum = 3\n'
        "min_participants = 3\ndeadline_seconds = 5.0\n"
    )
    settings = load_coordinator_settings(config, env={})
    broker = MemoryBroker()
    broker.declare(full_topology(ANSWERS))
    coordinator = build_coordinator(settings, broker.connect(COORDINATOR_USER))
    assert isinstance(coordinator.strategy, ShortestAnswer)
    members = [
        ScriptedParticipant(name, broker.connect(name), lambda pid, _: ANSWERS[pid], federation="toy")
        for name in ANSWERS
    ]
    await coordinator.start()
    for member in members:
        await member.join()
    await asyncio.wait_for(coordinator.drive(), 10)
    await asyncio.sleep(0.05)  # the last replies land
    await coordinator.stop_intake()
    (summary,) = coordinator.closed_rounds
    assert summary.answered == sorted(ANSWERS)
    assert sum(o.labelled for o in summary.shards) == 4
    for member in members:
        assert [opened.strategy for opened in member.opened] == ["shortest"]  # it announces its own name
        labels = [label for message in member.labels.values() for label in message.labels]
        assert len(labels) == 4 and {label.text for label in labels} == {ANSWERS["bob"]}


def test_an_unregistered_strategy_is_refused_where_it_is_built(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt_id": "q0", "prompt": "Q0?"}) + "\n")
    config.write_text('prompts_path = "p.jsonl"\nstrategy = "shortest"\n')
    settings = load_coordinator_settings(config, env={})  # loading imports no strategy to check it
    with pytest.raises(SettingsError, match=r"strategy must be one of \['fedavg', 'majority', 'semantic'\]"):
        build_coordinator(settings, MemoryBroker().connect(COORDINATOR_USER))
