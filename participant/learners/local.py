"""What the local-model kinds (lora, last_layers, frozen) share: generation, evaluation, loading the model
the settings name, and for those that train, a round-seeded `train`. Imports torch (through
participant.models)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import msgspec
import structlog

from participant.data import Example
from participant.evaluation import Embedder, evaluate
from participant.export import write_model_record
from participant.generation import generate_answers
from participant.learner import GeneratedAnswer, PromptBatch
from participant.models import LocalModel, load_model, resolve_device, resolve_dtype
from participant.settings import ParticipantSettings, TrainSettings, checked_train
from participant.training import TrainStats
from schemas.messages import GenerationParams

log = structlog.get_logger()


class LocalLearner:
    """A local causal LM: generation and evaluation shared by the kinds. It does not train; the kinds that
    do are `TrainableLocalLearner`s.

    Not thread-safe: generation and training share the model and seed torch's global RNG, so run one call
    at a time (e.g. on a single worker thread, off the event loop).
    """

    def __init__(
        self, lm: LocalModel, settings: TrainSettings | None, batch_size: int, progress: bool
    ) -> None:
        self.lm = lm
        self.settings = checked_train(settings or TrainSettings())
        self.model_id = lm.model_id
        self.batch_size = batch_size
        self.progress = progress
        self.rounds_trained = 0

    def generate(self, prompts: PromptBatch, params: GenerationParams) -> list[GeneratedAnswer]:
        return generate_answers(self.lm, prompts, params, batch_size=self.batch_size, progress=self.progress)

    def evaluate(
        self, test: Sequence[Example], embed: Embedder, params: GenerationParams | None = None
    ) -> dict[str, float]:
        return evaluate(self.lm, test, params or GenerationParams(), embed, batch_size=self.batch_size)


class TrainableLocalLearner(LocalLearner):
    """A local causal LM that trains some of its weights; the kinds differ in what they train and
    checkpoint."""

    def train(self, examples: Sequence[Example]) -> TrainStats:
        # A fresh seed each round: the same shuffle and dropout every round would correlate the rounds.
        settings = msgspec.structs.replace(self.settings, seed=self.settings.seed + self.rounds_trained)
        stats = self._train(examples, settings)
        self.rounds_trained += 1
        return stats

    def _train(self, examples: Sequence[Example], settings: TrainSettings) -> TrainStats:
        raise NotImplementedError

    def save_checkpoint(self, directory: Path) -> None:
        raise NotImplementedError

    def load_checkpoint(self, directory: Path) -> bool:
        raise NotImplementedError


def load_local_model(settings: ParticipantSettings) -> LocalModel:
    """The model the settings name, on their device; recorded for `chorus-participant export`."""
    cache = Path(settings.cache_dir) if settings.cache_dir else None
    # last_layers trains whole blocks: they stay float32 (a bfloat16 ask is refused with the settings)
    dtype = "float32" if settings.train.method == "last_layers" else settings.dtype
    lm = load_model(
        settings.model,
        cache_dir=cache,
        dtype=resolve_dtype(dtype, resolve_device(settings.device)),
        device=settings.device,
    )
    log.info(
        "model_loaded",
        model=lm.model_id,
        dtype=str(lm.model.dtype).removeprefix("torch."),
        device=str(lm.device),
    )
    write_model_record(settings)  # what its checkpoints are trained from
    return lm
