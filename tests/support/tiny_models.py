"""Real participants on tiny models (tiny-llama, tiny-gpt2), and a coordinator config sized for them.

Shared by tests/test_participant_service.py (in-memory broker) and tests/test_service_faults.py (RabbitMQ).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from broker.transport import Transport
from common.embedding import HashingEmbedder
from participant.data import Example
from participant.learner import Learner, LoraLearner
from participant.models import load_model
from participant.service import Participant
from participant.settings import ParticipantSettings, TrainSettings
from participant.training import TrainStats

PRIVATE = [Example(prompt=f"What is {i} plus one?", response=f"It is {i + 1}.") for i in range(6)]


def coordinator_config(tmp_path: Path, rounds: int) -> Path:
    """Federation "t": `rounds` rounds of 4 prompts in 2 shards, both of 2 participants needed."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt_id": f"q{i}", "prompt": f"Say {i}."}) for i in range(8)))
    config = tmp_path / "coordinator.toml"
    config.write_text(
        'federation = "t"\nprompts_path = "prompts.jsonl"\nstate_path = "c.sqlite3"\n'
        f"[round]\nrounds = {rounds}\nprompts_per_round = 4\nshards = 2\nquorum = 2\nmin_participants = 2\n"
        "deadline_seconds = 60.0\ngrace_seconds = 0.0\n"
        '[generation]\nmax_new_tokens = 6\n[consensus]\nembedder = "hashing"\nmin_confidence = -1.0\n'
    )
    return config


def tiny_participant(
    transport: Transport,
    tmp_path: Path,
    name: str,
    spec: str,
    wrap: Callable[[LoraLearner], Learner] | None = None,
) -> Participant:
    """Participant `name` of federation "t" on model `spec` with LoRA, its state under tmp_path/name;
    `wrap` puts a test's learner around the real one."""
    settings = ParticipantSettings(
        federation="t",
        participant_id=name,
        model=spec,
        state_dir=str(tmp_path / name),
        heartbeat_seconds=0.5,
        progress=False,
        # "confidence": every label is trained on, so tests can count them; the default, "disagreement",
        # skips a label that is the participant's own answer (tests/test_label_weights.py).
        train=TrainSettings(
            batch_size=4, warmup_epochs=1, private_examples_per_round=2, label_weighting="confidence"
        ),
    )
    learner = LoraLearner(load_model(spec), TrainSettings(batch_size=4, max_length=64))
    return Participant(
        settings,
        transport,
        learner if wrap is None else wrap(learner),
        private_train=PRIVATE,
        test=PRIVATE[:2],
        embed=HashingEmbedder().embed,
    )


class CrashOnSecondTrain:
    """Wraps a learner; its second `train` (the first after warm-up) blocks until released, then fails."""

    def __init__(self, inner: LoraLearner) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def train(self, examples: Sequence[Example]) -> TrainStats:
        self.calls += 1
        if self.calls >= 2:
            self.entered.set()
            self.release.wait(30)
            raise RuntimeError("process killed mid-training")
        return self.inner.train(examples)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
