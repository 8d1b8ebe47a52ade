"""bench/quality.py end to end on tiny in-process models: every method gives numbers, files are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import quality

COMMON = """
rounds = 2
embedder = "hashing"

[task]
families = ["text", "data"]
seed = 0
max_public = 8
max_train = 8
max_test = 4

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


pytestmark = pytest.mark.usefixtures("restore_logging")


def write_config(path: Path, federation: str, models: list[str]) -> Path:
    entries = "".join(f'\n[[participants]]\nid = "p{i}"\nmodel = "{m}"\n' for i, m in enumerate(models))
    path.write_text(f'federation = "{federation}"\n{COMMON}{entries}')
    return path


def test_quality_bench_runs_every_method_on_tiny_models(tmp_path: Path) -> None:
    config = write_config(tmp_path / "tiny-same.toml", "same", ["tiny-llama", "tiny-llama"])
    het = write_config(tmp_path / "tiny-mixed.toml", "mixed", ["tiny-llama", "tiny-gpt2"])
    out = tmp_path / "out"
    argv = [str(config), "--heterogeneous", str(het), "--out", str(out), "--work", str(tmp_path / "work")]
    assert quality.main([*argv, "--refusal-deadline", "4"]) == 0

    report = json.loads((out / "quality.json").read_text())
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "quality.md").read_text()
    assert "FedAvg (LoRA)" in markdown and "## Criteria" in markdown
    methods = report["methods"]
    assert set(methods) == {"local", "semantic", "fedavg", "centralized", "heterogeneous"}
    for name, method in methods.items():
        assert method["error"] is None, name
        assert method["rounds"] == 2, name
        assert isinstance(method["final_rouge_l"], float), name
        assert isinstance(method["final_embedding_similarity"], float), name
        assert all(v is not None for v in method["mean_rouge_l_per_round"]), name
    assert report["same_test_set"] is True and report["test_examples"] == 4
    assert methods["local"]["bytes_total"] == 0 and methods["centralized"]["bytes_total"] == 0
    semantic, fedavg = methods["semantic"], methods["fedavg"]
    assert semantic["bytes_per_participant_per_round"] > 0
    assert fedavg["bytes_per_participant_per_round"] > semantic["bytes_per_participant_per_round"]
    assert methods["heterogeneous"]["bytes_per_participant_per_round"] > 0
    assert set(report["criteria"]) == {
        "semantic_above_local_only",
        "semantic_within_1_point_of_fedavg",
        "fedavg_to_consensus_bytes_ratio_at_least_300",
    }
    # FedAvg cannot serve mixed architectures: the coordinator dead-letters the mismatched adapter,
    # no average is published, and the averaging function refuses the pair outright.
    refusal = report["fedavg_heterogeneous"]
    assert refusal["dead_lettered"] >= 1 and "adapter" in refusal["rejections"]
    assert len(refusal["stored_adapters"]) == 1
    assert refusal["aggregated_adapter_published"] is False
    assert refusal["round_1"]["shard_status"] == ["failed"]
    assert refusal["average_wire"].startswith("AggregationError")

    # Local-only, semantic and FedAvg start from the very same warm-up adapters: the federated runs
    # load the local-only run's checkpoints instead of training their own (heterogeneous: where the
    # model and budget match).
    work = tmp_path / "work"
    for method, started in (("semantic", ["p0", "p1"]), ("fedavg", ["p0", "p1"]), ("heterogeneous", ["p0"])):
        assert f"warm-up adapters: {started}" in " ".join(methods[method]["notes"]), method
        for pid in started:
            warm = work / "local" / "warmup" / pid
            copied = work / method / "state" / pid / "checkpoints" / "round-0"
            names = sorted(p.name for p in warm.iterdir())
            assert names and names == sorted(p.name for p in copied.iterdir())
            assert all((warm / n).read_bytes() == (copied / n).read_bytes() for n in names), (method, pid)
    assert "warmed up in the run: ['p1']" in " ".join(methods["heterogeneous"]["notes"])
    events = [json.loads(line) for line in (work / "heterogeneous" / "run.log").read_text().splitlines()]
    joined = {e["participant"]: e["restored_round"] for e in events if e["event"] == "participant_joined"}
    assert joined == {"p0": 0, "p1": None}  # p0 restored the shared warm-up; p1 trained its own
    assert [e["participant"] for e in events if e["event"] == "warm_up"] == ["p1"]
