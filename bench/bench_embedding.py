"""Embedding throughput: sentence-transformers' default `encode` vs the coordinator's pipeline.

    .venv/bin/python -m bench.bench_embedding [--quick]

The answer set is realistic: for each public prompt of the stdlib docstring task
(`federation.stdlib_task.split.build_task`) ten simulated participants answer with the reference
(several of them verbatim: greedy decoding repeats itself across participants), a word dropped or swapped,
a truncation, a paraphrase, or another prompt's reference (wrong). Measured side by side, alternating, in
one run:
- `default`: `SentenceTransformer.encode(texts)` with its defaults (batch 32, torch's default thread count),
  fp32; and the same pinned to one torch thread (raw only), to separate the thread count from the backend;
- `minilm`: the coordinator's `SentenceEmbedder` (torch fp32, batch 64);
- `minilm-int8`: `QuantizedSentenceEmbedder` (torch int8 dynamic quantization of the Linear layers);
- `minilm-onnx`: `OnnxEmbedder` (ONNX Runtime, fused fp32 graph, length-sorted batches of 32), at
  `default_threads()` intra-op threads (the coordinator's default: every CPU, at most 4) and at 1 thread;
  `minilm-onnx-int8`: the same graph with int8 dynamic quantization, at `default_threads()`.
"raw" embeds the distinct texts only (no duplicate to exploit); "workload" embeds every answer of the
round, duplicates included, through a fresh `CachedEmbedder`, as a shard's consensus does. The default
encode and minilm-onnx at both thread counts are timed again (raw) while busy-loop processes, one per
CPU, keep every core busy: a shared machine. Label agreement:
HNSW consensus (the coordinator's default settings) on the same answers with each backend against the torch
fp32 encoder; the share of prompts whose decision (label text, or abstention) is the same, on the timed
workload and on a held-out one (the remaining public and test prompts, other answer draws).

A cascade is measured too (not a backend): decide with int8 embeddings, and re-decide with fp32 every
prompt whose decision is close under int8 (density margin between the winner and the best answer with
another text below a threshold τ, or confidence within τ/8 of `min_confidence`, or an answer's closest
similarity within τ/8 of `outlier_similarity`). Reported: the share of prompts refined and of labels
unchanged, per τ and workload, and the break-even share above which it is slower than fp32 alone.
The ONNX files are exported into the default cache on the first run (timed and reported). Writes
bench/results/embedding.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bench.common import machine, machine_line, show_results, table, timed
from common.embedding import CachedEmbedder, Embedder, SentenceEmbedder, default_model_dir
from common.embedding_onnx import OnnxEmbedder, default_threads
from coordinator.consensus import (
    Candidate,
    ConsensusSettings,
    HnswConsensus,
    _all_pairs,
    _densities_by_group,
    _prepare,
    _rule_view,
    _similarities_to,
    _weighted_mean_without,
)
from coordinator.label_rules import LABEL_RULES
from federation.stdlib_task.harvest import Example
from federation.stdlib_task.split import build_task

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

PARTICIPANTS = 10
SHARD = 25  # prompts per consensus call, as a coordinator shard
CASCADE_MARGINS = (0.02, 0.05, 0.1)  # τ: density margins under which the cascade re-decides with fp32


class QuantizedSentenceEmbedder(SentenceEmbedder):
    """MiniLM with int8 dynamic quantization (per-channel weight scales) of its Linear layers, except each
    layer's feed-forward output projection (BERT's activation outliers: quantizing it too moved the
    embeddings noticeably more). Candidate backend, kept in the benchmark until it passes the label check.
    """

    def __init__(self) -> None:
        super().__init__()
        import warnings

        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        chosen = {
            name: per_channel_dynamic_qconfig
            for name, module in self._model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and not (name.endswith("output.dense") and "attention" not in name)
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization warns that it moves to torchao
            self._model = quantize_dynamic(self._model, chosen, dtype=torch.qint8)


def perturb(text: str, rng: random.Random) -> str:
    words = text.split()
    if len(words) < 4:
        return text + " (see the documentation)"
    i = rng.randrange(1, len(words) - 1)
    if rng.random() < 0.5:
        del words[i]
    else:
        words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def paraphrase(text: str, rng: random.Random) -> str:
    lead = rng.choice(["In short: ", "It does this: ", "Basically, it will ", "This function: "])
    body = text[0].lower() + text[1:] if lead.endswith("will ") else text
    return lead + body


def truncate(text: str) -> str:
    words = text.split()
    return " ".join(words[: max(3, int(len(words) * 0.6))])


def workload(
    examples: Sequence[Example], seed: int = 0
) -> tuple[dict[str, list[Candidate]], dict[tuple[str, str], bool]]:
    """Prompt id -> ten participants' answers (duplicates across participants), and for each
    (prompt, text) whether it is a variant of that prompt's own reference (True) or a wrong answer."""
    rng = random.Random(seed)
    out: dict[str, list[Candidate]] = {}
    own: dict[tuple[str, str], bool] = {}
    for example in examples:
        ref = example.reference
        others = [e.reference for e in rng.sample(list(examples), 4) if e.prompt_id != example.prompt_id]
        verbatim = rng.randint(1, 4)
        texts = [ref] * verbatim
        texts += [perturb(ref, rng) for _ in range(rng.randint(1, 3))]
        texts += [truncate(ref), paraphrase(ref, rng)]
        wrong = others[: rng.randint(1, 3)]
        while len(texts) + len(wrong) < PARTICIPANTS:
            texts.append(rng.choice([ref, perturb(ref, rng)]))
        for text in texts:
            own[(example.prompt_id, text)] = True
        for text in wrong:
            own.setdefault((example.prompt_id, text), False)
        texts = (texts + wrong)[:PARTICIPANTS]
        rng.shuffle(texts)
        out[example.prompt_id] = [Candidate(f"p{i}", text) for i, text in enumerate(texts)]
    return out, own


