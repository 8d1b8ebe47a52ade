"""The asynchronous mode's ledger (coordinator/prompt_flow.py), on hand-worked event sequences."""

from __future__ import annotations

import math

import msgspec
import pytest

from coordinator.consensus import Candidate
from coordinator.prompt_flow import FlowSettings, PromptFlow, staleness_weight


def flow(prompts: int = 4, members: tuple[str, ...] = ("a", "b", "c"), **settings: object) -> PromptFlow:
    settings.setdefault("min_answers", min(2, int(str(settings.get("answers_per_label", 3)))))
    ledger = PromptFlow(msgspec.convert(settings, FlowSettings))
    ledger.add_prompts(f"q{i}" for i in range(prompts))
    for member in members:
        ledger.join(member)
    return ledger


def test_a_member_is_offered_its_credit_oldest_first_and_more_as_it_answers() -> None:
    ledger = flow(prompts=5, credit=2)
    assert ledger.offer("a", 0.0) == ["q0", "q1"]
    assert ledger.offer("a", 0.0) == []  # its credit is out
    assert ledger.receive("a", "q0", "x", 0, 1.0).counted
    assert ledger.offer("a", 1.0) == ["q2"]  # one answered, one more offered; never q0 again


def test_a_prompt_is_out_with_at_most_k_plus_extra_members() -> None:
    ledger = flow(prompts=2, members=("a", "b", "c", "d"), answers_per_label=2, extra_offers=1, credit=1)
    assert [ledger.offer(m, 0.0) for m in "abcd"] == [["q0"], ["q0"], ["q0"], ["q1"]]


def test_k_distinct_counted_answers_make_a_prompt_ready_and_the_batch_carries_them() -> None:
    ledger = flow(prompts=1, answers_per_label=2, label_batch=1)
    for member in "abc":
        ledger.offer(member, 0.0)
    ledger.receive("a", "q0", "alpha", 0, 1.0)
    assert ledger.take_batch() == []  # one answer of two
    ledger.receive("b", "q0", "beta", 0, 2.0)
    (ready,) = ledger.take_batch()
    assert ready.prompt_id == "q0" and ready.revision == 0
    assert ready.candidates == (Candidate("a", "alpha", 1.0), Candidate("b", "beta", 1.0))
    assert ledger.batches == 1


def test_duplicates_unoffered_prompts_and_versions_from_the_future_are_refused() -> None:
    ledger = flow(prompts=2, credit=1)
    ledger.offer("a", 0.0)
    assert not ledger.receive("a", "q1", "x", 0, 1.0).recorded  # offered q0 only
    assert "version 1 is not in 0..0" in ledger.receive("a", "q0", "x", 1, 1.0).reason
    assert ledger.receive("a", "q0", "x", 0, 1.0).recorded
    assert "duplicate" in ledger.receive("a", "q0", "x", 0, 1.0).reason
    assert not ledger.receive("a", "nope", "x", 0, 1.0).recorded


def test_a_blank_answer_frees_credit_without_counting() -> None:
    ledger = flow(prompts=2, credit=1, answers_per_label=1, label_batch=1)
    ledger.offer("a", 0.0)
    receipt = ledger.receive("a", "q0", "  ", 0, 1.0)
    assert receipt.recorded and not receipt.counted and receipt.reason == "blank"
    assert ledger.state("q0") == "open"
    assert ledger.offer("a", 1.0) == ["q1"]
    assert ledger.offer("b", 1.0) == ["q0"]  # still needs a real answer, from someone else


def test_staleness_weights_on_a_hand_worked_case() -> None:
    # Two batches handed out; answers from models at versions 2, 1 and 0, exponent 0.5, max staleness 1.
    ledger = flow(
        prompts=3, members=("a", "b", "c", "d"), answers_per_label=1, label_batch=1, extra_offers=3,
        max_staleness=1,
    )  # fmt: skip
    ledger.offer("d", 0.0)  # d holds q0, q1, q2
    for i in range(2):
        ledger.receive("d", f"q{i}", "seed", 0, 0.0)
        assert len(ledger.take_batch()) == 1
    ledger.add_prompts(["p"])
    for member in "abc":
        ledger.offer(member, 1.0)
    fresh, behind, stale = (ledger.receive(m, "p", "t", v, 2.0) for m, v in (("a", 2), ("b", 1), ("c", 0)))
    assert fresh.counted and behind.counted and not stale.counted
    assert "staleness 2 > max_staleness 1" in stale.reason
    weights = {a.participant_id: a.weight for a in ledger.answers("p")}
    assert weights["a"] == 1.0
    assert weights["b"] == pytest.approx(1 / math.sqrt(2))
    assert weights["c"] == pytest.approx(1 / math.sqrt(3))  # recorded, not counted
    (ready,) = ledger.take_batch()
    assert [c.participant_id for c in ready.candidates] == ["a", "b"]
    assert ready.candidates[1].weight == pytest.approx(0.70710678)


def test_staleness_weight_is_one_when_fresh_and_falls() -> None:
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 1.0) == 0.25
    assert staleness_weight(5, 0.0) == 1.0


