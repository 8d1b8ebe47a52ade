"""The `lora` kind (the default): a local causal LM fine-tuned with a LoRA adapter, which FedAvg averages."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from participant.data import Example
from participant.learner import AdapterState
from participant.learners.local import TrainableLocalLearner, load_local_model
from participant.models import LocalModel
from participant.privacy import DpSgd
from participant.settings import ParticipantSettings, TrainSettings
from participant.training import (
    ADAPTER_CONFIG_FILE,
    TrainStats,
    adapter_state,
    attach_lora,
    finetune,
    load_adapter,
    load_adapter_state,
    save_adapter,
)


class LoraLearner(TrainableLocalLearner):
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
        privacy = self.settings.privacy
        self.dp = None if privacy is None else DpSgd(privacy)

    def _train(self, examples: Sequence[Example], settings: TrainSettings) -> TrainStats:
        if self.dp is None:
            return finetune(self.lm, examples, settings, progress=self.progress)
        # Private examples with DP-SGD, while the budget lasts; pseudo-labels (public) without it.
        private = self.dp.train(self.lm, [e for e in examples if not e.public], settings, self.progress)
        public = [e for e in examples if e.public]
        return private.then(finetune(self.lm, public, settings, progress=self.progress))

    def save_checkpoint(self, directory: Path) -> None:
        save_adapter(self.lm, directory, also=None if self.dp is None else self.dp.write)

    def load_checkpoint(self, directory: Path) -> bool:
        if not (Path(directory) / ADAPTER_CONFIG_FILE).is_file():
            return False
        load_adapter(self.lm, directory)
        if self.dp is not None:
            self.dp.read(Path(directory))
        return True

    def adapter_state(self) -> AdapterState:
        return adapter_state(self.lm)

    def load_adapter_state(self, state: AdapterState) -> None:
        load_adapter_state(self.lm, state)


def build(settings: ParticipantSettings) -> LoraLearner:
    return LoraLearner(
        load_local_model(settings),
        settings.train,
        batch_size=settings.generation_batch_size,
        progress=settings.progress,
    )
