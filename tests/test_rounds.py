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
    assert state.missing() == {"c", "d", "e"}


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
