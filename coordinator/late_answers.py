"""Which batches for the round before the open one may still come in, as late answers (late_policy
"revise"): a straggler's answers revise that round's labels when the next round closes.

A batch qualifies when it answers a shard of the previous round that closed labelled without it,
from a member that round expected, with that shard's prompts only, and that round is not revised
yet. Anything else for a round that is not open is refused as before.
"""

from __future__ import annotations

from broker.transport import Delivery
from coordinator.identity import shard_of_routing_key
from coordinator.store import CoordinatorStore
from schemas.codec import decode_reply
from schemas.messages import GenerationBatch, RoundOpened


class RevisionWindow:
    """Judges batches for the previous round against what the store recorded of it."""

    def __init__(self, store: CoordinatorStore) -> None:
        self.store = store
        self._prompts: tuple[int, dict[int, frozenset[str]]] | None = None  # (round, shard -> prompt ids)

    def admits(self, delivery: Delivery, batch: GenerationBatch, open_round: int | None) -> bool:
        """Whether `batch` (which identity, ownership and kind checks passed) is a late answer to the
        round before `open_round` (None between rounds: the last closed one) that may revise it."""
        previous = self.store.last_round_id() if open_round is None else open_round - 1
        if batch.round_id != previous or previous < 1:
            return False
        if shard_of_routing_key(delivery.routing_key) != batch.shard_id:
            return False
        if self.store.revisions(previous) is not None:
            return False  # revised already: too late even for that
        closing = next((c for c in self.store.closings(previous) if c.shard_id == batch.shard_id), None)
        if closing is None or closing.status != "labelled" or batch.participant_id in closing.answered:
            return False
        if batch.participant_id not in self.store.expected(previous):
            return False
        given = [a.prompt_id for a in batch.answers]
        asked = self._shard_prompts(previous).get(batch.shard_id, frozenset())
        return len(set(given)) == len(given) and set(given) <= asked

    def _shard_prompts(self, round_id: int) -> dict[int, frozenset[str]]:
        if self._prompts is None or self._prompts[0] != round_id:
            body = self.store.announcement(round_id)
            opened = None if body is None else decode_reply(body)
            shards = (
                {s.shard_id: frozenset(p.prompt_id for p in s.prompts) for s in opened.shards}
                if isinstance(opened, RoundOpened)
                else {}
            )
            self._prompts = (round_id, shards)
        return self._prompts[1]
