"""Quality and communication against baselines: one task, one budget, four methods (plus heterogeneous).

    python -m bench.quality bench/quality.toml --heterogeneous examples/heterogeneous.toml

The config is a chorus-run config (`federation/config.py`): its [task] generates the
stdlib-docstring task, its [train]/[generation] tables and `rounds` are the budget. Methods:

- local-only: each participant warms up on its private data, then trains each round on the same
  private slice a federated participant mixes in (`private_examples_per_round`), with no labels;
- semantic: `chorus-run` as is (strategy "semantic") on the embedded memory broker;
- fedavg: `chorus-run` with strategy "fedavg": LoRA adapters up, their average down, through the
  same broker and coordinator; bytes are the coordinator's `RoundClosed.bytes_received/bytes_sent`;
- centralized: one model (the first participant's) trained on the pooled private data: the same
  warm-up epochs over all of it, then each round the union of every participant's private slice.

Every method is scored after every round on the task's global test set (`data/test.jsonl`, the
default `test_data` of every chorus-run participant) with the run's generation parameters and
embedder; the harness checks that the test file is byte-identical across methods. A heterogeneous
config (different architectures) runs with strategy "semantic", and for one round with "fedavg" to
record the coordinator's refusal of mismatched adapters.

Writes `<out>/quality.json`, `quality.md`, `quality.png`; each method's run directory is under
`--work`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from bench.common import machine, machine_line, table
from coordinator.settings import ConsensusSettingsTable
from coordinator.store import CoordinatorStore
from coordinator.wiring import build_embedder
from federation.config import LoadedConfig, ParticipantEntry, load_run_config
from federation.data import DataPaths, prepare_data
from federation.launch import quiet_library_progress_bars, run_to_end
from federation.runner import FederationRun, RunOptions
from federation.settings import participant_settings
from participant.data import Example
from participant.learner import Learner
from participant.settings import TrainTable
from participant.wiring import build_learner, load_data

METHODS = ("local", "semantic", "fedavg", "centralized")
LABELS = {
    "local": "local-only",
    "semantic": "semantic consensus",
    "fedavg": "FedAvg (LoRA)",
    "centralized": "centralized (pooled)",
    "heterogeneous": "semantic consensus, heterogeneous",
}
WORK = Path("results") / "quality"
NAME = "quality"
WARMUP_DIR = "warmup"  # under the local-only run: one adapter per participant, and a manifest
WARMUP_MANIFEST = "manifest.json"
RESULTS = Path(__file__).parent / "results"


@dataclass
class MethodResult:
    method: str
    config: str
    models: dict[str, str]  # participant -> model spec
    rounds: int
    rouge_l: dict[str, list[float | None]]  # participant -> score after each round (index 0 = round 1)
    embedding_similarity: dict[str, list[float | None]]
    bytes_up: int = 0  # measured on the wire, every participant and round
    bytes_down: int = 0
    participant_rounds: int = 0  # (participant, round) pairs the bytes are spread over
    wall_seconds: float = 0.0
    test_sha256: str = ""
    test_examples: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    warmup_rouge_l: dict[str, float] = field(default_factory=dict)  # local-only: after warm-up, round 0
    warmup_embedding_similarity: dict[str, float] = field(default_factory=dict)

    def final(self, metric: str, only: Sequence[str] | None = None) -> float | None:
        series = self.rouge_l if metric == "rouge_l" else self.embedding_similarity
        last = [values[-1] for pid, values in series.items() if values and (only is None or pid in only)]
        present = [v for v in last if v is not None]
        return sum(present) / len(present) if present else None

    def mean_per_round(self, metric: str) -> list[float | None]:
        series = self.rouge_l if metric == "rouge_l" else self.embedding_similarity
        out: list[float | None] = []
        for index in range(self.rounds):
            values = [v[index] for v in series.values() if len(v) > index and v[index] is not None]
            out.append(sum(v for v in values if v is not None) / len(values) if values else None)
        return out

    @property
    def bytes_total(self) -> int:
        return self.bytes_up + self.bytes_down

    @property
    def bytes_per_participant_round(self) -> float:
        return self.bytes_total / self.participant_rounds if self.participant_rounds else 0.0

    def summary(self) -> dict[str, Any]:
        smol = [pid for pid, model in self.models.items() if model.startswith("smollm2")]
        return {
            **dataclasses.asdict(self),
            "label": LABELS.get(self.method, self.method),
            "final_rouge_l": _round(self.final("rouge_l")),
            "final_embedding_similarity": _round(self.final("embedding_similarity")),
            "final_rouge_l_smollm2_only": _round(self.final("rouge_l", smol)) if smol else None,
            "mean_rouge_l_per_round": [_round(v) for v in self.mean_per_round("rouge_l")],
            "mean_embedding_similarity_per_round": [
                _round(v) for v in self.mean_per_round("embedding_similarity")
            ],
            "bytes_total": self.bytes_total,
            "bytes_per_participant_per_round": round(self.bytes_per_participant_round, 1),
        }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the federated methods: chorus-run itself ----------------------------------------------------


def with_coordinator(loaded: LoadedConfig, strategy: str, **round_overrides: object) -> LoadedConfig:
    """The same config with the coordinator's strategy (and round settings) replaced."""
    raw = dict(loaded.coordinator_raw)
    raw["strategy"] = strategy
    if round_overrides:
        raw["round"] = {**dict(raw.get("round") or {}), **round_overrides}  # type: ignore[call-overload]
    return dataclasses.replace(loaded, coordinator_raw=raw)