def decisions(embedder: Embedder, answers: dict[str, list[Candidate]]) -> dict[str, str | None]:
    strategy = HnswConsensus(embedder, ConsensusSettings())
    ids = sorted(answers)
    out: dict[str, str | None] = {}
    for start in range(0, len(ids), SHARD):
        result = strategy.decide({p: answers[p] for p in ids[start : start + SHARD]})
        out.update({d.prompt_id: d.label for d in result.decisions})
    return out


def close_calls(
    embedder: Embedder, answers: dict[str, list[Candidate]], settings: ConsensusSettings
) -> dict[str, float]:
    """Prompt id -> how close its decision is under `embedder`, in density units (consensus's exact
    arithmetic): the margin of the winner over the best non-outlier answer with another text, and 8x the
    distance of the confidence to `min_confidence` and of any answer's closest similarity to
    `outlier_similarity`, whichever is least (inf when nothing embedding-dependent decides)."""
    prompts, texts = _prepare(answers)
    vectors = np.asarray(embedder.embed(texts), dtype=np.float64)
    out: dict[str, float] = {}
    for prompt in prompts:
        if len(prompt.weights) < settings.min_answers:
            out[prompt.prompt_id] = float("inf")
            continue
        density, closest = _densities_by_group(prompt, _all_pairs(prompt, vectors), settings.neighbours)
        density = density * prompt.weights
        gaps = [8 * float(np.min(np.abs(closest - settings.outlier_similarity)))]
        view = _rule_view(prompt, density, closest, vectors)
        winner = LABEL_RULES[settings.label_choice].choose(view, settings).answer
        if winner is not None:
            rivals = (closest >= settings.outlier_similarity) & (prompt.text_of != prompt.text_of[winner])
            if rivals.any():
                gaps.append(float(density[winner] - density[rivals].max()))
            label_row = int(prompt.rows[prompt.text_of[winner]])
            to_label = _similarities_to(vectors, prompt.rows, label_row)[prompt.text_of]
            confidence = _weighted_mean_without(to_label, prompt.weights, winner)
            gaps.append(8 * abs(confidence - settings.min_confidence))
        out[prompt.prompt_id] = min(gaps)
    return out


