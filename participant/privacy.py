"""Differential privacy for a member's private examples: DP-SGD (Opacus) with Poisson sampling, a
Rényi-DP accountant kept with every checkpoint, and a budget that stops private training once spent.

In each call the private examples given are the dataset (duplicates merged: a record counts once, however
often it is passed). Each of the call's steps takes every example independently with probability
batch_size / examples (the Poisson sampling the accountant assumes), drawn from the operating system's
randomness rather than the training seed, which is no secret; each example's gradient is clipped to
`max_grad_norm` and Gaussian noise of `noise_multiplier` x `max_grad_norm` is added to their sum (Opacus's
DPOptimizer). Every step is accounted at that sampling rate, which bounds the privacy loss of every record,
in the call's examples or not. A step that would take the spent budget past `epsilon` is not taken, and no
later call trains on private examples. The noise comes from a generator seeded by `secrets`, not Opacus's
secure mode (which needs torchcsprng).
"""

from __future__ import annotations

import json
import math
import secrets
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
import torch

from common.progress import progress_bar
from participant.data import Example
from participant.learner import NO_TRAINING, TrainStats
from participant.models import LocalModel, ModelError
from participant.settings import PrivacySettings, TrainSettings
from participant.training import build_batch, encode_example, padding_token_id, stats_of, weighted_loss

log = structlog.get_logger()

ACCOUNTANT_FILE = "privacy.json"  # beside a checkpoint's weights: the budget spent to train them


class DpSgd:
    """One member's DP-SGD: its settings, the accountant of every private step it took, and whether the
    budget is spent. Not thread-safe, like the learner that holds it."""

    def __init__(self, settings: PrivacySettings) -> None:
        from opacus.accountants import RDPAccountant

        self.settings = settings
        self.accountant = RDPAccountant()
        self.spent = False

    @property
    def epsilon(self) -> float:
        """The budget spent so far (at `delta`)."""
        return float(self.accountant.get_epsilon(self.settings.delta)) if self.accountant.history else 0.0

    def train(
        self, lm: LocalModel, examples: Sequence[Example], settings: TrainSettings, progress: bool = False
    ) -> TrainStats:
        """As many DP-SGD steps as plain training would take on `examples`, while the budget lasts."""
        distinct = list(dict.fromkeys(examples))
        if not distinct or self.spent:
            return _no_training(self.epsilon)
        rate = min(1.0, settings.batch_size / len(distinct))
        steps = math.ceil(len(examples) / settings.batch_size) * settings.epochs
        encoded = [encode_example(lm, example, settings.max_length) for example in distinct]
        losses: list[float] = []
        samples = tokens = 0
        started = time.perf_counter()
        model, optimizer = self._attach(lm, settings)
        try:
            with warnings.catch_warnings(), progress_bar(progress, steps, "private fine-tuning") as advance:
                # Opacus's hooks fire on frozen inputs (only the adapter needs gradients): expected here.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                for _ in range(steps):
                    if not self._affordable(rate):
                        self._stop(steps_left=steps - len(losses))
                        break
                    chosen = self._sample(len(encoded), rate)
                    if chosen:  # an empty draw changes nothing and releases nothing; it is still counted
                        batch = build_batch([encoded[i] for i in chosen], padding_token_id(lm)).to(lm.device)
                        loss, counts = weighted_loss(lm, batch)
                        torch.autograd.backward(loss)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        losses.append(loss.item())
                        samples += len(chosen)
                        tokens += int(counts.sum())
                    self.accountant.step(noise_multiplier=self.settings.noise_multiplier, sample_rate=rate)
                    advance(f"ε {self.epsilon:.2f}")
        finally:
            lm.model = model.to_standard_module()  # the hooks off: generation and saving see the plain model
            lm.model.eval()
        log.info(
            "private_training",
            model=lm.model_id,
            samples=samples,
            steps=len(losses),
            epsilon=round(self.epsilon, 4),
            budget=self.settings.epsilon,
            delta=self.settings.delta,
        )
        if not losses:
            return _no_training(self.epsilon)
        return stats_of(losses, samples, tokens, time.perf_counter() - started, self.epsilon)

    def write(self, directory: Path) -> None:
        """Keep the accountant beside the weights it paid for (inside the checkpoint's atomic write)."""
        state = {"history": self.accountant.history, "spent": self.spent, "delta": self.settings.delta}
        (directory / ACCOUNTANT_FILE).write_text(json.dumps(state))

    def read(self, directory: Path) -> None:
        """Restore the budget spent to train the checkpoint in `directory`; a checkpoint trained without
        differential privacy is refused, since no budget could account for it."""
        path = directory / ACCOUNTANT_FILE
        if not path.is_file():
            raise ModelError(
                f"checkpoint {directory} was trained without [train.privacy], so no privacy budget covers "
                "it: start from a fresh state_dir to train with differential privacy"
            )
        state = json.loads(path.read_text())
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        self.spent = bool(state["spent"])

    def _attach(self, lm: LocalModel, settings: TrainSettings) -> tuple[Any, Any]:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        model = GradSampleModule(lm.model)
        lm.model = model
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = DPOptimizer(
            torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0),
            noise_multiplier=self.settings.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            expected_batch_size=settings.batch_size,
            generator=torch.Generator(device=lm.device).manual_seed(secrets.randbits(63)),
        )
        return model, optimizer

    def _affordable(self, rate: float) -> bool:
        from opacus.accountants import RDPAccountant

        trial = RDPAccountant()
        trial.history = list(self.accountant.history)
        trial.step(noise_multiplier=self.settings.noise_multiplier, sample_rate=rate)
        return float(trial.get_epsilon(self.settings.delta)) <= self.settings.epsilon

    def _sample(self, count: int, rate: float) -> list[int]:
        return [i for i in range(count) if secrets.randbelow(1 << 30) < rate * (1 << 30)]

    def _stop(self, steps_left: int) -> None:
        self.spent = True
        log.warning(
            "privacy_budget_spent",
            epsilon=round(self.epsilon, 4),
            budget=self.settings.epsilon,
            steps_not_taken=steps_left,
            then="no more training on private examples; pseudo-labels are still trained on",
        )


def _no_training(epsilon: float) -> TrainStats:
    return replace(NO_TRAINING, epsilon=epsilon)
