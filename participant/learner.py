"""The plug-in point for participants: anything that can answer prompts can take part in a federation.

A participant service drives one `Learner` per round: `generate` answers the round's prompts, `train` learns
from the returned pseudo-labels (mixed with private data), `save_checkpoint` keeps the result, `evaluate`
reports quality on held-out examples. This module holds the protocols only and imports no torch, so a
black-box participant never loads it; the kinds that ship are in `participant.learners` (the registry that
settings choose from, one module each):

- `lora` — a local Hugging Face causal LM fine-tuned with LoRA (the default; participant/learners/lora.py).
- `last_layers` — the same, training its last transformer blocks in full (participant/last_layers.py).
- `frozen` — a local model that only answers (`[train] method = "none"`; participant/learners/frozen.py).
- `command` — a black box given as an external program: each prompt on its stdin, its stdout the answer
  (participant/learners/command.py)::

      learner = CommandLearner(["ollama", "run", "llama3"], model_id="llama3", timeout_s=120)

- `http` — a black box behind an OpenAI-compatible `/chat/completions` endpoint (participant/http_learner.py).
- `python` — your own object, named in the settings as `learner = "package.module:factory"` (or
  `"file.py:factory"`); see examples/custom_learner.py. `FunctionLearner` wraps a plain callable::

      learner = FunctionLearner(lambda prompt: my_client.complete(prompt), model_id="my-model")

To plug in anything else, write a class with `model_id` and `generate` (no base class needed: these are
structural protocols) and name its factory in the settings (the `python` kind). What else it can do is
what else it has: `train`, `save_checkpoint` and `load_checkpoint` make it a `TrainableLearner`, trained
each round; `evaluate` an `EvaluatingLearner`, scored; the two methods of `AdapterLearner` let it take
part in FedAvg rounds (`LoraLearner` has them; one without them sends nothing in such rounds).
`PerPromptLearner` answers prompt by prompt given `answer`, and evaluates by answering. A new kind is one
module with a `build(settings)` function plus one line in `participant.learners.KINDS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from participant.data import Example
from schemas.errors import ChorusError
from schemas.messages import MIN_LOGPROB, Answer, GenerationParams

if TYPE_CHECKING:
    import torch

    from participant.evaluation import Embedder
    from participant.learners.black_box import FunctionLearner, GenerateOnlyLearner, PerPromptLearner
    from participant.learners.command import CommandLearner, command_model_id
    from participant.learners.frozen import FrozenLearner
    from participant.learners.local import LocalLearner
    from participant.learners.lora import LoraLearner

__all__ = [
    "MAX_ANSWER_CHARS",
    "NO_TRAINING",
    "AdapterLearner",
    "AdapterState",
    "CommandLearner",
    "EvaluatingLearner",
    "FrozenLearner",
    "FunctionLearner",
    "GenerateOnlyLearner",
    "GeneratedAnswer",
    "Learner",
    "LearnerError",
    "LocalLearner",
    "LoraLearner",
    "PerPromptLearner",
    "PromptBatch",
    "TrainStats",
    "TrainableLearner",
    "command_model_id",
    "trainer",
]

PromptBatch = Sequence[tuple[str, str]]  # (prompt_id, prompt text)
AdapterState = dict[str, "torch.Tensor"]  # a LoRA adapter's weights by name

# The wire's AnswerText limit (schemas.messages); longer answers are clipped rather than rejected.
MAX_ANSWER_CHARS = 8_192


@dataclass(frozen=True)
class GeneratedAnswer:
    prompt_id: str
    text: str
    prompt_tokens: int  # the prompt as the model saw it, chat markup included, padding excluded
    completion_tokens: int  # tokens the model generated, its EOS included, padding after EOS excluded
    # Mean log-probability (nats) of the generated tokens under the model's own distribution, EOS included:
    # how sure the model was of this answer. None when nothing was generated. Not part of equality: the
    # same answer's log-probability differs in its last bits with the batch it was generated in.
    logprob: float | None = field(default=None, compare=False)

    def to_answer(self) -> Answer:
        return Answer(
            prompt_id=self.prompt_id,
            text=self.text,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            logprob=None if self.logprob is None else max(MIN_LOGPROB, min(0.0, self.logprob)),
        )


@dataclass(frozen=True)
class TrainStats:
    samples: int  # examples processed, every epoch counted
    steps: int
    response_tokens: int  # tokens the loss was computed on, every epoch counted
    mean_loss: float  # mean of the per-step weighted losses
    final_loss: float  # the last step's
    seconds: float
    epsilon: float | None = None  # with [train.privacy]: the privacy budget spent so far, this call included

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def then(self, later: TrainStats) -> TrainStats:
        """This call's statistics followed by `later`'s, as one call's."""
        steps = self.steps + later.steps
        return TrainStats(
            samples=self.samples + later.samples,
            steps=steps,
            response_tokens=self.response_tokens + later.response_tokens,
            mean_loss=(self.mean_loss * self.steps + later.mean_loss * later.steps) / steps if steps else 0.0,
            final_loss=later.final_loss if later.steps else self.final_loss,
            seconds=self.seconds + later.seconds,
            epsilon=later.epsilon if later.epsilon is not None else self.epsilon,
        )