@dataclass(frozen=True)
class Workload:
    """The timed prompts' answers and a held-out set of other prompts' answers."""

    examples: list[Example]
    answers: dict[str, list[Candidate]]
    own: dict[tuple[str, str], bool]
    held_out: dict[str, list[Candidate]]
    held_out_own: dict[tuple[str, str], bool]
    texts: list[str]  # every timed answer, duplicates included
    distinct: list[str]  # the same without duplicates, in first-seen order

    @property
    def sets(self) -> dict[str, tuple[dict[str, list[Candidate]], dict[tuple[str, str], bool]]]:
        return {"bench": (self.answers, self.own), "held-out": (self.held_out, self.held_out_own)}


@dataclass(frozen=True)
class Backends:
    default_model: SentenceTransformer
    torch_threads: int  # torch's default, restored after the one-thread runs
    onnx_threads: int
    embedders: dict[str, Embedder]
    load_seconds: dict[str, float]  # ONNX backends only

    @property
    def one_thread(self) -> str:
        """The ONNX backend at 1 thread: minilm-onnx itself where `default_threads()` is 1."""
        return "minilm-onnx at 1 thread" if "minilm-onnx at 1 thread" in self.embedders else "minilm-onnx"


@dataclass(frozen=True)
class Timings:
    sizes: dict[str, int]  # texts embedded per run
    times: dict[str, list[tuple[float, float]]]  # (wall, CPU) seconds per repetition, in run order
    busy_times: dict[str, list[float]]  # wall seconds per repetition with every core busy

    def ratio(self, name: str, base: str) -> float:
        """Speed-up per repetition (against `base` of the same repetition), then the median."""
        return round(
            statistics.median(
                (self.sizes[name] / t[0]) / (self.sizes[base] / b[0])
                for t, b in zip(self.times[name], self.times[base], strict=True)
            ),
            2,
        )


@dataclass(frozen=True)
class Speeds:
    rows: dict[str, dict[str, float]]
    speedups: dict[str, float]
    onnx_vs_one_thread: float
    threads_gain: float
    busy: dict[str, dict[str, float]]


@dataclass(frozen=True)
class Labels:
    """Consensus labels per backend and workload, and their agreement with the torch fp32 reference."""

    references: dict[str, dict[str, str | None]]
    labels_of: dict[str, dict[str, dict[str, str | None]]]
    agreement: dict[str, dict[str, float]]

    def passes(self, name: str) -> bool:
        return min(self.agreement[name][f"{kind}_labels_unchanged_pct"] for kind in self.references) >= 99.0


@dataclass(frozen=True)
class Summary:
    break_even: float  # refined share above which the cascade is slower than fp32 alone
    wrong_fp32: int
    labelled: float
    best: str | None
    best_workload: float
    met: bool


@dataclass(frozen=True)
class Results:
    args: argparse.Namespace
    host: dict[str, Any]
    work: Workload
    backends: Backends
    timings: Timings
    speeds: Speeds
    labels: Labels
    cascade: dict[str, dict[str, float]]
    summary: Summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host = machine()
    work = build_workload(args.prompts)
    backends = load_backends()
    warm_up(backends, work.distinct)
    runs = make_runs(backends, work)
    sizes = {name: len(work.distinct) if name.endswith("raw") else len(work.texts) for name in runs}
    times = time_runs(runs, sizes, args.reps)
    busy_times = time_busy(runs, sizes, args.reps, backends.one_thread)
    timings = Timings(sizes, times, busy_times)
    speeds = speeds_of(timings, backends.one_thread)
    labels = label_agreement(backends.embedders, work)
    cascade = cascade_int8_then_fp32(backends.embedders, labels, work)
    summary = summarise(speeds, labels, work)
    results = Results(args, host, work, backends, timings, speeds, labels, cascade, summary)
    show_results("embedding", report_of(results), markdown_of(results), write=not args.no_write)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.reps = 40, 1
    return args


def build_workload(prompts: int) -> Workload:
    """The first `prompts` public-then-test prompts are timed; the rest, with other draws, are held out."""
    task = build_task()
    examples = (task.public + task.test)[:prompts]
    answers, own = workload(examples)
    held_out, held_out_own = workload((task.public + task.test)[prompts:], seed=1)
    texts = [c.text for found in answers.values() for c in found]
    distinct = sorted(set(texts), key=texts.index)
    return Workload(examples, answers, own, held_out, held_out_own, texts, distinct)


