"""Learners: the LoRA learner end to end, and black boxes given as a Python callable or a command."""

from __future__ import annotations

import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from participant.data import Example
from participant.learner import (
    AdapterLearner,
    CommandLearner,
    FunctionLearner,
    Learner,
    LearnerError,
    LoraLearner,
    trainer,
)
from participant.models import load_model
from participant.settings import TrainSettings
from schemas.messages import GenerationParams

PROMPTS = [("p1", "first prompt"), ("p2", "second"), ("p3", "the third prompt")]
PARAMS = GenerationParams(max_new_tokens=5, seed=3)
EXAMPLES = [Example(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(8)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hashed_embedder(texts: Sequence[str]) -> np.ndarray:
    vectors = np.zeros((len(texts), 32))
    for row, text in enumerate(texts):
        for word in text.lower().split():
            vectors[row, zlib.crc32(word.encode()) % 32] += 1.0
        vectors[row, 31] += 1e-3
    normalised: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return normalised


def python_command(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_lora_learner_generates_trains_and_checkpoints(tmp_path: Path) -> None:
    settings = TrainSettings(rank=4, epochs=1, learning_rate=5e-3, batch_size=4, seed=1)
    learner = LoraLearner(load_model("tiny-gpt2"), settings)
    assert trainer(learner) is learner and learner.model_id == "tiny-gpt2"
    assert not learner.load_checkpoint(tmp_path / "none-yet")
    answers = learner.generate(PROMPTS, PARAMS)
    assert [a.prompt_id for a in answers] == ["p1", "p2", "p3"]
    stats = learner.train(EXAMPLES)
    assert stats is not None and stats.samples == 8
    learner.save_checkpoint(tmp_path / "ckpt")
    after_training = learner.generate(PROMPTS, PARAMS)

    restored = LoraLearner(load_model("tiny-gpt2"), settings)
    assert restored.load_checkpoint(tmp_path / "ckpt")
    assert restored.generate(PROMPTS, PARAMS) == after_training
    scores = restored.evaluate(EXAMPLES[:3], hashed_embedder)
    assert scores["n"] == 3.0 and set(scores) == {"rouge_l", "embedding_similarity", "n"}


def test_lora_learner_ships_adapter_state_for_fedavg() -> None:
    first = LoraLearner(load_model("tiny-llama"), TrainSettings(rank=2, learning_rate=1e-2))
    second = LoraLearner(load_model("tiny-llama"), TrainSettings(rank=2, seed=5))
    assert isinstance(first, AdapterLearner)
    first.train(EXAMPLES)
    state = first.adapter_state()
    assert state and all("lora_" in name for name in state)
    second.load_adapter_state(state)
    assert all(torch.equal(state[k], v) for k, v in second.adapter_state().items())


def test_function_learner_answers_in_order_and_cannot_train(tmp_path: Path) -> None:
    learner: Learner = FunctionLearner(lambda prompt: f"  echo: {prompt}\n", model_id="echo", concurrency=2)
    answers = learner.generate(PROMPTS, PARAMS)
    assert [(a.prompt_id, a.text) for a in answers] == [(pid, f"echo: {text}") for pid, text in PROMPTS]
    assert trainer(learner) is None and not hasattr(learner, "train")  # a capability it lacks, no stub
    assert not isinstance(learner, AdapterLearner)  # so it sends nothing in FedAvg rounds
    perfect = FunctionLearner(lambda prompt: {e.prompt: e.response for e in EXAMPLES}[prompt], "oracle")
    scores = perfect.evaluate(EXAMPLES, hashed_embedder)
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert scores["embedding_similarity"] == pytest.approx(1.0)


def test_function_learner_errors_name_the_prompt() -> None:
    def broken(prompt: str) -> str:
        raise ValueError("backend down")

    with pytest.raises(LearnerError, match=r"'p1'.*ValueError: backend down"):
        FunctionLearner(broken, "broken").generate(PROMPTS, PARAMS)
    with pytest.raises(LearnerError, match="returned int"):
        FunctionLearner(lambda prompt: 42, "wrong-type").generate(PROMPTS, PARAMS)  # type: ignore[arg-type,return-value]


def test_function_learner_clips_answers_to_the_wire_limit() -> None:
    [answer] = FunctionLearner(lambda prompt: "x" * 10_000, "verbose").generate(PROMPTS[:1], PARAMS)
    assert len(answer.text) == 8_192


def test_command_learner_reads_stdin_and_sees_the_parameters() -> None:
    code = (
        "import os, sys; prompt = sys.stdin.read();"
        "print(prompt.upper(), os.environ['CHORUS_PROMPT_ID'], os.environ['CHORUS_MAX_NEW_TOKENS'])"
    )
    learner = CommandLearner(python_command(code), model_id="upper", concurrency=2)
    answers = learner.generate(PROMPTS, PARAMS)
    assert [a.text for a in answers] == ["FIRST PROMPT p1 5", "SECOND p2 5", "THE THIRD PROMPT p3 5"]
    assert trainer(learner) is None


def test_command_learner_accepts_a_command_string() -> None:
    learner = CommandLearner(f"{sys.executable} -c 'import sys; print(len(sys.stdin.read()))'", "counter")
    assert [a.text for a in learner.generate(PROMPTS, PARAMS)] == ["12", "6", "16"]


def test_command_learner_failures_are_clear() -> None:
    failing = CommandLearner(
        python_command("import sys; sys.stderr.write('no GPU found'); sys.exit(3)"), "bad"
    )
    with pytest.raises(LearnerError, match=r"status 3 on prompt 'p1'.*no GPU found"):
        failing.generate(PROMPTS, PARAMS)
    slow = CommandLearner(python_command("import time; time.sleep(5)"), "slow", timeout_s=0.5)
    with pytest.raises(LearnerError, match=r"timed out after 0.5s on prompt 'p1'"):
        slow.generate(PROMPTS[:1], PARAMS)
    with pytest.raises(LearnerError, match="command not found"):
        CommandLearner(["chorus-no-such-program"], "missing").generate(PROMPTS, PARAMS)
    with pytest.raises(LearnerError):
        CommandLearner([], "empty")
