"""Build a participant's learner and data from its settings."""

from __future__ import annotations

from pathlib import Path

import structlog

from participant.data import Example, load_examples, train_test_split
from participant.learner import Learner
from participant.learners import build_learner as build_learner_of_kind
from participant.settings import ParticipantSettings

log = structlog.get_logger(__name__)


def build_learner(settings: ParticipantSettings) -> Learner:
    """The learner of the kind the settings pick (participant/learners: one module per kind)."""
    return build_learner_of_kind(settings)


def load_data(settings: ParticipantSettings) -> tuple[list[Example], list[Example]]:
    """(private training examples, held-out test examples); no test examples means no evaluation."""
    train: list[Example] = []
    test: list[Example] = []
    if settings.private_data:
        train = load_examples(Path(settings.private_data), settings.data_format)
        if not settings.test_data:
            train, test = train_test_split(train, settings.test_fraction, seed=settings.train.seed)
    if settings.test_data:
        test = load_examples(Path(settings.test_data), settings.data_format)
    if settings.evaluate and not test:
        log.info(
            "not_evaluated",
            participant=settings.participant_id,
            reason="no test examples (no test_data, and none held out of private_data)",
        )
    return train, test
