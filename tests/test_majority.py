"""The "majority of identical answers" strategy: its decisions on hand-made cases, the rules every label
rule keeps (DESIGN.md §4), and one federation run on a real RabbitMQ node."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from support.coordinators import coordinator_at, run_with_participants, write_config
from support.scripted import participant_at

from broker.topology import COORDINATOR_USER
from coordinator.prompts import PublicPrompt
from coordinator.rounds import ShardClosing
from coordinator.settings import CoordinatorSettings
from coordinator.store import CoordinatorStore, NewBatch
from coordinator.strategies import STRATEGIES, StrategyContext
from coordinator.strategies.majority import MajorityStrategy, majority_label, majority_labels, normalize
from schemas.codec import encode
from schemas.messages import Answer, GenerationBatch, Label


def test_case_and_whitespace_do_not_make_answers_differ() -> None:
    assert normalize("  The\tCapital\n of  FRANCE ") == "the capital of france"
    assert normalize(" \n ") == ""


def test_a_strict_majority_of_the_members_labels_with_its_most_written_spelling() -> None:
    given = {"ann": "Paris.", "bob": "Paris.", "cyd": "  paris. ", "dan": "Lyon."}
    label = majority_label("q0", given, members=4)
    assert label == Label(prompt_id="q0", text="Paris.", confidence=0.75, support=3, source="ann")


def test_half_of_the_members_is_no_majority_and_a_tie_abstains() -> None:
    tie = majority_label("q0", {"ann": "A", "bob": "a", "cyd": "B", "dan": "b"}, members=4)
    assert isinstance(tie, str) and "strict majority of the round's 4 members" in tie
    assert isinstance(majority_label("q0", {"ann": "A", "bob": "A"}, members=4), str)


def test_silent_members_count_against_a_label() -> None:
    given = {"ann": "A", "bob": "A", "cyd": "A"}
    assert isinstance(majority_label("q0", given, members=5), Label)  # 3 of 5
    assert isinstance(majority_label("q0", given, members=6), str)  # 3 of 6: half, no majority


def test_blank_answers_never_become_a_label() -> None:
    assert isinstance(majority_label("q0", {"ann": "", "bob": " ", "cyd": "\n"}, members=3), str)


def test_a_tie_between_spellings_goes_to_the_lower_hash_of_the_text_whoever_wrote_it() -> None:
    spellings = ["Paris.", "PARIS."]
    lower = min(spellings, key=lambda t: hashlib.sha256(t.encode()).digest())
    for first, second in [("ann", "zed"), ("zed", "ann")]:  # who writes which does not matter
        given = {first: "Paris.", "bob": "Paris.", second: "PARIS.", "cyd": "PARIS."}
        label = majority_label("q0", given, members=5)
        assert isinstance(label, Label) and label.text == lower and label.support == 4


def test_a_shards_labels_abstentions_and_agreement() -> None:
    answers = {
        "ann": {"q0": "yes", "q1": "red"},
        "bob": {"q0": " Yes", "q1": "blue"},
        "cyd": {"q0": "yes", "q1": "green"},
        "dan": {"q0": "no", "q1": "red"},
    }
    message, agreement = majority_labels("f", 2, 1, answers, ["q0", "q1", "q2"], members=4)
    assert [(label.prompt_id, label.text) for label in message.labels] == [("q0", "yes")]
    assert message.abstained == ["q1", "q2"] and set(message.abstain_reasons or {}) == {"q1", "q2"}
    assert (message.round_id, message.shard_id, message.message_id) == (2, 1, "f.r2.s1.labels")
    assert agreement == {"ann": 1.0, "bob": 1.0, "cyd": 1.0, "dan": 0.0}
    again, _ = majority_labels("f", 2, 1, dict(reversed(answers.items())), ["q0", "q1", "q2"], members=4)
    assert encode(again) == encode(message)  # deterministic: the order answers came in changes nothing


def test_the_strategy_decides_from_the_answers_a_shard_closed_with_and_reads_no_reported_number(
    tmp_path: Path,
) -> None:
    store = CoordinatorStore(tmp_path / "state.sqlite3")
    expected = ["ann", "bob", "cyd", "mal", "zed"]
    store.insert_round(
        round_id=1, opened_unix=0.0, deadline_unix=9.0, quorum=3, expected=expected, announcement=b""
    )
    # mal and zed agree and report the surest log-probability; three honest members agree otherwise,
    # and one of them (cyd) answered late: it does not count.
    texts = {"ann": "honest", "bob": "honest", "cyd": "honest", "mal": "captured", "zed": "captured"}
    batches = [
        NewBatch(
            f"{p}.r1.s0.gen",
            1,
            0,
            p,
            1.0,
            p == "cyd",
            encode(
                GenerationBatch(
                    federation="f",
                    round_id=1,
                    message_id=f"{p}.r1.s0.gen",
                    participant_id=p,
                    shard_id=0,
                    model_id="m",
                    answers=[Answer(prompt_id="q0", text=text, logprob=0.0 if p in {"mal", "zed"} else -9.0)],
                )
            ),
        )
        for p, text in texts.items()
    ]
    store.add_batches(batches)
    settings = CoordinatorSettings(federation="f", prompts_path="p.jsonl", strategy="majority")
    strategy = STRATEGIES["majority"](StrategyContext(settings, store, [PublicPrompt("q0", "Q?")]))
    assert isinstance(strategy, MajorityStrategy) and strategy.announces == "majority"
    closing = ShardClosing(0, "labelled", "all answered", ("ann", "bob", "mal", "zed"))
    (decision,) = strategy.decide(1, [closing, ShardClosing(1, "failed", "below quorum", ())], {0: ["q0"]})
    # Two honest in-time answers of five members: no majority; the two reporters do not get one either.
    assert (decision.shard_id, decision.labelled, decision.abstained) == (0, 0, 1)
    assert decision.reply.kind == "pseudo_labels" and decision.reply.message_id == "f.r1.s0.labels"
    assert strategy.revise(1, {0: decision}) == []  # late answers revise nothing
    store.close()


def answers_by_prompt(participant_id: str, prompt_id: str) -> str:
    """Even prompts: three of four members say the same (cyd in its own case and spacing), so they are
    labelled. Odd prompts: two against two, so they abstain."""
    if int(prompt_id[1:]) % 2 == 0:
        return {"cyd": " paris. ", "dan": "Lyon."}.get(participant_id, "Paris.")
    return "A." if participant_id in ("ann", "bob") else "B."


@pytest.mark.amqp
async def test_a_majority_federation_runs_a_round_on_rabbitmq(
    tmp_path: Path, rabbit_vhost: Callable[..., dict[str, str]]
) -> None:
    names = ["ann", "bob", "cyd", "dan"]
    urls = rabbit_vhost(participants=names)
    config = write_config(
        tmp_path, federation="majority", prompts=6, top={"strategy": "majority"}, min_participants=4, quorum=4
    )  # every round asks all six prompts: three to label, three to abstain on
    coordinator = await coordinator_at(urls[COORDINATOR_USER], config)
    members = [await participant_at(urls[name], name, "majority") for name in names]
    for member in members:
        member.answer = answers_by_prompt
    try:
        await run_with_participants(coordinator, members, timeout=60)
    finally:
        for member in members:
            await member.transport.close()
        await coordinator.transport.close()
    (summary,) = coordinator.closed_rounds
    assert summary.answered == names and [o.status for o in summary.shards] == ["labelled"] * 3
    assert sum(o.labelled for o in summary.shards) == 3 and sum(o.abstained for o in summary.shards) == 3
    for member in members:
        assert [opened.strategy for opened in member.opened] == ["majority"]
        labels = [label for message in member.labels.values() for label in message.labels]
        assert sorted(int(label.prompt_id[1:]) % 2 for label in labels) == [0, 0, 0]
        assert {label.text for label in labels} == {"Paris."} and {label.support for label in labels} == {3}
    coordinator.store.close()
