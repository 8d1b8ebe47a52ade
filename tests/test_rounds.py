"""Round engine with a fake clock: every way a shard can close."""

from __future__ import annotations

import pytest

from coordinator.rounds import Acceptance, RoundState, resolve_quorum


def make_round(expected: tuple[str, ...] = ("a", "b", "c", "d", "e"), quorum: int = 3) -> RoundState:
    return RoundState(
        round_id=1,
        shards={0: ["p0", "p1"], 1: ["p2"]},
        expected=expected,
        quorum=quorum,
        opened_at=100.0,
        deadline_at=160.0,
        grace_seconds=5.0,
    )


def answer_all(state: RoundState, participants: str, shard: int, now: float) -> None:
    for p in participants:
        assert state.record(shard, p, now) is Acceptance.ACCEPTED


def test_shard_closes_at_once_when_everyone_answered() -> None:
    state = make_round()
    answer_all(state, "abcde", 0, 101.0)
    closings = state.due(101.0)
    assert [(c.shard_id, c.status, c.reason) for c in closings] == [(0, "labelled", "all answered")]
    assert closings[0].answered == ("a", "b", "c", "d", "e")
    assert state.due(101.0) == []  # returned once
    state.finish(0, "labelled")
    assert not state.is_finished  # shard 1 still open


def test_quorum_then_grace() -> None:
    state = make_round()
    answer_all(state, "abc", 0, 110.0)
    assert state.due(114.9) == []
    assert state.next_wakeup() == 115.0
    (closing,) = state.due(115.0)
    assert closing.status == "labelled" and "grace" in closing.reason
    assert closing.answered == ("a", "b", "c")


def test_deadline_with_a_straggler_labels_with_what_arrived() -> None:
    state = make_round(quorum=2)
    state.grace_seconds = 1000.0  # grace longer than the deadline
    answer_all(state, "abcd", 1, 120.0)
    assert state.due(159.0) == []
    closings = {c.shard_id: c for c in state.due(160.0)}
    assert closings[1].status == "labelled" and "deadline" in closings[1].reason
    assert closings[1].answered == ("a", "b", "c", "d")
    assert state.record(1, "e", 161.0) is Acceptance.LATE
    assert state.record(1, "e", 162.0) is Acceptance.DUPLICATE
    assert state.late == {"e": {1}}


def test_below_quorum_at_deadline_fails_and_says_so() -> None:
    state = make_round(quorum=3)
    answer_all(state, "ab", 0, 120.0)
    closings = {c.shard_id: c for c in state.due(160.0)}
    assert closings[0].status == "failed"
    assert "below quorum: 2 of 3" in closings[0].reason
    assert closings[1].status == "failed" and "0 of 3" in closings[1].reason
    state.finish(0, "failed")
    state.finish(1, "failed")
    assert state.is_finished
    assert state.missing() == {"a", "b", "c", "d", "e"}  # a and b left shard 1 unanswered


def test_duplicates_unknown_shards_and_strangers() -> None:
    state = make_round()
    assert state.record(0, "a", 101.0) is Acceptance.ACCEPTED
    assert state.record(0, "a", 102.0) is Acceptance.DUPLICATE
    assert state.record(7, "a", 102.0) is Acceptance.UNKNOWN_SHARD
    assert state.record(0, "mallory", 102.0) is Acceptance.NOT_EXPECTED
    assert state.shards[0].answered == {"a": 101.0}  # first arrival time kept


def test_late_answer_is_not_counted_in_consensus() -> None:
    state = make_round(quorum=1)
    state.record(0, "a", 101.0)
    state.due(106.0)
    assert state.record(0, "b", 107.0) is Acceptance.LATE
    assert state.shards[0].closed_with == ("a",)
    assert "b" not in state.answered_all_shards()


def test_finish_before_due_is_refused() -> None:
    state = make_round()
    with pytest.raises(ValueError, match="still open"):
        state.finish(0, "labelled")


def test_restore_closing_freezes_the_answer_set() -> None:
    state = make_round()
    answer_all(state, "abcde", 0, 101.0)
    state.restore_closing(0, "labelled", ["a", "b", "c"], "quorum")
    restored, fresh = state.due(200.0)
    assert (restored.shard_id, restored.status, restored.answered) == (0, "labelled", ("a", "b", "c"))
    assert fresh.shard_id == 1
    assert state.due(200.0) == []  # each returned once
    state.finish(0, "labelled")
    state.finish(1, "failed")
    assert state.is_finished


def test_next_wakeup_is_none_when_nothing_is_open() -> None:
    state = make_round()
    state.due(160.0)
    assert state.next_wakeup() is None


