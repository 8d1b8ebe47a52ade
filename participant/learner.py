"""The plug-in point for participants: anything that can answer prompts can take part in a federation.

A participant service drives one `Learner` per round: `generate` answers the round's prompts, `train` learns
from the returned pseudo-labels (mixed with private data), `save_checkpoint` keeps the result, `evaluate`
reports quality on held-out examples. Four implementations ship:

- `LoraLearner` — a local Hugging Face causal LM fine-tuned with LoRA (the default).
- `FunctionLearner` — a black box given as a Python callable `prompt -> answer`; it cannot train::

      def my_model(prompt: str) -> str:
          return my_client.complete(prompt)

      learner = FunctionLearner(my_model, model_id="my-model")

- `CommandLearner` — a black box given as an external program: each prompt is written to its stdin and its
  stdout is the answer. The generation parameters and prompt id arrive as environment variables
  (`CHORUS_PROMPT_ID`, `CHORUS_MAX_NEW_TOKENS`, `CHORUS_TEMPERATURE`, `CHORUS_TOP_P`, `CHORUS_SEED`)::

      learner = CommandLearner(["ollama", "run", "llama3"], model_id="llama3", timeout_s=120)

- `HttpChatLearner` (participant/http_learner.py) — a black box behind an OpenAI-compatible
  `/chat/completions` endpoint (llama.cpp's server, vLLM, Ollama, a hosted API); it cannot train.

To plug in anything else, write a class with the attributes and methods of `Learner` (no base class
needed; it is a structural protocol). A generate-only model sets `can_train = False`, returns None from
`train`, and False from `load_checkpoint`. A learner that can also take part in FedAvg rounds adds the
two methods of `AdapterLearner` (`LoraLearner` does); one without them sends nothing in such rounds.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from participant.data import Example
from participant.evaluation import Embedder, evaluate, score_answers
from participant.generation import MAX_ANSWER_CHARS, GeneratedAnswer, generate_answers
from participant.models import LocalModel, load_model
from participant.training import (
    ADAPTER_CONFIG_FILE,
    NO_TRAINING,
    TrainSettings,
    TrainStats,
    adapter_state,
    attach_lora,
    finetune,
    load_adapter,
    load_adapter_state,
    save_adapter,
)
from schemas.errors import ChorusError
from schemas.messages import GenerationParams

PromptBatch = Sequence[tuple[str, str]]  # (prompt_id, prompt text)
AdapterState = dict[str, torch.Tensor]  # a LoRA adapter's weights by name


class LearnerError(ChorusError):
    """A learner could not produce an answer; the message names the prompt and what went wrong."""


class Learner(Protocol):
    """What a participant service needs from a model. See the module docstring for how to plug one in."""

    model_id: str  # reported to the coordinator, e.g. "smollm2-135m-instruct"
    can_train: bool  # False for generate-only black boxes

    def generate(self, prompts: PromptBatch, params: GenerationParams) -> list[GeneratedAnswer]:
        """One answer per prompt, in the input order, each carrying its prompt id."""
        ...

    def train(self, examples: Sequence[Example]) -> TrainStats | None:
        """Learn from examples (pseudo-labels and private data); None when the learner cannot train."""
        ...

    def save_checkpoint(self, directory: Path) -> None:
        """Persist what training changed, so a restarted participant resumes from it."""
        ...

    def load_checkpoint(self, directory: Path) -> bool:
        """Restore a checkpoint written by `save_checkpoint`; False when there is none to restore."""
        ...

    def evaluate(
        self, test: Sequence[Example], embed: Embedder, params: GenerationParams | None = None
    ) -> dict[str, float]:
        """Answer the test prompts and score them: `rouge_l`, `embedding_similarity`, `n`."""
        ...


@runtime_checkable
class AdapterLearner(Learner, Protocol):
    """A `Learner` whose adapter can be read and replaced: what FedAvg rounds need (`isinstance` tells)."""

    def adapter_state(self) -> AdapterState:
        """The adapter's weights by name, as detached CPU copies."""
        ...

    def load_adapter_state(self, state: AdapterState) -> None:
        """Overwrite the adapter's weights; names and shapes must match this learner's adapter."""
        ...


