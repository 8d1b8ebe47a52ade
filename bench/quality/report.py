"""From the stored run results to the report: levels and differences with intervals, label quality, bytes.

A method's score on one test prompt is the mean over its participants' models (centralized: its one
model). Differences pair the same prompt of the same seed; intervals come from `stats.seed_bootstrap`.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean
from typing import Any

import numpy as np

from bench.quality.grid import LABELS, METHODS, WARMUP
from bench.quality.results import RunResult
from bench.quality.stats import paired_differences, seed_bootstrap

METRICS = ("nll", "rouge_l", "embedding_similarity")  # nll: lower is better
BASELINES = ("local", "fedavg")


def prompt_scores(result: RunResult, metric: str) -> np.ndarray:
    """Per prompt, the mean over the run's models."""
    rows = [getattr(p, metric) for p in result.participants.values() if getattr(p, metric)]
    means: np.ndarray = np.mean(np.asarray(rows, dtype=np.float64), axis=0)
    return means


def summarise(results: Sequence[RunResult], resamples: int) -> dict[str, Any]:
    by_task: dict[str, dict[str, dict[int, RunResult]]] = {}
    for result in results:
        by_task.setdefault(result.task, {}).setdefault(result.method, {})[result.seed] = result
    return {task: _task_summary(methods, resamples) for task, methods in by_task.items()}


def _task_summary(runs: dict[str, dict[int, RunResult]], resamples: int) -> dict[str, Any]:
    methods = [m for m in METHODS if m in runs]
    summary: dict[str, Any] = {"methods": {}, "differences": {}, "label_quality": {}}
    tests = {(r.seed, r.test_sha256) for by_seed in runs.values() for r in by_seed.values()}
    summary["same_test_set_per_seed"] = len(tests) == len({seed for seed, _ in tests})
    summary["test_prompts"] = sorted({r.test_prompts for by_seed in runs.values() for r in by_seed.values()})
    summary["generation_prompts"] = sorted(
        {len(r.subset) for by_seed in runs.values() for r in by_seed.values()}
    )
    for method in methods:
        by_seed = runs[method]
        seeds = sorted(by_seed)
        summary["methods"][method] = {
            "label": LABELS[method],
            "seeds": seeds,
            **{
                m: seed_bootstrap([prompt_scores(by_seed[s], m) for s in seeds], resamples).as_dict()
                for m in METRICS
            },
            "subset_nll_by_round": _by_round(list(by_seed.values())),
            "bytes_per_participant_per_round": fmean(r.bytes_per_participant_round for r in by_seed.values()),
            "seconds": {
                phase: fmean(r.seconds.get(phase, 0.0) for r in by_seed.values())
                for phase in ("train", "score")
            },
        }
        for baseline in BASELINES:
            if method == "local" or baseline == method or baseline not in runs:
                continue
            shared = sorted(set(by_seed) & set(runs[baseline]))
            if not shared:
                continue
            summary["differences"].setdefault(method, {})[baseline] = {
                metric: seed_bootstrap(
                    paired_differences(
                        [prompt_scores(by_seed[s], metric) for s in shared],
                        [prompt_scores(runs[baseline][s], metric) for s in shared],
                    ),
                    resamples,
                ).as_dict()
                for metric in METRICS
            }
        quality = [r.label_quality for r in by_seed.values() if r.label_quality]
        if quality:
            summary["label_quality"][method] = pooled_label_quality(quality)
    if WARMUP in runs:
        own_data = own_data_summary(
            [r.extra["own_data"] for r in runs[WARMUP].values() if "own_data" in r.extra]
        )
        if own_data:
            summary["own_data"] = own_data
        summary["warmup_subset_nll"] = fmean(
            v for r in runs[WARMUP].values() for p in r.participants.values() for v in p.subset_nll_by_round
        )
    semantic, fedavg = summary["methods"].get("medoid"), summary["methods"].get("fedavg")
    if semantic and fedavg and semantic["bytes_per_participant_per_round"]:
        summary["fedavg_to_semantic_bytes"] = (
            fedavg["bytes_per_participant_per_round"] / semantic["bytes_per_participant_per_round"]
        )
    return summary


