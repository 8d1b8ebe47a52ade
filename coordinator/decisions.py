"""What a round strategy decides, as the service stores it and sends it: plain data, no I/O.

A strategy returns `Decision`s; the service persists them (coordinator.store, table `decisions`) before
it sends their replies, and after a restart re-sends the stored bytes rather than deciding again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

# When a decision is made: as its shard closes, or a round later, revising what late answers changed.
Stage = Literal["decided", "revised"]


@dataclass(frozen=True)
class Outgoing:
    """One reply for every member of a round (labels, an averaged adapter...), encoded once."""

    message_id: str
    body: bytes
    kind: str  # how its publication is recorded, e.g. "pseudo_labels"


@dataclass(frozen=True)
class Decision:
    """A strategy's decision over one shard: the reply every member gets, and what `RoundClosed`
    reports of it (each member's agreement with it, how many prompts got a label or abstained)."""

    shard_id: int
    reply: Outgoing
    agreement: Mapping[str, float] = field(default_factory=dict)
    labelled: int = 0
    abstained: int = 0
