"""LoRA fine-tuning as a plain loop: encode, batch, forward, masked weighted loss, step.

The loss covers response tokens only: prompt and padding positions carry the label -100. Each example's
mean token loss is scaled by its `weight`, so a pseudo-label can count in proportion to its confidence.
Runs are seeded: the same model, data and settings give the same adapter.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from common.atomic import write_directory_atomically
from common.progress import progress_bar
from participant.data import Example
from participant.learner import NO_TRAINING as NO_TRAINING
from participant.learner import TrainStats as TrainStats
from participant.models import LocalModel, ModelError, prompt_token_ids, render_response
from participant.settings import TrainSettings, checked_train

log = structlog.get_logger()

IGNORE_INDEX = -100  # the label torch's cross-entropy skips
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"

# Attention projections to adapt when the settings name none; other architectures get "all-linear".
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
}


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    prompt_length: int  # the first `prompt_length` ids are context, not trained on
    weight: float


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [batch, time], right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor  # input ids, with IGNORE_INDEX over prompt and padding
    weights: torch.Tensor  # [batch]

    def to(self, device: torch.device) -> Batch:
        """The same batch on `device` (the model's), where the forward pass needs it."""
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.weights.to(device),
        )


# ---- LoRA ----------------------------------------------------------------------------------------


def has_lora(lm: LocalModel) -> bool:
    return isinstance(lm.model, PeftModel)


def attach_lora(lm: LocalModel, settings: TrainSettings) -> None:
    """Wrap `lm.model` with a fresh LoRA adapter, in place; only the adapter's weights stay trainable."""
    if has_lora(lm):
        raise ModelError(f"{lm.model_id} already has a LoRA adapter")
    settings = checked_train(settings)
    model_type = str(getattr(lm.model.config, "model_type", ""))
    targets = settings.target_modules or DEFAULT_TARGET_MODULES.get(model_type, "all-linear")
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets) if isinstance(targets, tuple) else targets,
        fan_in_fan_out=model_type == "gpt2",  # GPT-2 stores its projections transposed (Conv1D)
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), _quiet_peft_deprecation():
        torch.manual_seed(settings.seed)  # the adapter's initial weights are part of a repeatable run
        lm.model = get_peft_model(lm.model, config)
    lm.model.eval()


def adapter_state(lm: LocalModel) -> dict[str, torch.Tensor]:
    """The adapter's weights by name, detached CPU copies (what the FedAvg baseline ships)."""
    _require_lora(lm)
    return {
        name: tensor.detach().cpu().clone() for name, tensor in get_peft_model_state_dict(lm.model).items()
    }


def load_adapter_state(lm: LocalModel, state: dict[str, torch.Tensor]) -> None:
    """Overwrite the adapter's weights; names and shapes must match this model's adapter exactly."""
    _require_lora(lm)
    expected = get_peft_model_state_dict(lm.model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"adapter state does not fit {lm.model_id}: missing {missing[:3]}, unexpected {unexpected[:3]} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ModelError(
                f"adapter tensor {name} has shape {tuple(tensor.shape)}, {lm.model_id} needs "
                f"{tuple(expected[name].shape)}"
            )
    set_peft_model_state_dict(lm.model, state)


def save_adapter(lm: LocalModel, path: Path, also: Callable[[Path], object] | None = None) -> None:
    """Write the adapter (config + safetensors) to `path`, replacing it atomically; `also(staging)` writes
    what belongs with it into the same atomic write."""
    _require_lora(lm)

    def write(staging: Path) -> None:
        lm.model.save_pretrained(staging)
        if also is not None:
            also(staging)

    write_directory_atomically(Path(path), write)


def load_adapter(lm: LocalModel, path: Path) -> None:
    """Load an adapter saved by `save_adapter`: into the attached adapter, or attach it if there is none."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG_FILE).is_file() or not (path / ADAPTER_WEIGHTS_FILE).is_file():
        raise ModelError(f"{path} holds no saved adapter ({ADAPTER_CONFIG_FILE} + {ADAPTER_WEIGHTS_FILE})")
    if has_lora(lm):
        load_adapter_state(lm, load_file(path / ADAPTER_WEIGHTS_FILE))
    else:
        with _quiet_peft_deprecation():
            lm.model = PeftModel.from_pretrained(lm.model, path, is_trainable=True)
        lm.model.eval()


@contextmanager
def _quiet_peft_deprecation() -> Iterator[None]:
    # peft calls a transformers method that transformers has deprecated; nothing for us to change.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _require_lora(lm: LocalModel) -> None:
    if not has_lora(lm):
        raise ModelError(f"{lm.model_id} has no LoRA adapter: call attach_lora first")


# ---- encoding and batching -----------------------------------------------------------------------


def encode_example(lm: LocalModel, example: Example, max_length: int) -> EncodedExample:
    """Prompt ids (formatted exactly as for generation) followed by response ids ending the turn."""
    prompt_ids = prompt_token_ids(lm, example.prompt)
    response_text = render_response(lm, example.prompt, example.response)
    response_ids = list(lm.tokenizer(response_text, add_special_tokens=False)["input_ids"])
    if not lm.has_chat_template and lm.tokenizer.eos_token_id is not None:
        response_ids.append(int(lm.tokenizer.eos_token_id))
    prompt_ids, response_ids = _fit_to_length(prompt_ids, response_ids, max_length)
    return EncodedExample(prompt_ids + response_ids, len(prompt_ids), example.weight)


def _fit_to_length(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut to `max_length`: the response keeps at least half the room, the prompt keeps its end."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    response = response[: max(max_length - len(prompt), max_length // 2)]
    keep = max_length - len(response)
    return prompt[len(prompt) - keep :], response


def build_batch(examples: Sequence[EncodedExample], pad_token_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, example.prompt_length : len(ids)] = ids[example.prompt_length :]
    weights = torch.tensor([e.weight for e in examples], dtype=torch.float32)
    return Batch(input_ids, attention_mask, labels, weights)


def per_example_loss(lm: LocalModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token loss over each example's response tokens, and how many tokens each had.

    `batch` must be on the model's device (`Batch.to`)."""
    logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    # Position t predicts token t + 1. Shifting the labels (the last position gets none) rather than the
    # logits keeps the [batch, time, vocab] logits uncopied with the vocabulary last, where cross_entropy
    # is fast: a transposed [batch, vocab, time] view made training ~10% slower than transformers' own loss
    # (`python -m bench.bench_participant`: training against a plain loop with transformers' loss).
    targets = F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    token_loss = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1), counts