def own_data_summary(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per member whose private data it is, over seeds: the ROUGE-L of its own model's answers to its
    private prompts, and the mean of the other members' models' answers to them."""
    owners = sorted({owner for table in per_seed for row in table.values() for owner in row})
    out = {}
    for owner in owners:
        own = [t[owner][owner] for t in per_seed if owner in t and owner in t[owner]]
        others = [row[owner] for t in per_seed for pid, row in t.items() if pid != owner and owner in row]
        if own and others:
            out[owner] = {"own": fmean(own), "others": fmean(others)}
    return out


def _by_round(results: list[RunResult]) -> list[float]:
    """Mean subset NLL per round over seeds and models (round 0: the start)."""
    series = [
        p.subset_nll_by_round for r in results for p in r.participants.values() if p.subset_nll_by_round
    ]
    if not series:
        return []
    length = min(len(s) for s in series)
    return [float(np.nanmean([s[i] for s in series])) for i in range(length)]


def pooled_label_quality(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    """Per round and overall, over seeds: means weighted by labelled prompts, counts summed."""
    keys = [*sorted({k for q in per_seed for k in q["rounds"]}, key=int), "overall"]
    out: dict[str, dict[str, float | int | None]] = {}
    for key in keys:
        rows = [q["overall"] if key == "overall" else q["rounds"].get(key) for q in per_seed]
        rows = [r for r in rows if r]
        labelled = sum(r["labelled"] for r in rows)
        pooled: dict[str, float | int | None] = {
            "labelled": labelled,
            "abstained": sum(r["abstained"] for r in rows),
            "beat_mean": sum(r["beat_mean"] for r in rows),
        }
        for field in ("label", "members_mean", "oracle"):
            weighted = [(r[field], r["labelled"]) for r in rows if r[field] is not None and r["labelled"]]
            total = sum(w for _, w in weighted)
            pooled[field] = sum(v * w for v, w in weighted) / total if total else None
        out[key] = pooled
    return out


def junk_summary(results: Sequence[RunResult]) -> dict[str, Any] | None:
    """The junk-member run beside local-only on the same task and seed, per participant."""
    junk = next((r for r in results if r.method == "junk_member"), None)
    if junk is None:
        return None
    local = next((r for r in results if (r.task, r.seed, r.method) == (junk.task, junk.seed, "local")), None)
    rows = {}
    for pid, scores in junk.participants.items():
        row: dict[str, Any] = {
            "model": scores.model,
            "nll": _mean(scores.nll),
            "rouge_l": _mean(scores.rouge_l),
        }
        if local is not None and pid in local.participants and scores.model == local.participants[pid].model:
            row["local_only_nll"] = _mean(local.participants[pid].nll)
            row["local_only_rouge_l"] = _mean(local.participants[pid].rouge_l)
        rows[pid] = row
    return {
        "task": junk.task,
        "seed": junk.seed,
        "participants": rows,
        "label_quality": junk.label_quality,
        "bytes_per_participant_per_round": junk.bytes_per_participant_round,
        "fedavg": junk.extra.get("fedavg"),
        "error": junk.error,
        "notes": junk.notes,
    }


def members_beside_local(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Per (task, seed) with a local-only run: each member's scores under every method beside its own
    local-only scores (in a heterogeneous federation, the question is whether each member gains)."""
    runs = {(r.task, r.seed, r.method): r for r in results}
    out = []
    for (task, seed, method), local in sorted(runs.items()):
        if method != "local":
            continue
        others = [m for m in ("medoid", "shipped") if (task, seed, m) in runs]
        rows = {}
        for pid, scores in local.participants.items():
            row: dict[str, Any] = {"model": scores.model, "learner": scores.learner}
            for name, run in [("local", local), *((m, runs[(task, seed, m)]) for m in others)]:
                if pid in run.participants:
                    theirs = run.participants[pid]
                    row[name] = {"nll": _mean(theirs.nll), "rouge_l": _mean(theirs.rouge_l)}
            rows[pid] = row
        out.append({"task": task, "seed": seed, "methods": ["local", *others], "participants": rows})
    return out


def refusal_summary(results: Sequence[RunResult]) -> dict[str, Any] | None:
    refusal = next((r for r in results if r.method == "fedavg_refusal"), None)
    if refusal is None:
        return None
    return {
        "task": refusal.task,
        "seed": refusal.seed,
        "fedavg": refusal.extra.get("fedavg"),
        "error": refusal.error,
    }


def _mean(values: list[float]) -> float | None:
    return fmean(values) if values else None