def load_backends() -> Backends:
    """sentence-transformers' default model and every pipeline backend, with the ONNX load times."""
    from sentence_transformers import SentenceTransformer

    default_model = SentenceTransformer(str(default_model_dir()), device="cpu", local_files_only=True)
    torch_threads = torch.get_num_threads()
    embedders: dict[str, Embedder] = {
        "minilm": SentenceEmbedder(),
        "minilm-int8": QuantizedSentenceEmbedder(),
    }
    load_seconds: dict[str, float] = {}
    onnx_threads = default_threads()
    onnx_backends = {
        "minilm-onnx": (False, onnx_threads),
        "minilm-onnx at 1 thread": (False, 1),
        "minilm-onnx-int8": (True, onnx_threads),
    }
    for name, (quantize, threads) in onnx_backends.items():
        if name.endswith("1 thread") and onnx_threads == 1:
            continue  # the same as minilm-onnx
        # First run: exports into the cache (timed here); later runs load the cached file.
        started = time.perf_counter()
        embedders[name] = OnnxEmbedder(quantize=quantize, threads=threads)
        load_seconds[name] = time.perf_counter() - started
    return Backends(default_model, torch_threads, onnx_threads, embedders, load_seconds)


def warm_up(backends: Backends, distinct: list[str]) -> None:
    backends.default_model.encode(distinct[:32])
    for embedder in backends.embedders.values():
        embedder.embed(distinct[:32])


def make_runs(backends: Backends, work: Workload) -> dict[str, Callable[[], object]]:
    """Run name -> what it times: raw runs embed the distinct texts, workload runs every answer."""
    model = backends.default_model
    runs: dict[str, Callable[[], object]] = {
        "default encode, raw": partial(model.encode, work.distinct),
        "default encode, workload": partial(model.encode, work.texts),
        "default encode at 1 torch thread, raw": partial(
            encode_at_one_torch_thread, model, work.distinct, backends.torch_threads
        ),
    }
    for name, embedder in backends.embedders.items():
        runs[f"{name} pipeline, raw"] = partial(embedder.embed, work.distinct)
        runs[f"{name} pipeline, workload"] = partial(embed_cold, embedder, work.texts)
    return runs


def encode_at_one_torch_thread(model: SentenceTransformer, texts: list[str], torch_threads: int) -> object:
    torch.set_num_threads(1)
    try:
        return model.encode(texts)
    finally:
        torch.set_num_threads(torch_threads)


def time_runs(
    runs: dict[str, Callable[[], object]], sizes: dict[str, int], reps: int
) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds of each run per repetition, in forward then reverse order alternately."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            times[name].append(timed(runs[name])[1:])
            wall = times[name][-1][0]
            print(f"rep {rep} {name:40s} {sizes[name] / wall:8.1f} sentences/s")
    return times


def time_busy(
    runs: dict[str, Callable[[], object]], sizes: dict[str, int], reps: int, one_thread: str
) -> dict[str, list[float]]:
    """The thread comparison again (raw) with every core kept busy by another process: a shared machine."""
    busy_names = ("default encode, raw", f"{one_thread} pipeline, raw", "minilm-onnx pipeline, raw")
    busy_times: dict[str, list[float]] = {name: [] for name in busy_names}  # one key if one_thread is it
    with cpu_hogs(os.cpu_count() or 1):
        for rep in range(reps):
            for name in list(busy_times) if rep % 2 == 0 else list(busy_times)[::-1]:
                busy_times[name].append(timed(runs[name])[1])
                print(f"busy rep {rep} {name:35s} {sizes[name] / busy_times[name][-1]:8.1f} sentences/s")
    return busy_times


