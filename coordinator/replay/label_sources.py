"""Label quality of real runs: the labels and answers come from a consensus replay of a record log,
or from a finished run's coordinator store; `label_quality` scores them against the references.

In both, a shard's members are its answered set (the batches it closed with); answers carried over
from an earlier round's late batches are not counted among them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

from coordinator.replay.consensus import ConsensusReplay
from coordinator.replay.label_quality import LabelQuality, PromptOutcome, label_quality, shard_outcomes
from coordinator.replay.log import ReplayError
from coordinator.replay.references import load_references
from coordinator.store import CoordinatorStore
from schemas.codec import decode_generation, decode_reply
from schemas.errors import SchemaError
from schemas.messages import PseudoLabels


def _pseudo_labels(body: bytes, where: str) -> PseudoLabels:
    try:
        message = decode_reply(body)
    except SchemaError as e:
        raise ReplayError(f"{where}: the stored labels do not decode ({e})") from e
    if not isinstance(message, PseudoLabels):
        raise ReplayError(f"{where}: expected PseudoLabels, found {type(message).__name__}")
    return message


def replay_label_quality(
    replay: ConsensusReplay, references: Mapping[str, str], side: Literal["replayed", "recorded"]
) -> LabelQuality:
    """Quality of the replayed labels, or of the ones the coordinator published (shards without
    labels on that side are left out)."""

    def outcomes() -> Iterator[PromptOutcome]:
        for shard in replay.shards:
            body = shard.replayed if side == "replayed" else shard.recorded
            if body is not None:
                where = f"round {shard.round_id} shard {shard.shard_id}"
                yield from shard_outcomes(_pseudo_labels(body, where), shard.batches())

    return label_quality(outcomes(), references)


def label_quality_of_run(state_path: Path, references_path: Path) -> LabelQuality:
    """Label quality per round of a finished run, from its coordinator store.

    A `chorus-run` results folder has them at `state/coordinator.sqlite3` and (for a generated
    task) `data/public_references.jsonl`. A FedAvg run has no labels: every count is zero.
    """
    if not state_path.is_file():
        raise ReplayError(f"coordinator store {state_path} does not exist")
    references = load_references(references_path)
    store = CoordinatorStore(state_path)
    try:
        return label_quality(_store_outcomes(store), references)
    finally:
        store.close()


def _store_outcomes(store: CoordinatorStore) -> list[PromptOutcome]:
    outcomes: list[PromptOutcome] = []
    for row in store.rounds():
        for closing in store.closings(row.round_id):
            if closing.labels is None:
                continue
            where = f"round {row.round_id} shard {closing.shard_id}"
            members = set(closing.answered)
            batches = [
                decode_generation(batch.body)
                for batch in store.batches(row.round_id, closing.shard_id)
                if batch.participant_id in members and not batch.late
            ]
            outcomes += shard_outcomes(_pseudo_labels(closing.labels, where), batches)
    return outcomes
