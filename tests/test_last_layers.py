"""A learner that fine-tunes its last transformer blocks in full (what trains, what is saved), and
how settings choose it or a local model that only answers."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import torch
from support.tiny_models import PRIVATE

from participant.last_layers import LastLayersLearner, transformer_blocks
from participant.learner import AdapterLearner, FrozenLearner, trainer
from participant.models import ModelError, load_model
from participant.settings import ParticipantSettings, TrainSettings
from participant.wiring import build_learner

SETTINGS = TrainSettings(batch_size=4, max_length=64, learning_rate=1e-2)


def snapshot(learner: LastLayersLearner) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in learner.lm.model.named_parameters()}


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_only_the_last_blocks_train(spec: str) -> None:
    learner = LastLayersLearner(load_model(spec), layers=1, settings=SETTINGS)
    blocks = transformer_blocks(learner.lm.model)
    last = {f"{name}" for name, _ in blocks[-1].named_parameters()}
    assert learner.trained and all(any(name.endswith(p) for p in last) for name in learner.trained)
    before = snapshot(learner)
    stats = learner.train(PRIVATE[:4])
    assert stats.samples == 4
    after = snapshot(learner)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and changed <= set(learner.trained)  # nothing outside the last block moved
    assert not isinstance(learner, AdapterLearner)  # nothing for FedAvg to average


def test_a_checkpoint_restores_the_trained_blocks_into_a_fresh_learner(tmp_path: Path) -> None:
    trained = LastLayersLearner(load_model("tiny-llama"), layers=2, settings=SETTINGS)
    trained.train(PRIVATE[:4])
    trained.save_checkpoint(tmp_path / "ckpt")
    fresh = LastLayersLearner(load_model("tiny-llama"), layers=2, settings=SETTINGS)
    assert fresh.load_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(fresh.trained[n], trained.trained[n]) for n in trained.trained)
    assert not fresh.load_checkpoint(tmp_path / "nothing-here")
    other = LastLayersLearner(load_model("tiny-llama"), layers=1, settings=SETTINGS)
    with pytest.raises(ModelError, match="saved with another `last_layers`"):
        other.load_checkpoint(tmp_path / "ckpt")


def test_more_layers_than_the_model_has_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match=r"has \d+ transformer blocks; cannot train the last 99"):
        LastLayersLearner(load_model("tiny-llama"), layers=99)


def test_settings_choose_the_learner(tmp_path: Path) -> None:
    settings = ParticipantSettings(
        participant_id="alice",
        model="tiny-llama",
        state_dir=str(tmp_path),
        train=TrainSettings(method="last_layers", last_layers=1),
    )
    learner = build_learner(settings)
    assert isinstance(learner, LastLayersLearner) and len(learner.trained) > 0
    frozen = build_learner(msgspec.structs.replace(settings, train=TrainSettings(method="none")))
    assert isinstance(frozen, FrozenLearner) and trainer(frozen) is None
    assert not isinstance(frozen, AdapterLearner)