def run_federated(
    method: str,
    loaded: LoadedConfig,
    work: Path,
    rounds: int | None = None,
    warm_start: dict[str, Path] | None = None,
) -> tuple[MethodResult, FederationRun]:
    """One chorus-run federation, as `chorus-run` runs it (log lines to `<work>/run.log`)."""
    ids = [p.id for p in loaded.run.participants]
    started = time.perf_counter()
    options = RunOptions(results=work, rounds=rounds, warm_start=warm_start or {})
    finished = run_to_end(loaded, options, extra={"method": method}, handle_signals=False)
    wall = time.perf_counter() - started
    records = finished.reporter.records
    rouge: dict[str, list[float | None]] = {pid: [] for pid in ids}
    similarity: dict[str, list[float | None]] = {pid: [] for pid in ids}
    up = down = 0
    for record in records:
        for row in record.participants:
            rouge[row.participant_id].append(row.rouge_l)
            similarity[row.participant_id].append(row.embedding_similarity)
            up += row.bytes_up
            down += row.bytes_down
    test = work / "data" / "test.jsonl"
    result = MethodResult(
        method=method,
        config=str(loaded.path),
        models={p.id: p.model for p in loaded.run.participants},
        rounds=len(records),
        rouge_l=rouge,
        embedding_similarity=similarity,
        bytes_up=up,
        bytes_down=down,
        participant_rounds=len(records) * len(ids),
        wall_seconds=round(wall, 2),
        test_sha256=_sha256(test) if test.is_file() else "",
        test_examples=_count_lines(test),
        error=finished.error,
    )
    return result, finished.run


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


# ---- local-only and centralized: plain loops over the same learners -------------------------------


def private_slice(private: Sequence[Example], train: TrainTable, round_id: int) -> list[Example]:
    """The private examples a participant mixes into round `round_id` (as `Participant._training_mix`)."""
    chosen = list(private)
    random.Random(f"{train.seed}:{round_id}").shuffle(chosen)
    return chosen[: train.private_examples_per_round]


def _train_and_score(
    learner: Learner,
    warmup: list[Example],
    per_round: Callable[[int], list[Example]],
    rounds: int,
    test: Sequence[Example],
    loaded: LoadedConfig,
    embed: Callable[[Sequence[str]], Any],
    score_warmup: bool,
    save_warmup: Path | None = None,
) -> tuple[list[float | None], list[float | None], dict[str, float] | None]:
    generation = loaded.run.generation
    if warmup:
        learner.train(warmup)
    if save_warmup is not None:
        learner.save_checkpoint(save_warmup)
    after_warmup = learner.evaluate(test, embed, generation) if score_warmup else None
    rouge: list[float | None] = []
    similarity: list[float | None] = []
    for round_id in range(1, rounds + 1):
        examples = per_round(round_id)
        if examples:
            learner.train(examples)
        metrics = learner.evaluate(test, embed, generation)
        rouge.append(metrics["rouge_l"])
        similarity.append(metrics["embedding_similarity"])
    return rouge, similarity, after_warmup