def speeds_of(timings: Timings, one_thread: str) -> Speeds:
    """Median rates per run, speed-ups against the default encode, and the busy-machine rates."""
    sizes, times = timings.sizes, timings.times
    rows: dict[str, dict[str, float]] = {}
    for name in times:
        wall = statistics.median(t[0] for t in times[name])
        cpu = statistics.median(t[1] for t in times[name])
        rows[name] = {
            "sentences": sizes[name],
            "sentences_per_second": round(sizes[name] / wall, 1),
            "sentences_per_cpu_second": round(sizes[name] / cpu, 1),
        }
    speedups = {
        name: timings.ratio(
            name, "default encode, raw" if name.endswith("raw") else "default encode, workload"
        )
        for name in times
    }
    onnx_vs_one_thread = timings.ratio(f"{one_thread} pipeline, raw", "default encode at 1 torch thread, raw")
    threads_gain = timings.ratio("minilm-onnx pipeline, raw", f"{one_thread} pipeline, raw")
    busy = {
        name: {
            "sentences_per_second": round(sizes[name] / statistics.median(walls), 1),
            "vs_onnx_1_thread": round(
                statistics.median(
                    b / w
                    for w, b in zip(walls, timings.busy_times[f"{one_thread} pipeline, raw"], strict=True)
                ),
                2,
            ),
        }
        for name, walls in timings.busy_times.items()
    }
    return Speeds(rows, speedups, onnx_vs_one_thread, threads_gain, busy)


def verdict(owned: dict[tuple[str, str], bool], prompt_id: str, label: str | None) -> str:
    return "abstain" if label is None else "own" if owned[(prompt_id, label)] else "wrong"


def share(
    reference: dict[str, str | None],
    labels: dict[str, str | None],
    key: Callable[[str, str | None], object],
) -> float:
    """Percentage of prompts on which `labels` and the reference agree, as seen through `key`."""
    same = sum(key(p, reference[p]) == key(p, labels[p]) for p in reference)
    return round(100.0 * same / len(reference), 2)


def label_agreement(embedders: dict[str, Embedder], work: Workload) -> Labels:
    """Each backend's consensus labels on both workloads, against those of the torch fp32 `minilm`."""
    sets = work.sets
    reference_vectors = embedders["minilm"].embed(work.distinct)
    references = {
        name: decisions(CachedEmbedder(embedders["minilm"]), found) for name, (found, _) in sets.items()
    }
    labels_of: dict[str, dict[str, dict[str, str | None]]] = {}
    agreement: dict[str, dict[str, float]] = {}
    for name, embedder in embedders.items():
        if name == "minilm":
            continue
        cached = CachedEmbedder(embedder)
        labels_of[name] = {kind: decisions(cached, found) for kind, (found, _) in sets.items()}
        cosines = np.sum(reference_vectors * embedder.embed(work.distinct), axis=1)
        agreement[name] = {
            f"{kind}_{measure}": share(
                references[kind],
                labels_of[name][kind],
                (lambda _, label: label) if measure == "labels_unchanged_pct" else partial(verdict, owned),
            )
            for kind, (_, owned) in sets.items()
            for measure in ("labels_unchanged_pct", "same_kind_pct")
        } | {"cosine_min": round(float(cosines.min()), 6), "cosine_mean": round(float(cosines.mean()), 6)}
    return Labels(references, labels_of, agreement)


def cascade_int8_then_fp32(
    embedders: dict[str, Embedder], labels: Labels, work: Workload
) -> dict[str, dict[str, float]]:
    """τ -> per workload, the share of prompts re-decided with fp32 and of labels unchanged: int8
    (minilm-onnx-int8) decisions, fp32 (minilm-onnx) ones for the prompts int8 finds close."""
    settings = ConsensusSettings()
    fast, exact = CachedEmbedder(embedders["minilm-onnx-int8"]), "minilm-onnx"
    cascade: dict[str, dict[str, float]] = {}
    for kind, (found, _) in work.sets.items():
        closeness = close_calls(fast, found, settings)
        for margin in CASCADE_MARGINS:
            refined = {p for p, gap in closeness.items() if gap < margin}
            chosen = {
                p: (labels.labels_of[exact] if p in refined else labels.labels_of["minilm-onnx-int8"])[kind][
                    p
                ]
                for p in closeness
            }
            cascade.setdefault(f"τ={margin}", {}).update(
                {
                    f"{kind}_refined_pct": round(100.0 * len(refined) / len(closeness), 1),
                    f"{kind}_labels_unchanged_pct": share(
                        labels.references[kind], chosen, lambda _, label: label
                    ),
                }
            )
    return cascade