class LocalLearner:
    """A local causal LM that trains some of its weights: generation and evaluation shared by the kinds
    below, which differ in what they train and checkpoint.

    Not thread-safe: generation and training share the model and seed torch's global RNG, so run one call
    at a time (e.g. on a single worker thread, off the event loop).
    """

    can_train = True

    def __init__(
        self, lm: LocalModel, settings: TrainSettings | None, batch_size: int, progress: bool
    ) -> None:
        self.lm = lm
        self.settings = settings or TrainSettings()
        self.model_id = lm.model_id
        self.batch_size = batch_size
        self.progress = progress
        self.rounds_trained = 0

    def generate(self, prompts: PromptBatch, params: GenerationParams) -> list[GeneratedAnswer]:
        return generate_answers(self.lm, prompts, params, batch_size=self.batch_size, progress=self.progress)

    def train(self, examples: Sequence[Example]) -> TrainStats:
        # A fresh seed each round: the same shuffle and dropout every round would correlate the rounds.
        settings = replace(self.settings, seed=self.settings.seed + self.rounds_trained)
        stats = self._train(examples, settings)
        self.rounds_trained += 1
        return stats

    def _train(self, examples: Sequence[Example], settings: TrainSettings) -> TrainStats:
        raise NotImplementedError

    def save_checkpoint(self, directory: Path) -> None:
        raise NotImplementedError

    def load_checkpoint(self, directory: Path) -> bool:
        raise NotImplementedError

    def evaluate(
        self, test: Sequence[Example], embed: Embedder, params: GenerationParams | None = None
    ) -> dict[str, float]:
        return evaluate(self.lm, test, params or GenerationParams(), embed, batch_size=self.batch_size)


class FrozenLearner(LocalLearner):
    """A local model that only answers: it takes part as a black box would, and never trains."""

    can_train = False

    def _train(self, examples: Sequence[Example], settings: TrainSettings) -> TrainStats:
        return NO_TRAINING

    def save_checkpoint(self, directory: Path) -> None:
        return None  # nothing changes

    def load_checkpoint(self, directory: Path) -> bool:
        return False


class LoraLearner(LocalLearner):
    """A local causal LM with LoRA; the adapter is attached at construction, so FedAvg can read it at once."""

    def __init__(
        self,
        lm: LocalModel,
        settings: TrainSettings | None = None,
        batch_size: int = 16,
        progress: bool = False,
    ) -> None:
        super().__init__(lm, settings, batch_size, progress)
        attach_lora(lm, self.settings)

    @classmethod
    def from_spec(
        cls, spec: str, settings: TrainSettings | None = None, *, cache_dir: Path | None = None
    ) -> LoraLearner:
        return cls(load_model(spec, cache_dir=cache_dir), settings)

    def _train(self, examples: Sequence[Example], settings: TrainSettings) -> TrainStats:
        return finetune(self.lm, examples, settings, progress=self.progress)

    def save_checkpoint(self, directory: Path) -> None:
        save_adapter(self.lm, directory)

    def load_checkpoint(self, directory: Path) -> bool:
        if not (Path(directory) / ADAPTER_CONFIG_FILE).is_file():
            return False
        load_adapter(self.lm, directory)
        return True

    def adapter_state(self) -> AdapterState:
        return adapter_state(self.lm)

    def load_adapter_state(self, state: AdapterState) -> None:
        load_adapter_state(self.lm, state)


class GenerateOnlyLearner:
    """Shared behaviour of black boxes: answer one prompt at a time, never train, keep no checkpoint."""

    can_train = False
    model_id: str
    concurrency: int

    def answer(self, prompt_id: str, prompt: str, params: GenerationParams) -> str:
        raise NotImplementedError

    def complete(self, prompt_id: str, prompt: str, params: GenerationParams) -> GeneratedAnswer:
        """One prompt's answer; override it (not `answer`) when the black box reports token counts."""
        # A black box's tokenizer is unknown: 0 tokens means "not counted".
        return GeneratedAnswer(prompt_id, self.answer(prompt_id, prompt, params), 0, 0)

    def generate(self, prompts: PromptBatch, params: GenerationParams) -> list[GeneratedAnswer]:
        def one(item: tuple[str, str]) -> GeneratedAnswer:
            answer = self.complete(item[0], item[1], params)
            return replace(answer, text=answer.text.strip()[:MAX_ANSWER_CHARS])

        if self.concurrency == 1:
            return [one(item) for item in prompts]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, prompts))

    def train(self, examples: Sequence[Example]) -> None:
        return None

    def save_checkpoint(self, directory: Path) -> None:
        return None

    def load_checkpoint(self, directory: Path) -> bool:
        return False

    def evaluate(
        self, test: Sequence[Example], embed: Embedder, params: GenerationParams | None = None
    ) -> dict[str, float]:
        if not test:
            raise LearnerError("evaluate needs at least one test example")
        answers = self.generate(
            [(str(i), e.prompt) for i, e in enumerate(test)], params or GenerationParams()
        )
        return score_answers([a.text for a in answers], [e.response for e in test], embed)