NO_TRAINING = TrainStats(samples=0, steps=0, response_tokens=0, mean_loss=0.0, final_loss=0.0, seconds=0.0)


class LearnerError(ChorusError):
    """A learner could not produce an answer; the message names the prompt and what went wrong."""


@runtime_checkable
class Learner(Protocol):
    """What every member needs: a name and answers. Learning and scoring are capabilities a learner adds by
    having their methods (`TrainableLearner`, `EvaluatingLearner`, `AdapterLearner`); the service asks
    `isinstance`, so a black box has none of them to stub. See the module docstring for how to plug one in."""

    model_id: str  # reported to the coordinator, e.g. "smollm2-135m-instruct"

    def generate(self, prompts: PromptBatch, params: GenerationParams) -> list[GeneratedAnswer]:
        """One answer per prompt, in the input order, each carrying its prompt id."""
        ...


@runtime_checkable
class TrainableLearner(Learner, Protocol):
    """A `Learner` that learns from the round's pseudo-labels (mixed with private data) and keeps it."""

    def train(self, examples: Sequence[Example]) -> TrainStats:
        """Learn from examples (pseudo-labels and private data)."""
        ...

    def save_checkpoint(self, directory: Path) -> None:
        """Persist what training changed, so a restarted participant resumes from it."""
        ...

    def load_checkpoint(self, directory: Path) -> bool:
        """Restore a checkpoint written by `save_checkpoint`; False when there is none to restore."""
        ...


@runtime_checkable
class EvaluatingLearner(Learner, Protocol):
    """A `Learner` that scores itself on held-out examples, reported after each round."""

    def evaluate(
        self, test: Sequence[Example], embed: Embedder, params: GenerationParams | None = None
    ) -> dict[str, float]:
        """Answer the test prompts and score them: `rouge_l`, `embedding_similarity`, `n`."""
        ...


@runtime_checkable
class AdapterLearner(TrainableLearner, Protocol):
    """A `TrainableLearner` whose adapter can be read and replaced: what FedAvg rounds need."""

    def adapter_state(self) -> AdapterState:
        """The adapter's weights by name, as detached CPU copies."""
        ...

    def load_adapter_state(self, state: AdapterState) -> None:
        """Overwrite the adapter's weights; names and shapes must match this learner's adapter."""
        ...


def trainer(learner: Learner) -> TrainableLearner | None:
    """`learner` as one that trains, or None. A learner written to the older protocol says it cannot
    with `can_train = False` beside methods that do nothing; it still reads as one that does not train."""
    if isinstance(learner, TrainableLearner) and getattr(learner, "can_train", True) is not False:
        return learner
    return None


# The implementations moved to participant.learners; these names still import from here, each loading
# its module (and torch, for the local ones) only when asked for.
_MOVED = {
    "FunctionLearner": "participant.learners.black_box",
    "GenerateOnlyLearner": "participant.learners.black_box",
    "PerPromptLearner": "participant.learners.black_box",
    "CommandLearner": "participant.learners.command",
    "command_model_id": "participant.learners.command",
    "LocalLearner": "participant.learners.local",
    "FrozenLearner": "participant.learners.frozen",
    "LoraLearner": "participant.learners.lora",
}


def __getattr__(name: str) -> object:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
