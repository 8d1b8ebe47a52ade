"""Participant speed on this machine: SmolLM2-135M conversion, load, batched generation, LoRA training.

    .venv/bin/python -m bench.participant_speed [--skip-conversion] [--quick] [--repeats N] [--threads N]

Generation counts only real answer tokens (an answer's EOS included, the padding after it excluded), so
the figure is what a participant delivers, not what the batch computes. Training runs LoRA with the
default targets (q_proj, v_proj) on short question/answer pairs. Each measurement runs `--repeats` times
and reports every run with the 1-minute load average beside it: on a shared machine the best run is the
closest to the hardware's speed. Torch's intra-op threads spin at every barrier, so on a loaded machine
one thread per process can beat two by 5x: `--threads` sets them. Writes
bench/results/participant_speed_<threads>t.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from participant.data import Example
from participant.generation import generate_answers
from participant.models import SMOLLM2_SPEC, LocalModel, load_model
from participant.training import TrainSettings, adapter_state, attach_lora, encode_example, finetune
from schemas.messages import GenerationParams

RESULTS = Path(__file__).parent / "results"
TOPICS = [
    "photosynthesis", "the water cycle", "binary search", "a hash table", "the French revolution",
    "plate tectonics", "compound interest", "the TCP handshake", "vaccination", "recursion",
    "inflation", "black holes", "garbage collection", "the Roman empire", "entropy", "a neural network",
]  # fmt: skip


def prompts(count: int) -> list[tuple[str, str]]:
    return [(f"p{i}", f"In two sentences, explain {TOPICS[i % len(TOPICS)]}.") for i in range(count)]


def examples(count: int) -> list[Example]:
    return [
        Example(
            f"In one sentence, what is {TOPICS[i % len(TOPICS)]}?",
            f"{TOPICS[i % len(TOPICS)].capitalize()} is a topic that example {i} describes briefly.",
        )
        for i in range(count)
    ]


def time_conversion() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        load_model(SMOLLM2_SPEC, cache_dir=Path(cache))
        first = time.perf_counter() - started
        started = time.perf_counter()
        load_model(SMOLLM2_SPEC, cache_dir=Path(cache))
        cached = time.perf_counter() - started
    return {"first_load_with_conversion_s": first, "load_from_cache_s": cached}


def time_generation(lm: LocalModel, batch_size: int, count: int, max_new_tokens: int) -> dict[str, float]:
    params = GenerationParams(max_new_tokens=max_new_tokens)
    generate_answers(lm, prompts(2), GenerationParams(max_new_tokens=4))  # warm-up
    started = time.perf_counter()
    answers = generate_answers(lm, prompts(count), params, batch_size=batch_size)
    seconds = time.perf_counter() - started
    tokens = sum(a.completion_tokens for a in answers)
    return {
        "load_average_1m": os.getloadavg()[0],
        "batch_size": batch_size,
        "prompts": count,
        "max_new_tokens": max_new_tokens,
        "completion_tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "mean_prompt_tokens": sum(a.prompt_tokens for a in answers) / len(answers),
    }


def time_training(lm: LocalModel, count: int, settings: TrainSettings) -> dict[str, float]:
    data = examples(count)
    finetune(lm, data[: settings.batch_size], settings)  # warm-up, attaches the adapter
    stats = finetune(lm, data, settings)
    lengths = [len(encode_example(lm, e, settings.max_length).input_ids) for e in data]
    return {
        "load_average_1m": os.getloadavg()[0],
        "rank": settings.rank,
        "batch_size": settings.batch_size,
        "samples": stats.samples,
        "mean_sequence_tokens": sum(lengths) / len(lengths),
        "seconds": stats.seconds,
        "samples_per_second": stats.samples_per_second,
        "trainable_parameters": sum(t.numel() for t in adapter_state(lm).values()),
    }


def all_linear_adapter_size(rank: int) -> dict[str, float]:
    """What one FedAvg exchange ships per participant for a LoRA on every linear layer."""
    lm = load_model(SMOLLM2_SPEC)
    attach_lora(lm, TrainSettings(rank=rank, target_modules="all-linear"))
    parameters = sum(t.numel() for t in adapter_state(lm).values())
    return {"rank": rank, "parameters": parameters, "fp32_megabytes": parameters * 4 / 1e6}


def best_of(runs: list[dict[str, float]], key: str) -> dict[str, Any]:
    rates = sorted(run[key] for run in runs)
    return {f"best_{key}": rates[-1], f"median_{key}": rates[len(rates) // 2], "runs": runs}


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_1m_at_start": os.getloadavg()[0],
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers", "peft")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-conversion", action="store_true", help="do not time the GGUF conversion")
    parser.add_argument("--quick", action="store_true", help="fewer prompts and examples")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"model": SMOLLM2_SPEC, "machine": machine()}
    if not args.skip_conversion:
        result["conversion"] = time_conversion()
    started = time.perf_counter()
    lm = load_model(SMOLLM2_SPEC)
    result["load_from_default_cache_s"] = time.perf_counter() - started
    count = 16 if args.quick else 32
    result["generation_batch_16"] = best_of(
        [time_generation(lm, batch_size=16, count=count, max_new_tokens=64) for _ in range(args.repeats)],
        "tokens_per_second",
    )
    result["generation_batch_1"] = best_of(
        [time_generation(lm, batch_size=1, count=2, max_new_tokens=64) for _ in range(args.repeats)],
        "tokens_per_second",
    )
    settings = TrainSettings(rank=8, batch_size=8)
    result["training_r8"] = best_of(
        [time_training(lm, count=count, settings=settings) for _ in range(args.repeats)], "samples_per_second"
    )
    result["adapter_r16_all_linear"] = all_linear_adapter_size(16)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"participant_speed_{args.threads}t.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
