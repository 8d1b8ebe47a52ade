"""The `frozen` kind (`[train] method = "none"`): a local model that only answers, as a black box would."""

from __future__ import annotations

from participant.learners.local import LocalLearner, load_local_model
from participant.settings import ParticipantSettings


class FrozenLearner(LocalLearner):
    """A local model that only answers: it takes part as a black box would, with nothing to train or keep."""


def build(settings: ParticipantSettings) -> FrozenLearner:
    return FrozenLearner(
        load_local_model(settings),
        settings.train,
        batch_size=settings.generation_batch_size,
        progress=settings.progress,
    )
