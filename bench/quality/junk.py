"""Robustness to a junk member: FedAvg's refusal of a federation whose adapters do not match, recorded.

The junk-member run itself is a semantic federation (bench/quality/methods.py); this module runs one
FedAvg round of the same federation and gathers what the coordinator did with the mismatched adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coordinator.store import CoordinatorStore
from federation.config import LoadedConfig
from federation.launch import run_to_end
from federation.runner import RunOptions


def fedavg_refusal(config: LoadedConfig, work: Path, deadline: float) -> dict[str, Any]:
    """One FedAvg round of a federation with mixed architectures: what the coordinator did."""
    from coordinator.strategies.fedavg import AggregationError, average_wire
    from participant.adapters import tensors_to_wire

    raw = dict(config.coordinator_raw)
    raw["round"] = {**dict(raw.get("round") or {}), "deadline_seconds": deadline}  # type: ignore[call-overload]
    config = LoadedConfig(path=config.path, run=config.run, coordinator_raw=raw)
    finished = run_to_end(
        config, RunOptions(results=work, rounds=1), extra={"bench": "quality"}, handle_signals=False
    )
    run = finished.run
    coordinator = run.coordinator
    evidence: dict[str, Any] = {"run_error": finished.error, "deadline_seconds": deadline}
    if coordinator is not None:
        evidence["dead_lettered"] = coordinator.counters.dead_lettered
        evidence["rejections"] = dict(coordinator.counters.rejections)
        store = CoordinatorStore(coordinator.settings.state_path)  # the run closed its handle
        try:
            evidence["stored_adapters"] = [row.participant_id for row in store.batches(1)]  # a fedavg run
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
        evidence["aggregated_adapter_published"] = "aggregated_adapter" in kinds
    # The averaging function itself, on the participants' real adapters.
    states = {}
    for participant in run.participants:
        state_of = getattr(participant.learner, "adapter_state", None)
        if state_of is not None:
            states[participant.pid] = state_of()
    evidence["adapters"] = {
        pid: {"tensors": len(state), "parameters": sum(t.numel() for t in state.values())}
        for pid, state in states.items()
    }
    try:
        average_wire([(tensors_to_wire(state), 1) for state in states.values()])
        evidence["average_wire"] = "averaged (unexpected: the adapters matched)"
    except AggregationError as e:
        evidence["average_wire"] = f"AggregationError: {e}"
    return evidence
