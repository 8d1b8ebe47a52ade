"""Who is sidelined in a round: members still asked but no longer waited for, because they left a shard
unanswered (in time and late) in each of the last `rounds` rounds (`RoundClosed.missing`).

One function for every reader (the service opening a round, the strategy revising one), so that the
round that sidelined a member and the revision that ignores its late answers agree on who it was.
"""

from __future__ import annotations

from collections.abc import Iterable

from coordinator.store import CoordinatorStore
from schemas.codec import decode_reply
from schemas.messages import RoundClosed


def sidelined_in(store: CoordinatorStore, round_id: int, members: Iterable[str], rounds: int) -> set[str]:
    """The `members` sidelined in `round_id` under `sideline_after_missed_rounds = rounds`; never all of
    them."""
    everyone = set(members)
    if rounds == 0 or round_id <= rounds:
        return set()
    summaries = store.summaries(round_id - rounds, round_id - 1)
    if len(summaries) < rounds:
        return set()
    missing = [set(_summary(body).missing) for body in summaries]
    sidelined = everyone.intersection(*missing)
    return set() if sidelined >= everyone else sidelined


def _summary(body: bytes) -> RoundClosed:
    message = decode_reply(body)
    if not isinstance(message, RoundClosed):
        raise TypeError(f"a stored round summary decoded as {type(message).__name__}")
    return message
