"""bench/quality/: the grid, the bootstrap, resume, and the whole grid end to end on tiny models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import msgspec
import numpy as np
import pytest

from bench.quality import cli
from bench.quality.execute import GridRunner
from bench.quality.grid import (
    CEILINGS,
    GridError,
    RunKey,
    fingerprint,
    load_grid,
    method_config,
    non_default,
    seeded,
)
from bench.quality.methods import oracle_choice
from bench.quality.report import own_data_summary
from bench.quality.results import ResultStore, RunResult
from bench.quality.stats import paired_differences, seed_bootstrap

TASK = """
rounds = 2
embedder = "hashing"

[task]
families = ["text", "data"]
seed = 5
max_public = 8
max_train = 8
max_test = 6

[generation]
max_new_tokens = 6

[train]
rank = 4
batch_size = 4
max_length = 64
warmup_epochs = 1
private_examples_per_round = 4

[coordinator.round]
prompts_per_round = 4
shards = 2
quorum = 1.0
deadline_seconds = 60.0
grace_seconds = 0.0

[coordinator.consensus]
min_confidence = -1.0
"""

GRID = """
seeds = [0, 1]
methods = ["local", "fedavg", "centralized", "medoid", "shipped", "reference_labels", "oracle_labels"]
generation_prompts = 4
round_nll_prompts = 3
bootstrap_resamples = 500

[tasks]
a = "a.toml"
b = "b.toml"

[shipped]
consensus = { vote_weighting = "reputation" }

[junk_member]
task = "a"
seed = 0
participant = "p1"
model = "tiny-gpt2"
fedavg_deadline_seconds = 4.0