def weighted_loss(lm: LocalModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's loss to step on, and each example's response token count."""
    example_losses, counts = per_example_loss(lm, batch)
    # Divide by the batch size, not the weight sum: a low-confidence batch should move less.
    return (example_losses * batch.weights).sum() / len(example_losses), counts


def stats_of(
    losses: Sequence[float], samples: int, tokens: int, seconds: float, epsilon: float | None = None
) -> TrainStats:
    """A training call's statistics from its per-step losses (at least one)."""
    return TrainStats(
        samples=samples,
        steps=len(losses),
        response_tokens=tokens,
        mean_loss=sum(losses) / len(losses),
        final_loss=losses[-1],
        seconds=seconds,
        epsilon=epsilon,
    )


# ---- the loop ------------------------------------------------------------------------------------


def finetune(
    lm: LocalModel, examples: Sequence[Example], settings: TrainSettings, progress: bool = False
) -> TrainStats:
    """Train the LoRA adapter (attached first if missing) on `examples`; the base weights stay frozen."""
    if not has_lora(lm):
        attach_lora(lm, settings)
    return train_parameters(lm, examples, settings, progress)


def train_parameters(
    lm: LocalModel, examples: Sequence[Example], settings: TrainSettings, progress: bool = False
) -> TrainStats:
    """The training loop, over whichever parameters of `lm.model` require gradients."""
    settings = checked_train(settings)
    if not examples:
        return NO_TRAINING
    encoded = [encode_example(lm, example, settings.max_length) for example in examples]
    pad_token_id = padding_token_id(lm)
    trainable = [p for p in lm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    shuffler = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = math.ceil(len(encoded) / settings.batch_size)
    losses: list[float] = []
    tokens = 0
    started = time.perf_counter()
    with (
        torch.random.fork_rng(devices=[]),
        progress_bar(progress, settings.epochs * steps_per_epoch, "fine-tuning") as advance,
    ):
        torch.manual_seed(settings.seed)  # dropout masks repeat run to run
        lm.model.train()
        for _epoch in range(settings.epochs):
            order = torch.randperm(len(encoded), generator=shuffler).tolist()
            for start in range(0, len(order), settings.batch_size):
                batch = build_batch(
                    [encoded[i] for i in order[start : start + settings.batch_size]], pad_token_id
                ).to(lm.device)
                loss, counts = weighted_loss(lm, batch)
                torch.autograd.backward(loss)
                torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                tokens += int(counts.sum())
                advance(f"loss {losses[-1]:.3f}")
        lm.model.eval()
    stats = stats_of(losses, len(encoded) * settings.epochs, tokens, time.perf_counter() - started)
    log.info(
        "fine-tuned",
        model=lm.model_id,
        samples=stats.samples,
        steps=stats.steps,
        loss=round(stats.mean_loss, 4),
    )
    return stats


@torch.inference_mode()
def mean_response_loss(
    lm: LocalModel, examples: Sequence[Example], max_length: int = 256, batch_size: int = 8
) -> float:
    """Mean loss per response token (weights ignored), with the model in eval mode."""
    if not examples:
        raise ModelError("mean_response_loss needs at least one example")
    encoded = [encode_example(lm, example, max_length) for example in examples]
    lm.model.eval()
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = build_batch(encoded[start : start + batch_size], padding_token_id(lm)).to(lm.device)
        example_losses, counts = per_example_loss(lm, batch)
        total_loss += float((example_losses * counts).sum())
        total_tokens += int(counts.sum())
    return total_loss / max(total_tokens, 1)


def padding_token_id(lm: LocalModel) -> int:
    # Padding is masked out of attention and loss, so any id works; prefer the tokenizer's own.
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    return int(pad) if pad is not None else 0
