"""The `frozen` kind (`[train] method = "none"`): a local model that only answers, as a black box would."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from participant.data import Example
from participant.learners.local import LocalLearner, load_local_model
from participant.settings import ParticipantSettings, TrainSettings
from participant.training import NO_TRAINING, TrainStats


class FrozenLearner(LocalLearner):
    """A local model that only answers: it takes part as a black box would, and never trains."""

    can_train = False

    def _train(self, examples: Sequence[Example], settings: TrainSettings) -> TrainStats:
        return NO_TRAINING

    def save_checkpoint(self, directory: Path) -> None:
        return None  # nothing changes

    def load_checkpoint(self, directory: Path) -> bool:
        return False


def build(settings: ParticipantSettings) -> FrozenLearner:
    return FrozenLearner(
        load_local_model(settings),
        settings.train,
        batch_size=settings.generation_batch_size,
        progress=settings.progress,
    )