[quick]
tasks = ["a"]
seeds = [0]
rounds = 1
max_test = 5
generation_prompts = 3
"""

pytestmark = pytest.mark.usefixtures("restore_logging")


def write_grid(tmp_path: Path, grid: str = GRID) -> Path:
    for name in ("a", "b"):
        participants = "".join(f'\n[[participants]]\nid = "p{i}"\nmodel = "tiny-llama"\n' for i in range(2))
        (tmp_path / f"{name}.toml").write_text(f'federation = "{name}"\n{TASK}{participants}')
    path = tmp_path / "grid.toml"
    path.write_text(grid)
    return path


# ---- the grid -------------------------------------------------------------------------------------


def test_grid_expands_tasks_seeds_and_methods_warmup_first(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path))
    names = [key.name for key in grid.runs()]
    per_seed = [
        "warmup",
        "local",
        "fedavg",
        "centralized",
        "medoid",
        "shipped",
        "reference_labels",
        "oracle_labels",
    ]
    expected = [f"{t}__seed{s}__{m}" for s in (0, 1) for t in ("a", "b") for m in per_seed]  # seeds outer
    assert names == [*expected, "a__seed0__junk_member"]

    narrowed = load_grid(write_grid(tmp_path), tasks=["b"], seeds=[1], methods=["medoid"])
    assert [k.name for k in narrowed.runs()] == ["b__seed1__warmup", "b__seed1__medoid"]  # junk is a's


def test_seed_shifts_the_data_seed_and_sets_the_training_seed(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path))
    config = seeded(grid.tasks["a"], 2)
    assert config.run.task is not None and config.run.task.seed == 5 + 2
    assert config.run.train.seed == 2
    assert config.run.federation == "a-s2"


def test_method_configs_set_the_strategy_and_layer_the_shipped_recipe(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path))
    base = seeded(grid.tasks["a"], 0)
    assert method_config(base, "fedavg", grid.shipped).coordinator_raw["strategy"] == "fedavg"
    medoid = method_config(base, "medoid", grid.shipped)
    assert medoid.coordinator_raw["strategy"] == "semantic"
    # "medoid" stays the recipe that was the default before, whatever the defaults are now.
    assert medoid.coordinator_raw["consensus"] == {
        "min_confidence": -1.0,
        "vote_weighting": "uniform",
        "label_choice": "medoid",
    }
    assert medoid.run.train.label_weighting == "confidence"
    recipe = method_config(base, "shipped", grid.shipped)
    assert recipe.coordinator_raw["strategy"] == "semantic"
    consensus = recipe.coordinator_raw["consensus"]
    assert consensus == {"min_confidence": -1.0, "vote_weighting": "reputation"}
    # Only the shipped recipe's identity depends on the recipe: editing it reruns that method alone.
    other = msgspec.structs.replace(grid.shipped, consensus={"vote_weighting": "uniform"})
    for method, changes in (("medoid", False), ("shipped", True)):
        before = fingerprint(method_config(base, method, grid.shipped), {})
        after = fingerprint(method_config(base, method, other), {})
        assert (before != after) is changes, method


def test_a_recipe_the_installed_settings_reject_is_reported_and_not_run(tmp_path: Path) -> None:
    text = GRID.replace('consensus = { vote_weighting = "reputation" }', 'train = { no_such_setting = "x" }')
    grid = load_grid(write_grid(tmp_path, text))
    assert grid.shipped_problem is not None and "no_such_setting" in grid.shipped_problem


def test_quick_shrinks_sizes_and_keeps_every_method(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path), quick=True, junk_member=False)
    assert [k.name for k in grid.runs()] == [
        f"a__seed0__{m}" for m in ("warmup", "local", "fedavg", "centralized", "medoid", "shipped", *CEILINGS)
    ]
    run = grid.tasks["a"].run
    assert run.rounds == 1 and run.task is not None and run.task.max_test == 5
    assert grid.generation_prompts == 3


def test_the_precondition_sets_each_members_own_model_against_the_others_on_its_data() -> None:
    # model -> data owner -> ROUGE-L, two seeds.
    seeds = [
        {"a": {"a": 0.5, "b": 0.2}, "b": {"a": 0.1, "b": 0.4}, "c": {"a": 0.3, "b": 0.2}},
        {"a": {"a": 0.7, "b": 0.2}, "b": {"a": 0.3, "b": 0.6}, "c": {"a": 0.1, "b": 0.2}},
    ]
    summary = own_data_summary(seeds)
    assert summary["a"] == pytest.approx({"own": 0.6, "others": 0.2})
    assert summary["b"] == pytest.approx({"own": 0.5, "others": 0.2})
    assert "c" not in summary  # no data of its own


def test_the_oracle_label_is_the_answer_closest_to_the_reference() -> None:
    reference = "returns the length of the string"
    answers = ["prints the string", "returns the length of a list", "returns the string length"]
    assert oracle_choice(answers, reference) == "returns the length of a list"  # ROUGE-L 0.67 > 0.6 > 0.44
    assert oracle_choice(["same", "same words"], "other") == "same"  # equals: the first


# ---- the bootstrap --------------------------------------------------------------------------------


def test_identical_methods_give_an_interval_of_exactly_zero() -> None:
    rng = np.random.default_rng(0)
    scores = [rng.normal(size=50) for _ in range(3)]
    interval = seed_bootstrap(paired_differences(scores, scores), resamples=2000)
    assert (interval.mean, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert not interval.excludes_zero


def test_a_constant_shift_gives_exactly_that_shift() -> None:
    rng = np.random.default_rng(1)
    baseline = [rng.normal(size=40) for _ in range(3)]
    shifted = [values + 0.25 for values in baseline]
    interval = seed_bootstrap(paired_differences(shifted, baseline), resamples=2000)
    assert interval.mean == pytest.approx(0.25)
    assert interval.low == pytest.approx(0.25) and interval.high == pytest.approx(0.25)
    assert interval.excludes_zero


def test_seeds_are_resampled_not_only_prompts() -> None:
    # Two seeds whose prompts all agree within the seed: 0 in one, 1 in the other. Resampling prompts
    # alone would give exactly 0.5; drawing both seeds from one seed (probability 1/2) gives 0 or 1,
    # each with probability 1/4, so the 2.5% and 97.5% percentiles are 0 and 1.
    interval = seed_bootstrap([np.zeros(30), np.ones(30)], resamples=4000)
    assert interval.mean == 0.5
    assert (interval.low, interval.high) == (0.0, 1.0)


def test_noisy_differences_give_an_interval_around_the_mean_and_repeat_exactly() -> None:
    rng = np.random.default_rng(2)
    per_seed = [rng.normal(loc=0.1, scale=1.0, size=200) for _ in range(3)]
    first = seed_bootstrap(per_seed, resamples=3000)
    assert first.low < first.mean < first.high
    assert (
        first.high - first.low < 0.6
    )  # 600 prompts of unit noise: about +-0.1 from prompts, more from seeds
    assert seed_bootstrap(per_seed, resamples=3000) == first  # fixed RNG seed


def test_paired_differences_refuse_unpaired_data() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        paired_differences([[1.0, 2.0]], [[1.0]])


# ---- resume ---------------------------------------------------------------------------------------


class RecordingRunner(GridRunner):
    """Runs nothing: records which runs it was asked for and returns an empty result."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.ran: list[str] = []

    def run_one(self, key: RunKey) -> RunResult:
        self.ran.append(key.name)
        return RunResult(task=key.task, seed=key.seed, method=key.method, fingerprint=self.fingerprint(key))


