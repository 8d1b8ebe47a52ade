"""Build a participant's learner and data from its settings."""

from __future__ import annotations

from pathlib import Path

import structlog

from participant.data import Example, load_examples, train_test_split
from participant.export import write_model_record
from participant.http_learner import HttpChatLearner
from participant.last_layers import LastLayersLearner
from participant.learner import CommandLearner, FrozenLearner, Learner, LoraLearner, command_model_id
from participant.models import load_model
from participant.settings import ParticipantSettings
from participant.training import TrainSettings

log = structlog.get_logger(__name__)


def train_settings(settings: ParticipantSettings) -> TrainSettings:
    table = settings.train
    targets = table.target_modules
    return TrainSettings(
        rank=table.rank,
        alpha=table.alpha,
        dropout=table.dropout,
        target_modules=tuple(targets) if isinstance(targets, list) else targets,
        epochs=table.epochs,
        learning_rate=table.learning_rate,
        batch_size=table.batch_size,
        max_length=table.max_length,
        seed=table.seed,
    )


def build_learner(settings: ParticipantSettings) -> Learner:
    if settings.http is not None:
        return HttpChatLearner.from_settings(settings.http)
    if settings.command:
        return CommandLearner(
            settings.command,
            model_id=settings.model_id or command_model_id(settings.command),
            timeout_s=settings.command_timeout_seconds,
            cwd=Path(settings.command_dir) if settings.command_dir else None,
        )
    cache = Path(settings.cache_dir) if settings.cache_dir else None
    lm = load_model(settings.model, cache_dir=cache, device=settings.device)
    write_model_record(settings)  # what its checkpoints are trained from, for `chorus-participant export`
    if settings.train.method == "none":
        return FrozenLearner(lm, None, batch_size=settings.generation_batch_size, progress=settings.progress)
    if settings.train.method == "last_layers":
        return LastLayersLearner(
            lm,
            settings.train.last_layers,
            train_settings(settings),
            batch_size=settings.generation_batch_size,
            progress=settings.progress,
        )
    return LoraLearner(
        lm, train_settings(settings), batch_size=settings.generation_batch_size, progress=settings.progress
    )


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