def summarise(speeds: Speeds, labels: Labels, work: Workload) -> Summary:
    """The cascade's break-even, the fp32 reference's own quality, and the fastest passing backend."""
    speedups = speeds.speedups
    # int8 for every text, then fp32 for a share s of them, against fp32 for all: 1/r8 + s/r32 < 1/r32.
    break_even = 100.0 * (
        1 - speedups["minilm-onnx pipeline, raw"] / speedups["minilm-onnx-int8 pipeline, raw"]
    )
    reference = labels.references["bench"]
    wrong_fp32 = sum(verdict(work.own, p, reference[p]) == "wrong" for p in reference)
    labelled = 100.0 * sum(v is not None for v in reference.values()) / len(reference)
    best = max(
        (name for name in labels.agreement if labels.passes(name)),
        key=lambda name: speedups[f"{name} pipeline, workload"],
        default=None,
    )
    best_workload = speedups[f"{best} pipeline, workload"] if best else 0.0
    met = best is not None and best_workload >= 5.0
    return Summary(break_even, wrong_fp32, labelled, best, best_workload, met)


def report_of(r: Results) -> dict[str, Any]:
    """The JSON report."""
    return {
        "machine": r.host,
        "config": vars(r.args)
        | {
            "participants": PARTICIPANTS,
            "torch_threads": r.backends.torch_threads,
            "onnxruntime": onnxruntime_version(),
            "onnx_threads": r.backends.onnx_threads,
        },
        "answers": len(r.work.texts),
        "distinct_answers": len(r.work.distinct),
        "held_out_prompts": len(r.work.held_out),
        "rows": r.speeds.rows,
        "speedup_vs_default": r.speeds.speedups,
        "onnx_raw_vs_default_at_1_torch_thread": r.speeds.onnx_vs_one_thread,
        "onnx_raw_default_threads_vs_1_thread": r.speeds.threads_gain,
        "busy_machine_raw": r.speeds.busy,
        "onnx_load_seconds": {name: round(seconds, 2) for name, seconds in r.backends.load_seconds.items()},
        "agreement_vs_torch_fp32": r.labels.agreement,
        "cascade_int8_then_fp32": r.cascade,
        "cascade_break_even_refined_pct": round(r.summary.break_even, 1),
        "fp32_labels_from_a_wrong_answer": r.summary.wrong_fp32,
        "labelled_pct_fp32": round(r.summary.labelled, 1),
        "best_passing_backend": r.summary.best,
        "target_met": r.summary.met,
        "repetitions": {
            name: [[round(w, 3), round(c, 3)] for w, c in r.timings.times[name]] for name in r.timings.times
        },
    }


def speed_rows(speeds: Speeds) -> list[list[object]]:
    columns = ("sentences", "sentences_per_second", "sentences_per_cpu_second")
    return [[name, *(row[k] for k in columns), speeds.speedups[name]] for name, row in speeds.rows.items()]


def agreement_rows(labels: Labels, kinds: Sequence[str]) -> list[list[object]]:
    return [
        [
            name,
            *(
                f"{a[f'{kind}_{measure}']:.1f}%"
                for measure in ("labels_unchanged_pct", "same_kind_pct")
                for kind in kinds
            ),
            f"{a['cosine_min']:.4f}",
            f"{a['cosine_mean']:.5f}",
            "yes" if labels.passes(name) else "no",
        ]
        for name, a in labels.agreement.items()
    ]


def cascade_rows(cascade: dict[str, dict[str, float]], kinds: Sequence[str]) -> list[list[object]]:
    return [
        [
            margin,
            *(f"{c[f'{kind}_{m}']:.1f}%" for kind in kinds for m in ("refined_pct", "labels_unchanged_pct")),
        ]
        for margin, c in cascade.items()
    ]