def test_the_deadline_labels_with_min_answers_or_asks_others_then_drops() -> None:
    ledger = flow(
        prompts=1, members=("a", "b", "c"), answers_per_label=3, min_answers=2, extra_offers=0,
        prompt_seconds=10.0, offer_seconds=100.0,
    )  # fmt: skip
    ledger.offer("a", 0.0)
    ledger.offer("b", 0.0)
    ledger.receive("a", "q0", "x", 0, 1.0)
    expiry = ledger.expire(10.0)
    assert expiry.ready == () and ledger.state("q0") == "open"  # 1 < 2: its deadline restarts
    assert ledger.offer("a", 10.0) == []  # never twice to one member
    assert ledger.offer("c", 10.0) == ["q0"]  # asked of a member not asked yet
    ledger.receive("b", "q0", "y", 0, 11.0)
    assert ledger.expire(20.0).ready == ("q0",)  # two counted at the new deadline

    lonely = flow(prompts=1, members=("a",), answers_per_label=2, min_answers=2, prompt_seconds=5.0)
    lonely.offer("a", 0.0)
    lonely.receive("a", "q0", "x", 0, 1.0)
    (dropped,) = lonely.expire(5.0).dropped
    assert dropped[0] == "q0" and "every member was asked" in dropped[1]
    assert lonely.state("q0") == "dropped" and lonely.pending() == []


def test_an_unanswered_offer_is_withdrawn_and_halves_credit_down_to_one() -> None:
    ledger = flow(prompts=20, members=("a",), credit=8, offer_seconds=5.0, prompt_seconds=1000.0)
    assert len(ledger.offer("a", 0.0)) == 8
    assert ledger.next_deadline() == 5.0
    assert len(ledger.expire(5.0).withdrawn) == 8
    assert ledger.credit("a") == 4
    for start in (5.0, 10.0, 15.0):
        ledger.offer("a", start)
        ledger.expire(start + 5.0)
    assert ledger.credit("a") == 1
    (prompt,) = ledger.offer("a", 20.0)
    assert ledger.receive("a", prompt, "x", 0, 21.0).recorded
    assert ledger.credit("a") == 2  # one back per answer
    assert not ledger.receive("a", "q0", "x", 0, 21.0).recorded  # its withdrawn offer is gone


def test_late_answers_revise_a_label_a_bounded_number_of_times() -> None:
    ledger = flow(
        prompts=1, members=("a", "b", "c", "d"), answers_per_label=1, extra_offers=3, label_batch=1,
        max_revisions=1,
    )  # fmt: skip
    for member in "abcd":
        ledger.offer(member, 0.0)
    ledger.receive("a", "q0", "first", 0, 1.0)
    assert [r.revision for r in ledger.take_batch()] == [0]
    assert ledger.receive("b", "q0", "second", 1, 2.0).counted  # revises it
    (revised,) = ledger.take_batch()
    assert revised.revision == 1 and [c.text for c in revised.candidates] == ["first", "second"]
    late = ledger.receive("c", "q0", "third", 2, 3.0)
    assert late.recorded and not late.counted and "revised 1 times" in late.reason
    assert ledger.take_batch(flush=True) == []


def test_a_batch_waits_for_label_batch_prompts_unless_flushed() -> None:
    ledger = flow(prompts=3, answers_per_label=1, label_batch=2, credit=3)
    ledger.offer("a", 0.0)
    ledger.receive("a", "q0", "x", 0, 1.0)
    assert ledger.take_batch() == [] and ledger.ready() == 1
    assert [r.prompt_id for r in ledger.take_batch(flush=True)] == ["q0"]


def test_a_member_that_leaves_frees_its_offers_for_others() -> None:
    ledger = flow(prompts=1, members=("a", "b"), answers_per_label=1, extra_offers=0)
    assert ledger.offer("a", 0.0) == ["q0"]
    assert ledger.offer("b", 0.0) == []
    ledger.leave("a")
    assert ledger.offer("b", 0.0) == ["q0"]
    with pytest.raises(KeyError, match="has not joined"):
        ledger.offer("a", 0.0)


def test_the_same_events_give_the_same_batches() -> None:
    def run() -> list[tuple[str, tuple[Candidate, ...], int]]:
        ledger = flow(prompts=6, answers_per_label=2, label_batch=2, credit=2)
        out = []
        for step in range(6):
            for member in "abc":
                for prompt in ledger.offer(member, float(step)):
                    ledger.receive(member, prompt, f"{member}:{prompt}", ledger.batches, float(step))
            out += [(r.prompt_id, r.candidates, r.revision) for r in ledger.take_batch()]
        return out

    first = run()
    assert first == run() and len(first) == 6


def test_settings_are_checked() -> None:
    with pytest.raises(msgspec.ValidationError, match="min_answers"):
        msgspec.convert({"answers_per_label": 2, "min_answers": 3}, FlowSettings)
    with pytest.raises(ValueError, match="added before or are repeated"):
        flow(prompts=1).add_prompts(["q0"])
