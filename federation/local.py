"""Local-only training: a member's twin that learns from its private data alone, without a federation.

Each round the twin trains on the private slice its federated member mixes into that round (the same
draw), from the same warm-up, so the difference between the two is what the federation's labels or
averages did. `chorus-run --compare local` and the quality benchmark's local-only method both train
this way.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence

from participant.data import Example
from participant.learner import TrainableLearner
from participant.settings import TrainSettings


def private_slice(private: Sequence[Example], train: TrainSettings, round_id: int) -> list[Example]:
    """The private examples a participant mixes into round `round_id` (as the participant service does)."""
    chosen = list(private)
    random.Random(f"{train.seed}:{round_id}").shuffle(chosen)
    return chosen[: train.private_examples_per_round]


def train_local_rounds(
    learner: TrainableLearner,
    private: Sequence[Example],
    train: TrainSettings,
    rounds: Iterable[int],
    after_round: Callable[[int], None] = lambda round_id: None,
) -> None:
    """Train `learner` on each round's private slice, in order; `after_round(round_id)` after each."""
    for round_id in rounds:
        learner.train(private_slice(private, train, round_id))
        after_round(round_id)