def markdown_of(r: Results) -> list[str]:
    """The Markdown report's lines."""
    work, backends, speeds, summary = r.work, r.backends, r.speeds, r.summary
    kinds = list(work.sets)
    one_thread, onnx_threads, best = backends.one_thread, backends.onnx_threads, summary.best
    return [
        "# Embedding: sentence-transformers' default encode vs the coordinator's pipeline",
        "",
        machine_line(r.host),
        "",
        f"{len(work.examples)} stdlib-docstring prompts × {PARTICIPANTS} simulated answers = "
        f"{len(work.texts)} answers, "
        f"{len(work.distinct)} distinct (references verbatim, perturbed, truncated, paraphrased, other "
        f"prompts'). {r.args.reps} alternating repetitions, medians; torch threads {backends.torch_threads}, "
        f"onnxruntime {onnxruntime_version()} with {onnx_threads} intra-op thread(s) (`default_threads()`) "
        "unless named.",
        "",
        *table(["embedder", "texts", "sentences/s", "sentences/CPU-s", "× default"], speed_rows(speeds)),
        "",
        f"minilm-onnx at its default {onnx_threads} thread(s) against 1 thread, distinct texts: "
        f"{speeds.threads_gain}× (per repetition, then the median). Against sentence-transformers' encode "
        "pinned to one torch thread, "
        f"minilm-onnx at {'1 thread' if one_thread != 'minilm-onnx' else 'its default'} on distinct texts is "
        f"{speeds.onnx_vs_one_thread}×. The same on distinct texts while {os.cpu_count()} other processes "
        "keep every core busy (busy loops; a shared machine):",
        "",
        *table(
            ["embedder", "sentences/s, busy machine", f"× {one_thread}"],
            [[name, b["sentences_per_second"], b["vs_onnx_1_thread"]] for name, b in speeds.busy.items()],
        ),
        "",
        f"Consensus decisions against the torch fp32 encoder (HNSW, default settings, shards of {SHARD}; "
        f"fp32 labels {summary.labelled:.0f}% of {len(r.labels.references['bench'])} prompts, "
        f"{summary.wrong_fp32} of them a wrong answer), on the timed workload (bench) and on a held-out one "
        f"({len(work.held_out)} other prompts, other answer draws). Same kind: a variant of the prompt's own "
        "reference / a wrong answer / abstain.",
        "",
        *table(
            [
                "embedder",
                *(f"{what} ({kind})" for what in ("labels unchanged", "same kind") for kind in kinds),
                "cosine min",
                "cosine mean",
                "≥ 99%?",
            ],
            agreement_rows(r.labels, kinds),
        ),
        "",
        "Cascade (measured, not a backend): minilm-onnx-int8 decides; prompts it finds close (density margin "
        "of the winner below τ, or confidence / an outlier test within τ/8 of its threshold) are re-decided "
        "with minilm-onnx. It is faster than minilm-onnx alone only while it refines fewer than "
        f"{summary.break_even:.0f}% of the prompts (their texts; estimated from the raw rates above).",
        "",
        *table(
            ["τ", *(f"{what} ({kind})" for kind in kinds for what in ("refined", "labels unchanged"))],
            cascade_rows(r.cascade, kinds),
        ),
        "",
        "Target ≥5× the default on the workload with ≥99% labels unchanged: "
        f"{'met' if summary.met else 'not met'}"
        + (
            f"; fastest backend that keeps ≥ 99% of labels on both workloads: {best}, "
            f"workload {summary.best_workload}×, "
            f"raw {speeds.speedups[f'{best} pipeline, raw']}×."
            if best
            else " (no backend kept ≥ 99% of labels)."
        ),
        "ONNX model load (export into the cache on the first run, else reading the cached file): "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in backends.load_seconds.items())
        + ".",
        "",
        "Regenerate: `.venv/bin/python -m bench.bench_embedding` (`--quick` for a smoke run).",
    ]


def embed_cold(embedder: Embedder, texts: Sequence[str]) -> object:
    """A shard's view: every answer, duplicates included, through a fresh cache."""
    return CachedEmbedder(embedder).embed(texts)


@contextlib.contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    """`count` processes that each keep one core busy while the block runs; ended (by pid) after it."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(1.0)  # let them start
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def onnxruntime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


if __name__ == "__main__":
    raise SystemExit(main())