def test_a_finished_run_is_skipped_and_a_changed_or_failed_one_reruns(tmp_path: Path) -> None:
    grid = load_grid(
        write_grid(tmp_path), tasks=["a"], seeds=[0], methods=["local", "medoid"], junk_member=False
    )
    store = ResultStore(tmp_path / "runs")
    runner = RecordingRunner(grid, tmp_path / "work", store, None, say=lambda _: None)
    local = RunKey("a", 0, "local")
    store.save(RunResult(task="a", seed=0, method="local", fingerprint=runner.fingerprint(local)))
    store.save(RunResult(task="a", seed=0, method="medoid", fingerprint="stale-config"))
    results = runner.run_all()
    assert runner.ran == ["a__seed0__warmup", "a__seed0__medoid"]
    assert sorted(r.method for r in results) == ["local", "medoid", "warmup"]

    again = RecordingRunner(grid, tmp_path / "work", store, None, say=lambda _: None)
    again.run_all()
    assert again.ran == []  # everything finished

    failed = RunResult(task="a", seed=0, method="local", fingerprint=runner.fingerprint(local), error="boom")
    store.save(failed)
    again.run_all()
    assert again.ran == ["a__seed0__local"]


def test_old_method_names_still_load_and_their_results_rerun_nothing(tmp_path: Path) -> None:
    old = GRID.replace(
        '"medoid", "shipped", "reference_labels", "oracle_labels"]', '"semantic", "new_recipe"]'
    ).replace("[shipped]", "[new_recipe]")
    grid = load_grid(write_grid(tmp_path, old), tasks=["a"], seeds=[0], junk_member=False)
    assert grid.methods == ["local", "fedavg", "centralized", "medoid", "shipped"]
    assert grid.shipped.consensus == {"vote_weighting": "reputation"}
    with pytest.raises(GridError, match="old name"):
        load_grid(write_grid(tmp_path, old + "[shipped]\n"))

    store = ResultStore(tmp_path / "runs")
    runner = RecordingRunner(grid, tmp_path / "work", store, None, say=lambda _: None)
    # A run's identity is what the code before the rename computed for it, under the old name.
    key = RunKey("a", 0, "medoid")
    sizes = {"generation_prompts": grid.generation_prompts, "round_nll_prompts": grid.round_nll_prompts}
    assert runner.fingerprint(key) == fingerprint(runner.config(key), {"method": "semantic", **sizes})
    for key in grid.runs():  # results written before the rename, under the old names
        method = {"medoid": "semantic", "shipped": "new_recipe"}.get(key.method, key.method)
        legacy = RunResult(task=key.task, seed=key.seed, method=method, fingerprint=runner.fingerprint(key))
        store.path(RunKey(key.task, key.seed, method)).parent.mkdir(parents=True, exist_ok=True)
        store.path(RunKey(key.task, key.seed, method)).write_text(json.dumps(msgspec.to_builtins(legacy)))
    assert runner.run_all() and runner.ran == []
    assert sorted(r.method for r in store.all()) == sorted(k.method for k in grid.runs())
    store.save(RunResult(task="a", seed=0, method="medoid", fingerprint="new"))  # supersedes the old file
    assert not store.path(RunKey("a", 0, "semantic")).exists()
    assert [r.fingerprint for r in store.all() if r.method == "medoid"] == ["new"]


