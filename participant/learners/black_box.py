"""What black boxes share: answer one prompt at a time (a few at once, on threads) and evaluate by
answering; and `FunctionLearner`, a black box given as a Python callable. No torch here.

A black box has no `train`, so it is not a `TrainableLearner`; your own model that also learns adds
`train` and the checkpoint methods to a `PerPromptLearner` (examples/custom_learner.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

from participant.data import Example
from participant.learner import MAX_ANSWER_CHARS, GeneratedAnswer, LearnerError, PromptBatch
from schemas.messages import GenerationParams

if TYPE_CHECKING:
    from participant.evaluation import Embedder


class PerPromptLearner:
    """Answers a batch one prompt at a time (`concurrency` at once, on threads) and evaluates by answering:
    subclasses set `model_id` and `concurrency` and give `answer`. It has no `train`: a subclass that
    learns adds `train`, `save_checkpoint` and `load_checkpoint` (participant.learner.TrainableLearner)."""

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

    def evaluate(
        self, test: Sequence[Example], embed: Embedder, params: GenerationParams | None = None
    ) -> dict[str, float]:
        from participant.evaluation import score_answers

        if not test:
            raise LearnerError("evaluate needs at least one test example")
        answers = self.generate(
            [(str(i), e.prompt) for i, e in enumerate(test)], params or GenerationParams()
        )
        return score_answers([a.text for a in answers], [e.response for e in test], embed)


# The older name of a black box's base, from when not training took stub methods.
GenerateOnlyLearner = PerPromptLearner


class FunctionLearner(PerPromptLearner):
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
