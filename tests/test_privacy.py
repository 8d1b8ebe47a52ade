"""Differential privacy ([train.privacy], participant/privacy.py): private examples get clipped, noised
gradients and labels do not; the budget reported is the accountant's for the steps taken; a spent budget
stops private training with one line; the budget survives checkpoints, and a member reports it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from structlog.testing import capture_logs

from broker.memory import MemoryBroker
from broker.topology import full_topology
from participant.data import Example
from participant.learner import LoraLearner
from participant.models import ModelError, load_model
from participant.service import DP_EPSILON_METRIC, Participant
from participant.settings import ParticipantSettings, PrivacySettings, TrainSettings
from schemas.messages import RoundClosed

PRIVATE = [Example(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(16)]
LABELS = [Example(f"Say {i}.", f"{i}", public=True) for i in range(4)]
TRAIN = TrainSettings(batch_size=4, max_length=64, learning_rate=5e-3)


def private_learner(privacy: PrivacySettings, model: str = "tiny-llama") -> LoraLearner:
    return LoraLearner(load_model(model), msgspec.structs.replace(TRAIN, privacy=privacy))


class Spy:
    """Records what Opacus's DPOptimizer did to the gradients at each step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.clipped: list[float] = []  # norm of the sum of the clipped per-example gradients
        self.examples: list[int] = []  # examples in the step
        self.noise: list[torch.Tensor] = []  # what add_noise added, every trainable parameter flattened
        clip, add_noise = DPOptimizer.clip_and_accumulate, DPOptimizer.add_noise

        def clip_and_accumulate(optimizer: Any) -> None:
            clip(optimizer)
            params = [p for p in optimizer.params if p.summed_grad is not None]
            self.clipped.append(float(torch.sqrt(sum((p.summed_grad**2).sum() for p in params))))
            self.examples.append(int(params[0].grad_sample.shape[0]))

        def noised(optimizer: Any) -> None:
            add_noise(optimizer)
            self.noise.append(torch.cat([(p.grad - p.summed_grad).flatten() for p in optimizer.params]))

        monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", clip_and_accumulate)
        monkeypatch.setattr(DPOptimizer, "add_noise", noised)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_private_examples_are_clipped_and_noised_and_labels_are_not(
    monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    spy = Spy(monkeypatch)
    learner = private_learner(PrivacySettings(epsilon=100.0, max_grad_norm=0.01, noise_multiplier=2.0), model)
    stats = learner.train(PRIVATE + LABELS)
    assert stats.epsilon is not None and stats.epsilon > 0
    assert spy.clipped and len(spy.clipped) == sum(1 for n in spy.examples if n)
    for norm, examples in zip(spy.clipped, spy.examples, strict=True):
        assert norm <= examples * 0.01 * (1 + 1e-4)  # each example's gradient clipped to max_grad_norm
    noise = torch.cat(spy.noise)
    assert float(noise.std()) == pytest.approx(2.0 * 0.01, rel=0.1)  # noise_multiplier x max_grad_norm
    steps = len(spy.clipped)
    learner.train(LABELS)  # pseudo-labels only: public, no DP step
    assert len(spy.clipped) == steps
    LoraLearner(load_model(model), TRAIN).train(PRIVATE)  # no [train.privacy]: no DP either
    assert len(spy.clipped) == steps


def test_epsilon_is_the_accountants_for_the_steps_taken() -> None:
    learner = private_learner(PrivacySettings(epsilon=50.0, delta=1e-5, noise_multiplier=1.0))
    first = learner.train(PRIVATE)  # 16 examples in batches of 4: 4 steps, each at rate 4/16
    second = learner.train(PRIVATE[:8] * 2)  # duplicates count once: 8 examples, rate 4/8, 4 steps
    expected = RDPAccountant()
    expected.history = [(1.0, 0.25, 4)]
    assert first.epsilon == pytest.approx(expected.get_epsilon(1e-5))
    expected.history = [(1.0, 0.25, 4), (1.0, 0.5, 4)]
    assert second.epsilon == pytest.approx(expected.get_epsilon(1e-5))


def test_a_spent_budget_stops_private_training_with_one_line_and_labels_still_train() -> None:
    learner = private_learner(PrivacySettings(epsilon=4.0, noise_multiplier=1.0))
    with capture_logs() as logs:
        first = learner.train(PRIVATE)  # 4 steps at rate 4/16 would spend 4.87: the first 2 fit in 4.0
        second = learner.train(PRIVATE + LABELS)
    two_steps = RDPAccountant()
    two_steps.history = [(1.0, 0.25, 2)]
    assert first.epsilon is not None and first.epsilon <= 4.0
    assert first.epsilon == pytest.approx(two_steps.get_epsilon(1e-5))
    assert second.epsilon == first.epsilon  # no private step after the budget ran out
    assert second.samples == len(LABELS)  # ... while the public labels were still trained on
    spent = [line for line in logs if line["event"] == "privacy_budget_spent"]
    assert len(spent) == 1 and spent[0]["log_level"] == "warning" and spent[0]["budget"] == 4.0


def test_the_budget_survives_a_checkpoint_and_a_checkpoint_without_one_is_refused(tmp_path: Path) -> None:
    privacy = PrivacySettings(epsilon=50.0)
    learner = private_learner(privacy)
    learner.train(PRIVATE)
    learner.save_checkpoint(tmp_path / "dp")
    restored = private_learner(privacy)
    assert restored.load_checkpoint(tmp_path / "dp")
    assert restored.dp is not None and learner.dp is not None
    assert restored.dp.epsilon == pytest.approx(learner.dp.epsilon) and restored.dp.epsilon > 0
    LoraLearner(load_model("tiny-llama"), TRAIN).save_checkpoint(tmp_path / "plain")
    with pytest.raises(ModelError, match=r"without \[train.privacy\]"):
        private_learner(privacy).load_checkpoint(tmp_path / "plain")


def test_privacy_settings_are_for_lora_members() -> None:
    with pytest.raises(msgspec.ValidationError, match="LoRA adapters only"):
        msgspec.convert({"method": "last_layers", "privacy": {"epsilon": 8}}, TrainSettings)
    with pytest.raises(msgspec.ValidationError, match="epsilon"):
        msgspec.convert({"privacy": {"delta": 1e-5}}, TrainSettings)


async def test_a_private_member_reports_its_budget_after_each_round(tmp_path: Path) -> None:
    privacy = PrivacySettings(epsilon=50.0)
    settings = ParticipantSettings(
        federation="t",
        participant_id="alice",
        state_dir=str(tmp_path / "alice"),
        progress=False,
        train=msgspec.structs.replace(TRAIN, private_examples_per_round=8, privacy=privacy),
    )
    broker = MemoryBroker()
    broker.declare(full_topology(["alice"]))
    learner = private_learner(privacy)
    participant = Participant(settings, broker.connect("alice"), learner, private_train=PRIVATE)
    participant.ledger.save_prompts(1, [("q0", "Say 0.")])
    participant.ledger.save_labels(1, [("q0", "zero", 0.9)])
    mix = participant._training_mix(1)
    assert [e.public for e in mix] == [True] + [False] * 8  # the label is public, the private slice not
    closed = RoundClosed(
        federation="t", round_id=1, message_id="t.r1.closed", participant_id="coordinator",
        shards=[], answered=["alice"], opened_unix=0.0, closed_unix=1.0,
    )  # fmt: skip
    await participant._apply_labels(closed)
    assert learner.dp is not None
    reported = participant.reports[-1].metrics[DP_EPSILON_METRIC]
    assert reported > 0 and reported == pytest.approx(learner.dp.epsilon)