def test_a_half_written_result_does_not_count_as_finished(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    key = RunKey("a", 0, "local")
    store.path(key).write_text('{"task": "a", "seed": 0, "met')
    assert store.finished(key, "x") is None


# ---- end to end on tiny models --------------------------------------------------------------------


def test_the_grid_runs_every_method_scores_them_and_writes_the_report(tmp_path: Path) -> None:
    grid_path = write_grid(tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [str(grid_path), "--tasks", "a", "--seeds", "0", "--out", str(out), "--work", str(work)]
    assert cli.main(argv) == 0

    report = json.loads((out / "quality.json").read_text())
    assert (out / "quality_a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "quality.md").read_text()
    assert "## Task a" in markdown and "robustness to a junk member" in markdown.lower()
    task = report["tasks"]["a"]
    assert set(task["methods"]) == {"local", "fedavg", "centralized", "medoid", "shipped", *CEILINGS}
    assert task["same_test_set_per_seed"] is True
    assert task["test_prompts"] == [6] and task["generation_prompts"] == [4]
    for method, item in task["methods"].items():
        for metric in ("nll", "rouge_l", "embedding_similarity"):
            assert item[metric]["low"] <= item[metric]["mean"] <= item[metric]["high"], (method, metric)
        assert len(item["subset_nll_by_round"]) == 3, method  # start, round 1, round 2
    assert set(task["differences"]["medoid"]) == {"local", "fedavg"}
    assert set(task["differences"]["fedavg"]) == {"local"}
    assert "local" not in task["differences"]  # its difference to FedAvg is FedAvg's, negated
    assert set(task["label_quality"]) == {"medoid", "shipped"}
    assert {"1", "2", "overall"} <= set(task["label_quality"]["medoid"])
    assert task["methods"]["local"]["bytes_per_participant_per_round"] == 0
    assert set(task["own_data"]) == {"p0", "p1"} and "Precondition" in markdown
    assert all(0.0 <= v <= 1.0 for row in task["own_data"].values() for v in row.values())
    assert task["fedavg_to_semantic_bytes"] > 1

    # Every method but centralized started from the same warm-up; its round 0 is the warm-up's score.
    warm = _stored(work, "a__seed0__warmup")
    for method in ("local", "fedavg", "medoid", *CEILINGS):
        stored = _stored(work, f"a__seed0__{method}")
        for pid, scores in stored.participants.items():
            assert scores.subset_nll_by_round[0] == warm.participants[pid].subset_nll_by_round[0], method
            assert len(scores.nll) == 6 and len(scores.rouge_l) == 4
    # FedAvg participants hold the same average after a round: identical scores.
    fedavg = _stored(work, "a__seed0__fedavg")
    assert fedavg.participants["p0"].nll == fedavg.participants["p1"].nll

    junk = report["junk_member"]
    assert junk["participants"]["p1"]["model"] == "tiny-gpt2"
    assert "local_only_nll" in junk["participants"]["p0"]
    assert junk["fedavg"]["aggregated_adapter_published"] is False
    assert junk["fedavg"]["average_wire"].startswith("AggregationError")

    # A second invocation finds every run finished and only rewrites the report.
    before = {p.name: p.stat().st_mtime_ns for p in (work / "runs").glob("*.json")}
    assert cli.main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (work / "runs").glob("*.json")} == before


def _stored(work: Path, name: str) -> RunResult:
    return msgspec.json.decode((work / "runs" / f"{name}.json").read_bytes(), type=RunResult)


def test_a_run_that_fails_is_recorded_with_its_error_and_the_grid_goes_on(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path), tasks=["a"], seeds=[0], methods=["local"], junk_member=False)
    runner = GridRunner(grid, tmp_path / "work", ResultStore(tmp_path / "runs"), None, say=lambda _: None)  # type: ignore[arg-type]
    result = runner.run_one(RunKey("a", 0, "local"))  # no warm-up ran, so there is nothing to start from
    assert result.error is not None and "no warm-up checkpoint" in result.error
    assert result.participants == {}


def test_a_setting_added_at_its_default_keeps_finished_runs_finished(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path))
    config = method_config(seeded(grid.tasks["a"], 0), "local", grid.shipped)
    identity = non_default(config.run)
    # warmup_epochs 1 and seed 0 are the defaults, so they are left out
    assert identity["train"] == {
        "rank": 4,
        "batch_size": 4,
        "max_length": 64,
        "private_examples_per_round": 4,
    }
    assert "participants" in identity and "model" in identity["participants"][0]  # non-defaults only
    changed = dataclasses.replace(
        config,
        run=msgspec.structs.replace(config.run, train=msgspec.structs.replace(config.run.train, rank=8)),
    )
    assert fingerprint(changed, {}) != fingerprint(config, {})


# ---- a heterogeneous federation, and the device -----------------------------------------------------

HETEROGENEOUS_MEMBERS = """
[[participants]]
id = "q0"
model = "tiny-llama"
[participants.train]
rank = 2
alpha = 4

[[participants]]
id = "q1"
model = "tiny-llama"
[participants.train]
rank = 8
target_modules = "all-linear"

[[participants]]
id = "q2"
model = "tiny-gpt2"
[participants.train]
method = "last_layers"
last_layers = 1

[[participants]]
id = "q3"
model = "tiny-llama"
[participants.train]
method = "none"
"""

