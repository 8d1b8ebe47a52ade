"""The `last_layers` kind: fine-tune a model's last transformer blocks in full, with no adapter.

Another way to adapt than LoRA (what a member with memory to spare might do): every weight of the
last `layers` blocks trains, the rest of the model stays frozen. It has no adapter to average, so a
FedAvg federation cannot use it; semantic consensus can, since only text crosses the wire. Its
checkpoint is those blocks' weights, in one safetensors file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.atomic import write_directory_atomically
from participant.data import Example
from participant.learners.local import TrainableLocalLearner, load_local_model
from participant.models import LocalModel, ModelError
from participant.settings import ParticipantSettings, TrainSettings
from participant.training import TrainStats, train_parameters

WEIGHTS_FILE = "last_layers.safetensors"


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks: its longest ModuleList (`model.layers` in Llama,
    `transformer.h` in GPT-2)."""
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not stacks:
        raise ModelError(f"{type(model).__name__} has no stack of transformer blocks to fine-tune")
    return max(stacks, key=len)


class LastLayersLearner(TrainableLocalLearner):
    """Trains every weight of the last `layers` transformer blocks; the rest stays frozen."""

    def __init__(
        self,
        lm: LocalModel,
        layers: int,
        settings: TrainSettings | None = None,
        batch_size: int = 16,
        progress: bool = False,
    ) -> None:
        super().__init__(lm, settings, batch_size, progress)
        blocks = transformer_blocks(lm.model)
        if not 1 <= layers <= len(blocks):
            raise ModelError(
                f"{lm.model_id} has {len(blocks)} transformer blocks; cannot train the last {layers}"
            )
        lm.model.requires_grad_(False)
        for block in list(blocks)[-layers:]:
            block.requires_grad_(True)
        self.trained = {name: p for name, p in lm.model.named_parameters() if p.requires_grad}

    def _train(self, examples: Sequence[Example], settings: TrainSettings) -> TrainStats:
        return train_parameters(self.lm, examples, settings, progress=self.progress)

    def save_checkpoint(self, directory: Path) -> None:
        weights = {name: p.detach().cpu().contiguous() for name, p in self.trained.items()}
        write_directory_atomically(
            Path(directory), lambda staging: save_file(weights, staging / WEIGHTS_FILE)
        )

    def load_checkpoint(self, directory: Path) -> bool:
        path = Path(directory) / WEIGHTS_FILE
        if not path.is_file():
            return False
        saved = load_file(path)
        if saved.keys() != self.trained.keys():
            raise ModelError(
                f"{path} holds weights for other layers than this learner trains "
                f"({len(saved)} tensors, expected {len(self.trained)}): saved with another `last_layers`?"
            )
        with torch.no_grad():
            for name, parameter in self.trained.items():
                parameter.copy_(saved[name])
        return True


def build(settings: ParticipantSettings) -> LastLayersLearner:
    return LastLayersLearner(
        load_local_model(settings),
        settings.train.last_layers,
        settings.train,
        batch_size=settings.generation_batch_size,
        progress=settings.progress,
    )
