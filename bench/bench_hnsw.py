"""HNSW consensus against the exact reference: same-label agreement and time per shard.

    .venv/bin/python -m bench.bench_hnsw [--quick] [--no-minilm]

Answers are synthetic 384-dimensional unit vectors (MiniLM's width) drawn around 1-4 topic
centres per prompt, with repeated texts and some stale answers, so that the timing is of
consensus alone: the embedder is a table lookup. Writes bench/results/hnsw_vs_exact.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.common import machine, machine_line, versions, write_results
from common.embedding import Embeddings
from coordinator.consensus import Candidate, ConsensusSettings, ExactConsensus, HnswConsensus, ShardConsensus

DIM = 384


class TableEmbedder:
    """Precomputed vectors by text, so that the benchmark times consensus and not a model."""

    name = "table"
    dim = DIM

    def __init__(self, table: Mapping[str, npt.NDArray[np.float32]]) -> None:
        self.table = table

    def embed(self, texts: Sequence[str]) -> Embeddings:
        return np.stack([self.table[text] for text in texts])


@dataclass(frozen=True)
class Scenario:
    answers_per_prompt: int
    prompts_per_shard: int
    shards: int


@dataclass(frozen=True)
class Row:
    answers_per_prompt: int
    hnsw_variant: str
    prompts: int
    same_label_pct: float
    identical_decision_pct: float
    labelled_pct: float
    exact_seconds_per_shard: float
    hnsw_seconds_per_shard: float
    exact_cpu_seconds_per_shard: float
    hnsw_cpu_seconds_per_shard: float
    hnsw_scanned_query_pct: float
    hnsw_filtered_query_pct: float
    hnsw_fallbacks: int


def random_shard(
    rng: np.random.Generator, scenario: Scenario
) -> tuple[dict[str, list[Candidate]], TableEmbedder]:
    table: dict[str, npt.NDArray[np.float32]] = {}
    answers: dict[str, list[Candidate]] = {}
    for prompt in range(scenario.prompts_per_shard):
        centres = rng.standard_normal((int(rng.integers(1, 5)), DIM))
        popularity = rng.dirichlet(np.ones(len(centres)))  # usually one topic dominates, sometimes none
        spread = rng.uniform(0.02, 0.08)  # per coordinate: paraphrase-like cosine 0.3-0.9 to the centre
        found: list[Candidate] = []
        for answer in range(scenario.answers_per_prompt):
            weight = 0.5 if rng.random() < 0.1 else 1.0
            if found and rng.random() < 0.1:
                text = found[int(rng.integers(len(found)))].text  # repeats, as greedy decoding gives
            else:
                text = f"q{prompt}-a{answer}"
                centre = centres[int(rng.choice(len(centres), p=popularity))]
                vector = centre / np.linalg.norm(centre) + spread * rng.standard_normal(DIM)
                table[text] = (vector / np.linalg.norm(vector)).astype(np.float32)
            found.append(Candidate(f"p{answer:04d}", text, weight))
        answers[f"q{prompt:04d}"] = found
    return answers, TableEmbedder(table)


def timed(
    strategy: ExactConsensus | HnswConsensus, answers: dict[str, list[Candidate]]
) -> tuple[ShardConsensus, float, float]:
    """The result, wall seconds and CPU seconds (the latter robust on a shared, loaded machine)."""
    started, started_cpu = time.perf_counter(), time.process_time()
    result = strategy.decide(answers)
    return result, time.perf_counter() - started, time.process_time() - started_cpu


def run_scenario(scenario: Scenario, variant: str, settings: ConsensusSettings, seed: int) -> Row:
    rng = np.random.default_rng(seed)
    same = identical = labelled = prompts = fallbacks = scanned = filtered = texts = 0
    exact_times: list[float] = []
    hnsw_times: list[float] = []
    exact_cpu: list[float] = []
    hnsw_cpu: list[float] = []
    for _ in range(scenario.shards):
        answers, embedder = random_shard(rng, scenario)
        exact, exact_seconds, exact_cpu_seconds = timed(ExactConsensus(embedder, settings), answers)
        hnsw_strategy = HnswConsensus(embedder, settings)
        hnsw, hnsw_seconds, hnsw_cpu_seconds = timed(hnsw_strategy, answers)
        exact_times.append(exact_seconds)
        hnsw_times.append(hnsw_seconds)
        exact_cpu.append(exact_cpu_seconds)
        hnsw_cpu.append(hnsw_cpu_seconds)
        fallbacks += hnsw_strategy.fallbacks
        scanned += hnsw_strategy.scanned_queries
        filtered += hnsw_strategy.filtered_queries
        texts += len({(prompt, c.text) for prompt, found in answers.items() for c in found})
        for reference, approximate in zip(exact.decisions, hnsw.decisions, strict=True):
            prompts += 1
            same += reference.label == approximate.label
            identical += reference == approximate
            labelled += reference.labelled
    return Row(
        answers_per_prompt=scenario.answers_per_prompt,
        hnsw_variant=variant,
        prompts=prompts,
        same_label_pct=100.0 * same / prompts,
        identical_decision_pct=100.0 * identical / prompts,
        labelled_pct=100.0 * labelled / prompts,
        exact_seconds_per_shard=statistics.median(exact_times),
        hnsw_seconds_per_shard=statistics.median(hnsw_times),
        exact_cpu_seconds_per_shard=statistics.median(exact_cpu),
        hnsw_cpu_seconds_per_shard=statistics.median(hnsw_cpu),
        hnsw_scanned_query_pct=100.0 * scanned / texts,
        hnsw_filtered_query_pct=100.0 * filtered / texts,
        hnsw_fallbacks=fallbacks,
    )


def minilm_sentences_per_second(count: int = 512) -> dict[str, float]:
    """Sentences per wall second and per CPU second (torch may use every core)."""
    from common.embedding import SentenceEmbedder

    embedder = SentenceEmbedder()
    sentences = [
        f"Answer {i}: the result depends on factor {i % 17} and on the season {i % 4}." for i in range(count)
    ]
    embedder.embed(sentences[:64])  # warm-up
    started, started_cpu = time.perf_counter(), time.process_time()
    embedder.embed(sentences)
    return {
        "per_wall_second": count / (time.perf_counter() - started),
        "per_cpu_second": count / (time.process_time() - started_cpu),
    }


VARIANTS = {
    "default (M 16, efC 100, ef 64)": ConsensusSettings(min_confidence=0.3),
    "fast (M 8, efC 32, ef 16)": ConsensusSettings(
        min_confidence=0.3, hnsw_m=8, hnsw_ef_construction=32, hnsw_ef=16
    ),
    "default, filter= always": ConsensusSettings(min_confidence=0.3, hnsw_filter_min_texts=0),
}


def markdown(rows: Sequence[Row], about: Mapping[str, Any], minilm: Mapping[str, float] | None) -> str:
    lines = [
        "# HNSW vs exact consensus",
        "",
        machine_line(about),
        "Versions: " + ", ".join(f"{name} {version}" for name, version in about["versions"].items()) + ".",
        "",
        "Synthetic 384-d answers around 1-4 topics per prompt, 10% repeated texts, 10% stale (weight 0.5);",
        "neighbours 8, min_confidence 0.3. Times: median per shard of consensus alone (no model), in CPU",
        "seconds (wall seconds in the JSON; on a loaded shared machine CPU time is the steadier measure).",
        "",
        "| answers/prompt | HNSW settings | prompts | same label | identical decision | labelled"
        " | exact CPU s/shard | HNSW CPU s/shard | scanned | filtered | fallbacks |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.answers_per_prompt} | {r.hnsw_variant} | {r.prompts} | {r.same_label_pct:.1f}% "
            f"| {r.identical_decision_pct:.1f}% | {r.labelled_pct:.0f}% "
            f"| {r.exact_cpu_seconds_per_shard:.3f} | {r.hnsw_cpu_seconds_per_shard:.3f} "
            f"| {r.hnsw_scanned_query_pct:.1f}% | {r.hnsw_filtered_query_pct:.1f}% | {r.hnsw_fallbacks} |"
        )
    lines += [
        "",
        "`prompts` counts prompts over all shards of a row (shards = prompts / prompts per shard).",
        "`scanned` / `filtered`: share of distinct texts whose neighbours the unfiltered batch search",
        "missed and that were found by a brute-force scan of the prompt (prompts under 1,024 texts) or by",
        "hnswlib's `filter=` search (larger prompts, or always in the `filter= always` rows). The exact",
        "strategy is O(n²) in time and memory per prompt; HNSW pays an index build per shard call.",
    ]
    if minilm is not None:
        lines += [
            "",
            f"MiniLM (all-MiniLM-L6-v2, CPU, batch 64): {minilm['per_wall_second']:.0f} sentences per wall"
            f" second, {minilm['per_cpu_second']:.0f} per CPU second.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer shards, for a smoke run")
    parser.add_argument("--no-minilm", action="store_true", help="skip the MiniLM throughput measurement")
    args = parser.parse_args(argv)
    shards = 1 if args.quick else 5
    scenarios = [
        Scenario(10, 40, shards),
        Scenario(10, 500, 1),  # one large shard: index build over 5,000 answers
        Scenario(100, 10, shards),
        Scenario(1_000, 2, shards),
        Scenario(3_000, 1, 1 if args.quick else 2),
    ]
    about = machine() | {"versions": versions("numpy", "hnswlib", "torch", "sentence-transformers")}
    rows = []
    for scenario in scenarios:
        for variant, settings in VARIANTS.items():
            seed = scenario.answers_per_prompt * 1_000 + scenario.prompts_per_shard
            rows.append(run_scenario(scenario, variant, settings, seed=seed))
            print(rows[-1], flush=True)
    minilm = None if args.no_minilm else minilm_sentences_per_second()
    report = {"machine": about, "minilm_sentences_per_second": minilm, "rows": [asdict(row) for row in rows]}
    write_results("hnsw_vs_exact", report, markdown(rows, about, minilm))


if __name__ == "__main__":
    main()
