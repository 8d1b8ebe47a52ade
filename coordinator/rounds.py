"""Round state machine, pure: no I/O, time passed in by the caller.

A round has shards; each shard closes on its own, when
  * every expected participant answered ("all answered"), or every one that is not
    sidelined (a member that left shards unanswered for several rounds is still asked, but not
    waited for), or
  * quorum was reached and the grace period since then has passed, or
  * more than half of the members it waits for answered, and the stragglers had their bound:
    max(grace, straggler_factor x the time that majority took) after it (0: no such bound), or
  * the deadline passed: labelled with what arrived if that is at least quorum (or, with a
    straggler bound, more than half of the members it waits for), failed otherwise.
So no minority of members can hold a shard to its deadline, or fail it, by answering late or
not at all: what they cost is bounded by what the majority took.
Closing happens in two steps: `due()` freezes the set of answers a shard closes
with (so a crash and a re-run produce the same labels), `finish()` records the
outcome after consensus. The round is over when every shard is finished.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

ShardStatus = Literal["open", "closing", "labelled", "failed"]


class Acceptance(Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # this participant already answered this shard
    LATE = "late"  # the shard stopped taking answers
    UNKNOWN_SHARD = "unknown_shard"
    NOT_EXPECTED = "not_expected"  # sender is not on this round's roster


@dataclass(frozen=True)
class ShardClosing:
    """A shard that stopped taking answers; consensus runs over exactly `answered`."""

    shard_id: int
    status: Literal["labelled", "failed"]
    reason: str
    answered: tuple[str, ...]


@dataclass
class ShardState:
    shard_id: int
    prompt_ids: tuple[str, ...]
    answered: dict[str, float] = field(default_factory=dict)  # participant -> arrival time
    status: ShardStatus = "open"
    reason: str = ""
    closed_with: tuple[str, ...] = ()
    quorum_reached_at: float | None = None
    majority_reached_at: float | None = None  # when more than half of the required had answered


def resolve_quorum(quorum: int | float, active_members: int) -> int:
    """An int is a count taken as is; a float in (0, 1] is a fraction of the active members, rounded up."""
    if isinstance(quorum, float):
        if not 0.0 < quorum <= 1.0:
            raise ValueError(f"a quorum fraction must be in (0, 1], got {quorum}")
        return max(1, math.ceil(quorum * active_members - 1e-9))
    if quorum < 1:
        raise ValueError(f"a quorum count must be at least 1, got {quorum}")
    return quorum


class RoundState:
    def __init__(
        self,
        *,
        round_id: int,
        shards: Mapping[int, Iterable[str]],
        expected: Iterable[str],
        quorum: int,
        opened_at: float,
        deadline_at: float,
        grace_seconds: float,
        sidelined: Iterable[str] = (),
        straggler_factor: float = 0.0,
    ) -> None:
        if quorum < 1:
            raise ValueError("quorum must be at least 1")
        if deadline_at <= opened_at:
            raise ValueError("the deadline must be after the opening time")
        if not straggler_factor >= 0.0:
            raise ValueError(f"straggler_factor must be at least 0, got {straggler_factor}")
        self.round_id = round_id
        self.expected = frozenset(expected)
        self.sidelined = frozenset(sidelined) & self.expected
        self.required = self.expected - self.sidelined  # those a shard waits for
        self.majority = len(self.required) // 2 + 1  # more than half of them
        self.quorum = quorum
        self.opened_at = opened_at
        self.deadline_at = deadline_at
        self.grace_seconds = grace_seconds
        self.straggler_factor = straggler_factor
        self.shards = {sid: ShardState(sid, tuple(pids)) for sid, pids in shards.items()}
        self.late: dict[str, set[int]] = {}  # participant -> shards it answered too late
        self._restored: list[ShardClosing] = []  # closings decided before a restart, to finish again

    # -- intake ------------------------------------------------------------

    def classify(self, shard_id: int, participant_id: str) -> Acceptance:
        """What `record` would answer now, without recording anything."""
        shard = self.shards.get(shard_id)
        if shard is None:
            return Acceptance.UNKNOWN_SHARD
        if participant_id not in self.expected:
            return Acceptance.NOT_EXPECTED
        if participant_id in shard.answered:
            return Acceptance.DUPLICATE
        if shard.status != "open":
            if shard_id in self.late.get(participant_id, set()):
                return Acceptance.DUPLICATE
            return Acceptance.LATE
        return Acceptance.ACCEPTED

    def record(self, shard_id: int, participant_id: str, now: float) -> Acceptance:
        acceptance = self.classify(shard_id, participant_id)
        if acceptance is Acceptance.LATE:
            self.late.setdefault(participant_id, set()).add(shard_id)
        if acceptance is not Acceptance.ACCEPTED:
            return acceptance
        shard = self.shards[shard_id]
        shard.answered[participant_id] = now
        if shard.quorum_reached_at is None and len(shard.answered) >= self.quorum:
            shard.quorum_reached_at = now
        if (
            shard.majority_reached_at is None
            and participant_id in self.required
            and len(self.required & shard.answered.keys()) >= self.majority
        ):
            shard.majority_reached_at = now
        return Acceptance.ACCEPTED

    # -- closing -----------------------------------------------------------

    def due(self, now: float) -> list[ShardClosing]:
        """Shards that stop taking answers now, and closings restored after a restart; each returned once."""
        closings, self._restored = self._restored, []
        for shard in self.shards.values():
            if shard.status != "open":
                continue
            verdict = self._verdict(shard, now)
            if verdict is not None:
                status, reason = verdict
                shard.status = "closing"
                shard.reason = reason
                shard.closed_with = tuple(sorted(shard.answered))
                closings.append(ShardClosing(shard.shard_id, status, reason, shard.closed_with))
        return closings

    def _verdict(self, shard: ShardState, now: float) -> tuple[Literal["labelled", "failed"], str] | None:
        answered = len(shard.answered)
        if self.expected <= shard.answered.keys():
            return "labelled", "all answered"
        if self.sidelined and self.required <= shard.answered.keys() and answered >= self.quorum:
            return (
                "labelled",
                f"all answered but sidelined members {sorted(self.sidelined - shard.answered.keys())}",
            )
        if shard.quorum_reached_at is not None and now >= shard.quorum_reached_at + self.grace_seconds:
            return "labelled", f"quorum {self.quorum} reached, grace {self.grace_seconds:g}s passed"
        straggler_bound = self.straggler_bound(shard)
        if straggler_bound is not None and now >= straggler_bound:
            assert shard.majority_reached_at is not None
            took = shard.majority_reached_at - self.opened_at
            return (
                "labelled",
                f"straggler bound: {len(self.required & shard.answered.keys())} of {len(self.required)} "
                f"answered; the rest had {straggler_bound - shard.majority_reached_at:.2f}s after "
                f"the majority's {took:.2f}s",
            )
        if now >= self.deadline_at:
            if answered >= self.quorum:
                return "labelled", f"deadline passed with {answered} of {len(self.expected)} answers"
            if straggler_bound is not None:  # a majority answered, just too late for the bound to pass
                return (
                    "labelled",
                    f"deadline passed with {answered} of {len(self.expected)} answers, more than half "
                    f"of the {len(self.required)} waited for",
                )
            return "failed", f"below quorum: {answered} of {self.quorum} needed answered by the deadline"
        return None

    def straggler_bound(self, shard: ShardState) -> float | None:
        """When `shard` stops waiting for the members that had not answered once more than half of the
        required had: `max(grace_seconds, straggler_factor x the time that majority took)` after the
        majority. None while no majority answered, or with no straggler bound (`straggler_factor` 0)."""
        reached = shard.majority_reached_at
        if reached is None or self.straggler_factor == 0.0:
            return None
        took = max(0.0, reached - self.opened_at)
        return reached + max(self.grace_seconds, self.straggler_factor * took)

    def finish(self, shard_id: int, status: Literal["labelled", "failed"], reason: str | None = None) -> None:
        shard = self.shards[shard_id]
        if shard.status == "open":
            raise ValueError(f"shard {shard_id} of round {self.round_id} is still open; call due() first")
        shard.status = status
        if reason is not None:
            shard.reason = reason

    def restore_closing(
        self, shard_id: int, status: Literal["labelled", "failed"], answered: Iterable[str], reason: str
    ) -> None:
        """Re-enter a persisted closing decision after a restart; the next `due()` returns it to finish."""
        shard = self.shards[shard_id]
        shard.status = "closing"
        shard.reason = reason
        shard.closed_with = tuple(sorted(answered))
        self._restored.append(ShardClosing(shard_id, status, reason, shard.closed_with))

    def next_wakeup(self) -> float | None:
        """The earliest time at which `due()` could return something new, if any shard is open."""
        times = []
        for shard in self.shards.values():
            if shard.status != "open":
                continue
            times.append(self.deadline_at)
            if shard.quorum_reached_at is not None:
                times.append(shard.quorum_reached_at + self.grace_seconds)
            straggler_bound = self.straggler_bound(shard)
            if straggler_bound is not None:
                times.append(straggler_bound)
        return min(times) if times else None

    # -- summary -----------------------------------------------------------

    @property
    def is_finished(self) -> bool:
        return all(s.status in ("labelled", "failed") for s in self.shards.values())

    def answered_all_shards(self) -> set[str]:
        """Participants counted in at least one shard's consensus."""
        return {p for s in self.shards.values() for p in s.closed_with}

    def missing(self) -> set[str]:
        """Expected participants that left at least one shard unanswered, in time and late.

        Per shard, not per round: a member that answers one shard and ignores the others costs the
        others what a silent member does, so it misses the round as a silent member does (sidelining
        counts these rounds)."""
        return {
            p
            for p in self.expected
            for shard in self.shards.values()
            if p not in shard.closed_with and shard.shard_id not in self.late.get(p, set())
        }