HETEROGENEOUS_GRID = """
seeds = [0]
methods = ["local", "medoid", "shipped"]
per_member = true
generation_prompts = 4
round_nll_prompts = 3
bootstrap_resamples = 200

[tasks]
h = "h.toml"

[shipped]
train = { label_weighting = "disagreement" }

[fedavg_refusal]
task = "h"
deadline_seconds = 4.0
"""


def test_a_heterogeneous_federation_is_scored_member_by_member_and_fedavg_refuses_it(tmp_path: Path) -> None:
    (tmp_path / "h.toml").write_text(f'federation = "h"\n{TASK}{HETEROGENEOUS_MEMBERS}')
    grid_path = tmp_path / "grid.toml"
    grid_path.write_text(HETEROGENEOUS_GRID)
    grid = load_grid(grid_path)
    assert [k.method for k in grid.runs()] == ["warmup", "local", "medoid", "shipped", "fedavg_refusal"]
    # A recipe's training settings reach the members that have their own [participants.train] too.
    base = seeded(grid.tasks["h"], 0)
    for method, weighting in (("shipped", "disagreement"), ("medoid", "confidence")):
        entries = method_config(base, method, grid.shipped).run.participants
        assert {e.train.label_weighting for e in entries if e.train is not None} == {weighting}, method
    out, work = tmp_path / "out", tmp_path / "work"
    assert cli.main([str(grid_path), "--out", str(out), "--work", str(work)]) == 0

    report = json.loads((out / "quality.json").read_text())
    assert set(report["tasks"]["h"]["methods"]) == {"local", "medoid", "shipped"}
    [members] = report["members"]
    rows = members["participants"]
    assert {pid: row["learner"] for pid, row in rows.items()} == {
        "q0": "lora r2 a4 default",
        "q1": "lora r8 a16 all-linear",
        "q2": "last_layers 1",
        "q3": "none",
    }
    for row in rows.values():
        assert {"local", "medoid", "shipped"} <= set(row)
    # The member that never trains answers with its base model whatever the method: the same scores.
    assert rows["q3"]["local"] == rows["q3"]["medoid"] == rows["q3"]["shipped"]
    # The last-layers member's checkpoints were loaded: after training it scores unlike its warm-up.
    warm = _stored(work, "h__seed0__warmup").participants["q2"].subset_nll_by_round[0]
    assert _stored(work, "h__seed0__local").participants["q2"].subset_nll_by_round[-1] != warm

    fedavg = report["fedavg_refusal"]["fedavg"]
    assert fedavg["aggregated_adapter_published"] is False
    assert set(fedavg["stored_adapters"]) <= {"q0", "q1"}  # the others cannot send an adapter
    assert fedavg["average_wire"].startswith("AggregationError")  # r2 q/v and r8 all-linear differ
    markdown = (out / "quality.md").read_text()
    assert "Every member beside its own local-only scores" in markdown
    assert "## FedAvg on task h" in markdown


def test_a_device_moves_every_task_and_is_part_of_each_run_identity(tmp_path: Path) -> None:
    on_cpu = load_grid(write_grid(tmp_path))
    anywhere = load_grid(write_grid(tmp_path), device="auto")
    assert {c.run.device for c in anywhere.tasks.values()} == {"auto"}
    key = RunKey("a", 0, "medoid")
    cpu_runner = GridRunner(on_cpu, tmp_path, ResultStore(tmp_path / "r"), None, say=lambda _: None)  # type: ignore[arg-type]
    any_runner = GridRunner(anywhere, tmp_path, ResultStore(tmp_path / "r"), None, say=lambda _: None)  # type: ignore[arg-type]
    assert cpu_runner.fingerprint(key) != any_runner.fingerprint(key)
    # "cpu" is the default: naming it keeps the runs finished without it.
    named = GridRunner(
        load_grid(write_grid(tmp_path), device="cpu"),
        tmp_path,
        ResultStore(tmp_path / "r"),
        None,  # type: ignore[arg-type]
    )
    assert named.fingerprint(key) == cpu_runner.fingerprint(key)
    with pytest.raises(GridError, match="--device 'gpu'"):
        load_grid(write_grid(tmp_path), device="gpu")