class FunctionLearner(GenerateOnlyLearner):
    """A black box given as a Python callable `prompt -> answer` (generation parameters are not passed)."""

    def __init__(self, answer: Callable[[str], str], model_id: str, concurrency: int = 1) -> None:
        if concurrency < 1:
            raise LearnerError(f"concurrency must be >= 1, got {concurrency}")
        self.function = answer
        self.model_id = model_id
        self.concurrency = concurrency

    def answer(self, prompt_id: str, prompt: str, params: GenerationParams) -> str:
        try:
            text = self.function(prompt)
        except Exception as e:
            raise LearnerError(
                f"{self.model_id} failed on prompt {prompt_id!r}: {type(e).__name__}: {e}"
            ) from e
        if not isinstance(text, str):
            raise LearnerError(
                f"{self.model_id} returned {type(text).__name__} for prompt {prompt_id!r}, not str"
            )
        return text


class CommandLearner(GenerateOnlyLearner):
    """A black box given as an external program: prompt on stdin, answer on stdout, one run per prompt.

    `command` is an argv list, or a string split like a shell would (no shell runs it). A non-zero exit,
    a timeout or a missing program raises `LearnerError` naming the prompt and showing stderr's end.
    """

    def __init__(
        self,
        command: str | Sequence[str],
        model_id: str,
        timeout_s: float = 60.0,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        concurrency: int = 1,
    ) -> None:
        self.argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not self.argv:
            raise LearnerError("CommandLearner needs a command to run")
        if timeout_s <= 0 or concurrency < 1:
            raise LearnerError(f"need timeout_s > 0 and concurrency >= 1, got {timeout_s}, {concurrency}")
        self.model_id = model_id
        self.timeout_s = timeout_s
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.concurrency = concurrency

    def answer(self, prompt_id: str, prompt: str, params: GenerationParams) -> str:
        env = {**(self.env if self.env is not None else os.environ), **_parameter_env(prompt_id, params)}
        try:
            finished = subprocess.run(
                self.argv,
                input=prompt,
                capture_output=True,
                text=True,
                encoding="utf-8",
                errors="replace",
                timeout=self.timeout_s,
                env=env,
                cwd=self.cwd,
                check=False,
            )
        except FileNotFoundError as e:
            raise LearnerError(
                f"{self.model_id}: command not found: {self.argv[0]!r} (is it installed?)"
            ) from e
        except subprocess.TimeoutExpired as e:
            raise LearnerError(
                f"{self.model_id}: {self.argv[0]} timed out after {self.timeout_s:g}s on prompt {prompt_id!r}"
            ) from e
        if finished.returncode != 0:
            raise LearnerError(
                f"{self.model_id}: {self.argv[0]} exited with status {finished.returncode} on prompt "
                f"{prompt_id!r}; stderr: {finished.stderr.strip()[-500:] or '(empty)'}"
            )
        return finished.stdout


# Programs that run a script named by a later argument: the script, not the interpreter, names the model.
INTERPRETER = re.compile(
    r"^(python|pypy|node|deno|bun|ruby|perl|php|bash|sh|zsh|lua|julia|Rscript|java|env)[0-9.]*(\.exe)?$"
)


def command_model_id(argv: Sequence[str]) -> str:
    """A black box's default model id: the program's name, or the script's for an interpreter
    (``["python3", "-u", "answer.py"]`` is "answer.py"; ``["ollama", "run", "llama3"]`` is "ollama")."""
    names = [Path(arg).name for arg in argv]
    if not names:
        return "command"
    if INTERPRETER.match(names[0]):
        for arg, name in zip(argv[1:], names[1:], strict=True):
            if not arg.startswith("-") and "=" not in arg and not INTERPRETER.match(name):
                return name
    return names[0]


def _parameter_env(prompt_id: str, params: GenerationParams) -> dict[str, str]:
    return {
        "CHORUS_PROMPT_ID": prompt_id,
        "CHORUS_MAX_NEW_TOKENS": str(params.max_new_tokens),
        "CHORUS_TEMPERATURE": str(params.temperature),
        "CHORUS_TOP_P": str(params.top_p),
        "CHORUS_SEED": str(params.seed),
    }
