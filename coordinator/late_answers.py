"""Which batches for the round before the open one may still come in, as late answers (late_policy
"revise"): a straggler's answers revise that round's labels when the next round closes.

A batch qualifies when it answers a shard of the previous round that closed labelled without it,
from a member that round expected, with that shard's prompts only, and that round is not revised
yet. Anything else for a round that is not open is refused as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.transport import Delivery
from coordinator.identity import shard_of_routing_key
from coordinator.store import CoordinatorStore
from schemas.codec import decode_reply
from schemas.messages import GenerationBatch, RoundOpened


@dataclass(frozen=True)
class ClosedRound:
    """What a closed round recorded that decides whether a late batch for it is taken; fixed once
    the round closed, so it is read once, not per batch."""

    round_id: int
    expected: frozenset[str]
    labelled_shards: dict[int, frozenset[str]]  # shard that closed labelled -> the members it closed with
    prompts: dict[int, frozenset[str]]  # shard -> its prompt ids
    late: set[tuple[int, str]]  # (shard, member) with a late batch stored: one each, like any batch


class RevisionWindow:
    """Judges batches for the previous round against what the store recorded of it."""

    def __init__(self, store: CoordinatorStore) -> None:
        self.store = store
        self._closed: ClosedRound | None = None

    def admits(self, delivery: Delivery, batch: GenerationBatch, open_round: int | None) -> bool:
        """Whether `batch` (which identity, ownership and kind checks passed) is a late answer to the
        round before `open_round` (None between rounds: the last closed one) that may revise it."""
        previous = self.store.last_round_id() if open_round is None else open_round - 1
        if batch.round_id != previous or previous < 1:
            return False
        if shard_of_routing_key(delivery.routing_key) != batch.shard_id:
            return False
        if self.store.stage_done(previous, "revised"):
            return False  # revised already: too late even for that
        closed = self._closed_round(previous)
        answered = closed.labelled_shards.get(batch.shard_id)
        if answered is None or batch.participant_id in answered:
            return False  # no labelled shard of that round, or it answered in time
        if batch.participant_id not in closed.expected:
            return False
        if (batch.shard_id, batch.participant_id) in closed.late:
            return False  # one late batch per slot: see `holds`
        given = [a.prompt_id for a in batch.answers]
        asked = closed.prompts.get(batch.shard_id, frozenset())
        return len(set(given)) == len(given) and set(given) <= asked

    def holds(self, batch: GenerationBatch) -> bool:
        """After `admits` said no: whether a late batch for `batch`'s slot (round, shard, member) is
        stored already, so that this one is a duplicate (PROTOCOL §6.5), known without the store."""
        closed = self._closed
        return (
            closed is not None
            and closed.round_id == batch.round_id
            and (batch.shard_id, batch.participant_id) in closed.late
        )

    def taken(self, batch: GenerationBatch) -> None:
        """`batch` is stored late: another one for its slot is refused without touching the store."""
        if self._closed is not None and self._closed.round_id == batch.round_id:
            self._closed.late.add((batch.shard_id, batch.participant_id))

    def _closed_round(self, round_id: int) -> ClosedRound:
        if self._closed is None or self._closed.round_id != round_id:
            body = self.store.announcement(round_id)
            opened = None if body is None else decode_reply(body)
            prompts = (
                {s.shard_id: frozenset(p.prompt_id for p in s.prompts) for s in opened.shards}
                if isinstance(opened, RoundOpened)
                else {}
            )
            self._closed = ClosedRound(
                round_id=round_id,
                expected=frozenset(self.store.expected(round_id)),
                labelled_shards={
                    c.shard_id: frozenset(c.answered)
                    for c in self.store.closings(round_id)
                    if c.status == "labelled"
                },
                prompts=prompts,
                late={(shard, member) for shard, member, _, late in self.store.received(round_id) if late},
            )
        return self._closed