@pytest.mark.parametrize(
    ("quorum", "active", "expected"),
    [(3, 10, 3), (0.5, 5, 3), (0.5, 4, 2), (1.0, 7, 7), (0.01, 3, 1), (0.6, 5, 3)],
)
def test_resolve_quorum(quorum: int | float, active: int, expected: int) -> None:
    assert resolve_quorum(quorum, active) == expected


@pytest.mark.parametrize("bad", [0, -1, 0.0, 1.5])
def test_resolve_quorum_rejects_nonsense(bad: int | float) -> None:
    with pytest.raises(ValueError, match="quorum"):
        resolve_quorum(bad, 5)


def test_round_rejects_deadline_before_opening() -> None:
    with pytest.raises(ValueError, match="deadline"):
        RoundState(
            round_id=1,
            shards={0: ["p"]},
            expected=["a"],
            quorum=1,
            opened_at=5,
            deadline_at=5,
            grace_seconds=0,
        )


# -- the straggler bound (issue 20.4: one member must not set everyone's pace) ------------------------


def bounded_round(
    expected: str = "abcd",
    *,
    quorum: int = 4,
    straggler_factor: float = 1.0,
    grace_seconds: float = 1.0,
    sidelined: str = "",
    shards: int = 1,
) -> RoundState:
    """Opened at 100, deadline at 160, waiting for every member (quorum 4 of 4, like quorum 1.0)."""
    return RoundState(
        round_id=1,
        shards={s: [f"p{s}"] for s in range(shards)},
        expected=expected,
        quorum=quorum,
        opened_at=100.0,
        deadline_at=160.0,
        grace_seconds=grace_seconds,
        sidelined=sidelined,
        straggler_factor=straggler_factor,
    )


def test_a_straggler_gets_as_long_again_as_the_majority_took_then_the_shard_labels() -> None:
    state = bounded_round()
    state.record(0, "a", 102.0)
    state.record(0, "b", 103.0)
    assert state.next_wakeup() == 160.0  # 2 of 4 is no majority: no bound yet
    state.record(0, "c", 104.0)  # 3 of 4 by 4 s after opening: d gets max(1 s, 1.0 x 4 s) more
    assert state.shards[0].majority_reached_at == 104.0
    assert state.next_wakeup() == 108.0
    assert state.due(107.9) == []
    (closing,) = state.due(108.0)
    assert closing.status == "labelled"
    assert closing.reason == "straggler bound: 3 of 4 answered; the rest had 4.00s after the majority's 4.00s"
    assert closing.answered == ("a", "b", "c")
    assert state.record(0, "d", 159.0) is Acceptance.LATE  # its answer is late_policy's, not the shard's
    state.finish(0, "labelled")
    assert state.missing() == set()  # it answered, late: a straggler is bounded, not sidelined


def test_the_straggler_bound_is_at_least_grace_seconds() -> None:
    state = bounded_round(grace_seconds=1.0, straggler_factor=1.0)
    answer_all(state, "abc", 0, 100.5)  # the majority took 0.5 s: the rest get grace (1 s), not 0.5 s
    assert state.due(101.4) == []
    assert state.next_wakeup() == 101.5
    (closing,) = state.due(101.5)
    assert closing.status == "labelled" and closing.answered == ("a", "b", "c")


def test_the_straggler_bound_scales_with_the_factor() -> None:
    state = bounded_round(straggler_factor=2.5, grace_seconds=0.0)
    answer_all(state, "abc", 0, 110.0)  # majority after 10 s: the rest get 25 s
    assert state.next_wakeup() == 135.0
    state.record(0, "d", 134.0)  # in time: everyone answered
    (closing,) = state.due(134.0)
    assert closing.reason == "all answered" and closing.answered == ("a", "b", "c", "d")


def test_without_a_straggler_bound_a_shard_waits_for_everyone_to_the_deadline() -> None:
    state = bounded_round(straggler_factor=0.0)
    answer_all(state, "abc", 0, 101.0)
    assert state.shards[0].majority_reached_at == 101.0
    assert state.next_wakeup() == 160.0
    assert state.due(159.9) == []
    (closing,) = state.due(160.0)
    assert closing.status == "failed"
    assert closing.reason == "below quorum: 3 of 4 needed answered by the deadline"


def test_a_majority_at_the_deadline_labels_though_the_quorum_was_not_reached() -> None:
    state = bounded_round()
    answer_all(state, "abc", 0, 150.0)  # majority after 50 s: its bound (200) is past the deadline
    assert state.next_wakeup() == 160.0
    (closing,) = state.due(160.0)
    assert closing.status == "labelled"
    assert closing.reason == "deadline passed with 3 of 4 answers, more than half of the 4 waited for"