def run_local(loaded: LoadedConfig, work: Path, rounds: int, score_warmup: bool = True) -> MethodResult:
    """Each participant alone: warm-up on its private data, then its private slice each round."""
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = prepare_data(loaded, work)
    embedder = build_embedder(ConsensusSettingsTable(embedder=loaded.run.embedder))
    result = _empty_result("local", loaded, rounds)
    manifest: dict[str, Any] = {}
    for entry in loaded.run.participants:
        settings = participant_settings(loaded, entry, data, work)
        train, test = load_data(settings)
        learner = build_learner(settings)
        table_ = settings.train
        rouge, similarity, warm = _train_and_score(
            learner,
            train * table_.warmup_epochs,
            lambda r, train=train, table_=table_: private_slice(train, table_, r),  # type: ignore[misc]
            rounds,
            test,
            loaded,
            embedder.embed,
            score_warmup,
            save_warmup=work / WARMUP_DIR / entry.id,
        )
        manifest[entry.id] = warmup_identity(loaded, entry)
        result.rouge_l[entry.id], result.embedding_similarity[entry.id] = rouge, similarity
        if warm is not None:
            result.warmup_rouge_l[entry.id] = round(warm["rouge_l"], 4)
            result.warmup_embedding_similarity[entry.id] = round(warm["embedding_similarity"], 4)
        del learner
        gc.collect()
    (work / WARMUP_DIR / WARMUP_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _finish_plain(result, data, started)
    return result


def warmup_identity(loaded: LoadedConfig, entry: ParticipantEntry) -> dict[str, Any]:
    """What determines a participant's warm-up: its model, the task that generates its data, its budget."""
    identity: dict[str, Any] = msgspec.to_builtins(
        {"model": entry.model, "task": loaded.run.task, "train": entry.train or loaded.run.train}
    )
    return identity


def shared_warmups(loaded: LoadedConfig, local_work: Path) -> dict[str, Path]:
    """The local-only run's warm-up adapters that `loaded`'s participants would have trained identically.

    Starting every federated method from these makes "every method starts from the same warm-up"
    literally true, and saves each method the warm-up's training time.
    """
    manifest_path = local_work / WARMUP_DIR / WARMUP_MANIFEST
    if not manifest_path.is_file():
        return {}
    manifest = json.loads(manifest_path.read_text())
    return {
        entry.id: local_work / WARMUP_DIR / entry.id
        for entry in loaded.run.participants
        if manifest.get(entry.id) == warmup_identity(loaded, entry)
    }


def run_centralized(loaded: LoadedConfig, work: Path, rounds: int) -> MethodResult:
    """One model on the pooled private data: same warm-up epochs, each round every participant's slice."""
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = prepare_data(loaded, work)
    embedder = build_embedder(ConsensusSettingsTable(embedder=loaded.run.embedder))
    entries = loaded.run.participants
    pooled: dict[str, tuple[list[Example], TrainTable]] = {}
    test: list[Example] = []
    for entry in entries:
        settings = participant_settings(loaded, entry, data, work)
        train, test = load_data(settings)
        pooled[entry.id] = (train, settings.train)
    first = participant_settings(loaded, entries[0], data, work)
    learner = build_learner(first)
    warmup = [e for train, t in pooled.values() for e in train * t.warmup_epochs]

    def per_round(round_id: int) -> list[Example]:
        return [e for train, t in pooled.values() for e in private_slice(train, t, round_id)]

    rouge, similarity, _ = _train_and_score(
        learner, warmup, per_round, rounds, test, loaded, embedder.embed, False
    )
    result = _empty_result("centralized", loaded, rounds)
    result.models = {"central": entries[0].model}
    result.rouge_l = {"central": rouge}
    result.embedding_similarity = {"central": similarity}
    result.notes.append(
        f"one {entries[0].model} model; warm-up on all {sum(len(t) for t, _ in pooled.values())} pooled "
        f"private examples, then each round the union of the {len(entries)} participants' private slices"
    )
    del learner
    gc.collect()
    _finish_plain(result, data, started)
    return result


def _empty_result(method: str, loaded: LoadedConfig, rounds: int) -> MethodResult:
    return MethodResult(
        method=method,
        config=str(loaded.path),
        models={p.id: p.model for p in loaded.run.participants},
        rounds=rounds,
        rouge_l={},
        embedding_similarity={},
    )


def _finish_plain(result: MethodResult, data: DataPaths, started: float) -> None:
    test = next(iter(data.test.values()))
    assert test is not None
    result.test_sha256 = _sha256(test)
    result.test_examples = _count_lines(test)
    result.wall_seconds = round(time.perf_counter() - started, 2)


# ---- FedAvg on a heterogeneous federation: the refusal, recorded --------------------------------


def fedavg_refusal(loaded: LoadedConfig, work: Path, deadline: float) -> dict[str, Any]:
    """One FedAvg round of a heterogeneous config: what the coordinator did with mismatched adapters."""
    from coordinator.strategies.fedavg import AggregationError, average_wire
    from participant.adapters import tensors_to_wire

    config = with_coordinator(loaded, "fedavg", deadline_seconds=deadline)
    result, run = run_federated("fedavg-heterogeneous", config, work, rounds=1)
    coordinator = run.coordinator
    evidence: dict[str, Any] = {
        "config": str(loaded.path),
        "run_error": result.error,
        "deadline_seconds": deadline,
        "wall_seconds": result.wall_seconds,
    }
    if coordinator is not None:
        evidence["dead_lettered"] = coordinator.counters.dead_lettered
        evidence["rejections"] = dict(coordinator.counters.rejections)
        store = CoordinatorStore(coordinator.settings.state_path)  # the run closed its handle
        try:
            evidence["stored_adapters"] = [pid for pid, _ in store.adapters(1)]
            kinds = [str(row[0]) for row in store._db.execute("SELECT kind FROM publications").fetchall()]
        finally:
            store.close()
        if coordinator.closed_rounds:
            closed = coordinator.closed_rounds[0]
            evidence["round_1"] = {
                "shard_status": [s.status for s in closed.shards],
                "answered": list(closed.answered),
                "missing": list(closed.missing),
            }
        evidence["publications"] = sorted(set(kinds))
        evidence["aggregated_adapter_published"] = "aggregated_adapter" in kinds
    # The averaging function itself, on the participants' real adapters.
    states = {}
    for participant in run.participants:
        state_of = getattr(participant.learner, "adapter_state", None)
        if state_of is not None:
            states[participant.pid] = state_of()
    evidence["adapters"] = {
        pid: {
            "model": result.models[pid],
            "tensors": len(state),
            "parameters": sum(t.numel() for t in state.values()),
        }
        for pid, state in states.items()
    }
    try:
        average_wire([(tensors_to_wire(state), 1) for state in states.values()])
        evidence["average_wire"] = "averaged (unexpected: the adapters matched)"
    except AggregationError as e:
        evidence["average_wire"] = f"AggregationError: {e}"
    return evidence


# ---- the communication cross-check -----------------------------------------------------------------


def comm_cross_check(loaded: LoadedConfig) -> dict[str, Any]:
    """bench/comm_calc.py's analytical bytes for this budget (SmolLM2-135M, fp32 LoRA, q/v)."""
    from bench import comm_calc

    raw_round = dict(loaded.coordinator_raw.get("round") or {})  # type: ignore[call-overload]
    train = loaded.run.train
    targets = train.target_modules
    if targets is None:
        targets = ["q_proj", "v_proj"]
    traffic = comm_calc.TextTraffic(
        prompts=int(raw_round.get("prompts_per_round", 32)),
        answer_tokens=loaded.run.generation.max_new_tokens,
        shards=int(raw_round.get("shards", 4)),
    )
    scenario = comm_calc.Scenario(traffic=traffic, lora_rank=train.rank, lora_targets="qv", lora_dtype="fp32")
    if targets == "all-linear":
        scenario = dataclasses.replace(scenario, lora_targets="all")
    row = comm_calc.compare(comm_calc.MODELS["SmolLM2-135M"], scenario)
    if isinstance(targets, list) and sorted(targets) != ["q_proj", "v_proj"]:
        params = comm_calc.lora_param_count(comm_calc.MODELS["SmolLM2-135M"], train.rank, targets)
        row = dataclasses.replace(row, lora_params=params, lora_bytes=2 * params * 4)
    return {
        "model": row.model,
        "lora_params": row.lora_params,
        "consensus_bytes": row.consensus_bytes,
        "lora_bytes": row.lora_bytes,
        "lora_ratio": round(row.lora_ratio, 1),
        "assumptions": comm_calc.assumptions(scenario),
    }


# ---- report ---------------------------------------------------------------------------------------


def criteria(results: dict[str, MethodResult], cross: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    semantic, local, fedavg = results.get("semantic"), results.get("local"), results.get("fedavg")
    s = semantic.final("rouge_l") if semantic else None
    if semantic and local and s is not None and (lo := local.final("rouge_l")) is not None:
        out["semantic_above_local_only"] = {
            "met": s > lo,
            "semantic_rouge_l": round(s, 4),
            "local_only_rouge_l": round(lo, 4),
            "difference_points": round(100 * (s - lo), 2),
        }
    if semantic and fedavg and s is not None and (fa := fedavg.final("rouge_l")) is not None:
        out["semantic_within_1_point_of_fedavg"] = {
            "met": abs(s - fa) <= 0.01 or s > fa,
            "semantic_rouge_l": round(s, 4),
            "fedavg_rouge_l": round(fa, 4),
            "difference_points": round(100 * (s - fa), 2),
        }
    if semantic and fedavg and semantic.bytes_per_participant_round:
        ratio = fedavg.bytes_per_participant_round / semantic.bytes_per_participant_round
        out["fedavg_to_consensus_bytes_ratio_at_least_300"] = {
            "met": ratio >= 300,
            "measured_ratio": round(ratio, 1),
            "fedavg_bytes_per_participant_per_round": round(fedavg.bytes_per_participant_round, 1),
            "semantic_bytes_per_participant_per_round": round(semantic.bytes_per_participant_round, 1),
            "comm_calc_ratio": None if cross is None else cross["lora_ratio"],
        }
    return out


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _kib(value: float) -> str:
    if value == 0:
        return "0"
    return f"{value / 1024:,.1f} KiB" if value < 1024 * 1024 else f"{value / 1024 / 1024:,.2f} MiB"


def markdown(report: dict[str, Any], results: dict[str, MethodResult]) -> str:
    lines = [
        "# Quality and communication: semantic consensus against baselines",
        "",
        f"Config: `{report['config']}`; heterogeneous: `{report.get('heterogeneous_config') or '-'}`.",
        f"Budget: {report['budget']}.",
        "",
        "Scores: mean over participants of the test ROUGE-L F1 (0-1; 0.01 = 1 point) and embedding "
        "similarity after the last round, on the same global test set "
        f"(`test.jsonl`, {report['test_examples']} prompts, sha256 `{report['test_sha256'][:12]}`, "
        f"identical for every method: {report['same_test_set']}). Bytes: measured on the wire by the "
        "coordinator (`RoundClosed.bytes_received` + `bytes_sent`), per participant per round.",
        "",
    ]
    rows = []
    for method, result in results.items():
        s = result.summary()
        rows.append(
            [
                LABELS.get(method, method),
                ", ".join(sorted(set(result.models.values()))),
                _fmt(s["final_rouge_l"]),
                _fmt(s["final_embedding_similarity"]),
                " → ".join(_fmt(v) for v in s["mean_rouge_l_per_round"]),
                _kib(result.bytes_per_participant_round),
                _kib(result.bytes_total),
                f"{result.wall_seconds:.0f}",
                result.error or "",
            ]
        )
    header = ["method", "models", "ROUGE-L", "emb sim", "ROUGE-L by round", "bytes/participant/round"]
    lines += table([*header, "total bytes", "wall s", "error"], rows)
    local = results.get("local")
    if local is not None and local.warmup_rouge_l:
        warm = sum(local.warmup_rouge_l.values()) / len(local.warmup_rouge_l)
        warm_sim = sum(local.warmup_embedding_similarity.values()) / len(local.warmup_embedding_similarity)
        lines += ["", f"After the warm-up alone (round 0, local-only): ROUGE-L {warm:.3f}, emb sim "
                  f"{warm_sim:.3f}. Local-only, semantic and FedAvg start from these very adapters "
                  "(the federated runs load the local-only run's warm-up checkpoints); centralized warms "
                  "up on the pooled data."]  # fmt: skip
    noted = [f"- {LABELS.get(m, m)}: {note}" for m, r in results.items() for note in r.notes]
    if noted:
        lines += ["", "Notes:", "", *noted]
    lines += ["", "Per participant, after the last round (ROUGE-L / emb sim):", ""]
    per = []
    for method, result in results.items():
        cells = [
            f"{pid} ({result.models.get(pid, '?')}): {_fmt(v[-1] if v else None)} / "
            f"{_fmt(result.embedding_similarity[pid][-1] if result.embedding_similarity[pid] else None)}"
            for pid, v in result.rouge_l.items()
        ]
        per.append([LABELS.get(method, method), "; ".join(cells)])
    lines += table(["method", "participants"], per)
    if "heterogeneous" in results:
        smol = results["heterogeneous"].summary()["final_rouge_l_smollm2_only"]
        lines += ["", f"Heterogeneous, SmolLM2 participants only: ROUGE-L {_fmt(smol)}."]
    lines += ["", "## Criteria", ""]
    for name, item in report["criteria"].items():
        detail = ", ".join(f"{k} {v}" for k, v in item.items() if k != "met")
        lines.append(f"- **{name}**: {'met' if item['met'] else 'NOT met'} ({detail})")
    cross = report.get("comm_calc")
    if cross:
        lines += [
            "",
            f"comm_calc cross-check ({cross['model']}, {cross['lora_params']:,} LoRA parameters, fp32): "
            f"LoRA up+down {cross['lora_bytes']:,} B vs consensus {cross['consensus_bytes']:,} B per "
            f"participant per round = {cross['lora_ratio']}x (assumes every answer is "
            "max_new_tokens x 4 chars and no abstentions; the measured run also counts the RoundOpened "
            "prompt broadcast and RoundClosed).",
        ]
    refusal = report.get("fedavg_heterogeneous")
    if refusal:
        lines += [
            "",
            "## FedAvg on the heterogeneous federation",
            "",
            f"One FedAvg round of `{refusal['config']}` (deadline {refusal['deadline_seconds']} s): "
            f"the coordinator stored the adapters of {refusal.get('stored_adapters')}, dead-lettered "
            f"{refusal.get('dead_lettered')} message(s) ({refusal.get('rejections')}), round 1: "
            f"{refusal.get('round_1')}; an AggregatedAdapter was published: "
            f"{refusal.get('aggregated_adapter_published')}.",
            f"Averaging the participants' adapters directly (`coordinator.strategies.fedavg.average_wire`): "
            f"{refusal.get('average_wire')}",
            f"Adapters: {refusal.get('adapters')}.",
        ]
    lines += ["", machine_line(report["machine"]), f"Total wall time: {report['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def plot(results: dict[str, MethodResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), constrained_layout=True)
    names = [LABELS.get(m, m) for m in results]
    for method, result in results.items():
        series = result.mean_per_round("rouge_l")
        xs = list(range(1, len(series) + 1))
        axes[0].plot(xs, [float("nan") if v is None else v for v in series], marker="o", label=LABELS[method])
    axes[0].set(title="mean test ROUGE-L per round", xlabel="round", ylabel="ROUGE-L")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    positions = list(range(len(results)))
    rouge = [results[m].final("rouge_l") or 0.0 for m in results]
    similarity = [results[m].final("embedding_similarity") or 0.0 for m in results]
    axes[1].bar([p - 0.2 for p in positions], rouge, 0.4, label="ROUGE-L")
    axes[1].bar([p + 0.2 for p in positions], similarity, 0.4, label="embedding similarity")
    axes[1].set_xticks(positions, names, rotation=20, ha="right", fontsize="small")
    axes[1].set(title="after the last round (global test set)")
    axes[1].legend(fontsize="small")
    axes[1].grid(axis="y", alpha=0.3)
    per_round = [results[m].bytes_per_participant_round for m in results]
    bars = axes[2].bar(positions, [max(v, 1.0) for v in per_round], 0.6, color="tab:gray")
    axes[2].set_yscale("log")
    axes[2].set_xticks(positions, names, rotation=20, ha="right", fontsize="small")
    axes[2].set(title="bytes per participant per round (on the wire; log)", ylabel="bytes")
    for bar, value in zip(bars, per_round, strict=True):
        axes[2].annotate(_kib(value), (bar.get_x() + bar.get_width() / 2, max(value, 1.0)), ha="center",
                         va="bottom", fontsize="small")  # fmt: skip
    axes[2].grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main -----------------------------------------------------------------------------------------


def budget_line(loaded: LoadedConfig) -> str:
    run = loaded.run
    task = run.task
    train = run.train
    round_table = dict(loaded.coordinator_raw.get("round") or {})  # type: ignore[call-overload]
    parts = [
        f"{len(run.participants)} participants x {run.rounds} rounds x "
        f"{round_table.get('prompts_per_round')} public prompts",
    ]
    if task is not None:
        parts.append(f"{task.max_train} private examples each, {task.max_test} global test prompts")
    parts.append(f"max_new_tokens {run.generation.max_new_tokens}")
    targets = train.target_modules or "q/v (per architecture)"
    parts.append(
        f"LoRA r={train.rank} alpha={train.alpha} on {targets}, epochs per training call {train.epochs}, "
        f"warm-up epochs {train.warmup_epochs}, "
        f"{train.private_examples_per_round} private examples per round, "
        f"lr {train.learning_rate}, batch {train.batch_size}"
    )
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("config", type=Path, help="chorus-run config giving the task and budget")
    parser.add_argument("--heterogeneous", type=Path, help="a chorus-run config with mixed architectures")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated from {METHODS}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where quality.json/.md/.png go")
    parser.add_argument("--work", type=Path, default=WORK, help="each method's run directory")
    parser.add_argument(
        "--refusal-deadline", type=float, default=60.0, help="deadline of the heterogeneous FedAvg round (s)"
    )
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    quiet_library_progress_bars()
    started = time.perf_counter()
    host = machine()
    loaded = load_run_config(args.config)
    rounds = loaded.run.rounds
    if loaded.run.torch_threads:  # chorus-run sets it for its runs; the plain loops need it too
        import torch

        torch.set_num_threads(loaded.run.torch_threads)
    results: dict[str, MethodResult] = {}
    for method in methods:
        print(f"== {LABELS[method]} ==", flush=True)
        work = args.work / method
        if method == "local":
            results[method] = run_local(loaded, work, rounds)
        elif method == "centralized":
            results[method] = run_centralized(loaded, work, rounds)
        else:
            results[method] = _federated_from_shared_warmup(method, loaded, args.work, "local" in results)
        print(f"   {json.dumps(_brief(results[method]))}", flush=True)
    refusal: dict[str, Any] | None = None
    if args.heterogeneous is not None:
        het = load_run_config(args.heterogeneous)
        print(f"== {LABELS['heterogeneous']} ==", flush=True)
        results["heterogeneous"] = _federated_from_shared_warmup(
            "heterogeneous", het, args.work, "local" in results, strategy="semantic"
        )
        print(f"   {json.dumps(_brief(results['heterogeneous']))}", flush=True)
        print("== FedAvg on the heterogeneous federation (1 round) ==", flush=True)
        refusal = fedavg_refusal(het, args.work / "fedavg-heterogeneous", args.refusal_deadline)
        print(f"   {json.dumps(refusal, default=str)}", flush=True)
    hashes = {m: r.test_sha256 for m, r in results.items()}
    cross = comm_cross_check(loaded) if "fedavg" in results or "semantic" in results else None
    report: dict[str, Any] = {
        "config": str(args.config),
        "heterogeneous_config": None if args.heterogeneous is None else str(args.heterogeneous),
        "budget": budget_line(loaded),
        "machine": host,
        "test_sha256": next(iter(hashes.values()), ""),
        "test_examples": next(iter(results.values())).test_examples if results else 0,
        "same_test_set": len(set(hashes.values())) == 1,
        "methods": {m: r.summary() for m, r in results.items()},
        "comm_calc": cross,
        "fedavg_heterogeneous": refusal,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    report["criteria"] = criteria(results, cross)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{NAME}.md").write_text(markdown(report, results))
    plot(results, args.out / f"{NAME}.png")
    print((args.out / f"{NAME}.md").read_text(), flush=True)
    failed = [m for m, r in results.items() if r.error]
    return 1 if failed or not report["same_test_set"] else 0


def _federated_from_shared_warmup(
    method: str, loaded: LoadedConfig, work_root: Path, local_ran: bool, strategy: str | None = None
) -> MethodResult:
    """A chorus-run federation whose participants start from this invocation's local-only warm-ups."""
    warm = shared_warmups(loaded, work_root / "local") if local_ran else {}
    result, _ = run_federated(
        method, with_coordinator(loaded, strategy or method), work_root / method, warm_start=warm
    )
    others = [p.id for p in loaded.run.participants if p.id not in warm]
    result.notes.append(
        f"started from the local-only run's warm-up adapters: {sorted(warm) or 'none'}"
        + (f"; warmed up in the run: {others}" if others else "")
    )
    return result


def _brief(result: MethodResult) -> dict[str, Any]:
    return {
        "rouge_l": _round(result.final("rouge_l")),
        "embedding_similarity": _round(result.final("embedding_similarity")),
        "bytes_per_participant_per_round": round(result.bytes_per_participant_round),
        "wall_seconds": result.wall_seconds,
        "error": result.error,
    }


if __name__ == "__main__":
    sys.exit(main())
