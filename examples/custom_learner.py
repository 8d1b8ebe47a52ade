"""Your own model as a Chorus learner: an object with a `model_id`, `generate` and, to learn, `train`.

Name its factory in a participant's settings file, or in a chorus-run [[participants]] entry:

    learner = "custom_learner.py:make_learner"   # a path against the settings file's folder,
                                                 # or "package.module:make_learner" when installed

This one is a bag of words: it learns which response words come with each prompt word, and answers with
the six words its prompt's words point to most. Put calls into your own model in `answer` and `train`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from participant.data import Example
from participant.learner import NO_TRAINING, TrainStats
from participant.learners.black_box import PerPromptLearner  # batches, clipping, evaluation
from participant.settings import ParticipantSettings
from schemas.messages import GenerationParams


class BagOfWords(PerPromptLearner):
    concurrency = 1  # prompts answered at once, on threads

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.follows: dict[str, Counter[str]] = {}  # prompt word -> response words seen with it

    def answer(self, prompt_id: str, prompt: str, params: GenerationParams) -> str:
        votes = sum((self.follows.get(word, Counter()) for word in prompt.lower().split()), Counter[str]())
        return " ".join(word for word, _ in votes.most_common(6)) or "nothing learned yet"

    def train(self, examples: Sequence[Example]) -> TrainStats:
        for example in examples:
            for word in set(example.prompt.lower().split()):
                self.follows.setdefault(word, Counter()).update(example.response.lower().split())
        return replace(NO_TRAINING, samples=len(examples))

    def save_checkpoint(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "words.json").write_text(json.dumps(self.follows))

    def load_checkpoint(self, directory: Path) -> bool:
        file = directory / "words.json"
        if file.is_file():
            self.follows = {word: Counter(seen) for word, seen in json.loads(file.read_text()).items()}
        return file.is_file()


def make_learner(settings: ParticipantSettings) -> BagOfWords:
    return BagOfWords(settings.model_id or "bag-of-words")