def test_half_is_no_majority_and_fails_below_quorum() -> None:
    state = bounded_round()
    answer_all(state, "ab", 0, 101.0)  # a minority can hold out half: 2 of 4 answered
    assert state.shards[0].majority_reached_at is None
    (closing,) = state.due(160.0)
    assert closing.status == "failed"


def test_three_members_one_straggler() -> None:
    state = bounded_round("abc", quorum=3, grace_seconds=0.0)
    state.record(0, "a", 101.0)
    state.record(0, "b", 102.0)  # 2 of 3 after 2 s: c gets 2 s more
    assert state.next_wakeup() == 104.0
    (closing,) = state.due(104.0)
    assert closing.answered == ("a", "b")


def test_two_members_wait_for_each_other() -> None:
    state = bounded_round("ab", quorum=2)
    state.record(0, "a", 101.0)  # 1 of 2 is no majority: nothing to label without the other anyway
    assert state.next_wakeup() == 160.0


def test_sidelined_members_do_not_make_the_majority() -> None:
    state = bounded_round("abcde", sidelined="e", grace_seconds=0.0)  # waits for a-d: a majority is 3
    state.record(0, "e", 101.0)
    state.record(0, "a", 102.0)
    state.record(0, "b", 103.0)
    assert state.shards[0].majority_reached_at is None  # e answered, but it is not waited for
    state.record(0, "c", 104.0)
    assert state.shards[0].majority_reached_at == 104.0


def test_a_lower_quorum_closes_before_the_straggler_bound() -> None:
    state = bounded_round(quorum=2, grace_seconds=1.0)
    answer_all(state, "ab", 0, 110.0)
    state.record(0, "c", 110.5)
    assert state.next_wakeup() == 111.0  # quorum + grace comes before the bound (121)
    (closing,) = state.due(111.0)
    assert "quorum 2 reached" in closing.reason


def test_a_member_answering_every_round_just_before_the_deadline_costs_the_bound_not_the_deadline() -> None:
    # The attack of issue 20.4: honest members answer in 2 s, the attacker at deadline - 1 s. Each shard
    # closes at 2 s + max(1 s, 1.0 x 2 s) = 4 s after opening, not at 59 s.
    state = bounded_round(shards=3)
    for shard in range(3):
        answer_all(state, "abc", shard, 102.0)
    assert state.next_wakeup() == 104.0
    closings = state.due(104.0)
    assert [c.status for c in closings] == ["labelled"] * 3
    for shard in range(3):
        assert state.record(shard, "d", 159.0) is Acceptance.LATE
        state.finish(shard, "labelled")
    assert state.is_finished and state.missing() == set()


def test_a_member_that_answers_one_shard_misses_the_round_and_fails_none() -> None:
    # The other attack of issue 20.4: one (empty) batch for shard 0, nothing for the others.
    state = bounded_round(shards=3)
    answer_all(state, "abcd", 0, 101.0)
    for shard in (1, 2):
        answer_all(state, "abc", shard, 101.0)
    closings = {c.shard_id: c for c in state.due(102.0)}  # majority after 1 s, then grace (1 s)
    assert closings[0].reason == "all answered"
    assert [closings[s].status for s in (1, 2)] == ["labelled", "labelled"]
    for shard in range(3):
        state.finish(shard, "labelled")
    assert state.answered_all_shards() == {"a", "b", "c", "d"}
    assert state.missing() == {"d"}  # counted as missing (and so sidelined in time), not as answered


def test_missing_is_per_shard_and_late_answers_count() -> None:
    state = bounded_round("abcd", quorum=1, grace_seconds=0.0, shards=2)
    state.record(0, "a", 101.0)
    state.record(0, "b", 101.0)
    state.record(1, "a", 101.0)
    state.record(1, "c", 101.0)
    state.due(101.0)
    assert state.record(1, "b", 102.0) is Acceptance.LATE  # b answered shard 1 late: not missing
    for shard in (0, 1):
        state.finish(shard, "labelled")
    assert state.missing() == {"c", "d"}  # c left shard 0 unanswered, d everything


def test_straggler_factor_cannot_be_negative() -> None:
    with pytest.raises(ValueError, match="straggler_factor"):
        bounded_round(straggler_factor=-1.0)


def test_round_settings_bound_stragglers_by_default() -> None:
    from coordinator.settings import RoundSettings

    assert RoundSettings().straggler_factor == 1.0
    assert RoundSettings(straggler_factor=0.0).straggler_factor == 0.0
