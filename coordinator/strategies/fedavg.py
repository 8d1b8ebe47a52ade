"""FedAvg over LoRA adapters, the parameter-aggregation baseline: members send their adapters, the
coordinator sends back their sample-weighted mean. Through the same broker, so that quality and
bytes compare fairly with semantic consensus.

Averaging happens in float64 on NumPy (no torch here) and each result keeps its inputs' wire dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import structlog

from broker.topology import COORDINATOR_USER
from coordinator import stored
from coordinator.rounds import ShardClosing
from coordinator.strategies.base import (
    ADAPTER_ANSWERS,
    AnswerRules,
    Decision,
    Observe,
    Outgoing,
    StrategyContext,
)
from schemas.codec import encode
from schemas.errors import ChorusError
from schemas.ids import aggregated_adapter_id
from schemas.messages import AdapterUpdate, AggregatedAdapter, GenerationBatch, PromptShard, Tensor
from schemas.tensors import AnyArray, WireDtype, arrays_from_wire, arrays_to_wire, check_wire

log = structlog.get_logger(__name__)

ADAPTER_SHARD = 0  # a FedAvg round has one internal shard: the adapter uploads


class AggregationError(ChorusError):
    """Adapters that cannot be averaged together: different tensor names, shapes, or bad weights."""


def build(context: StrategyContext) -> FedAvgStrategy:
    return FedAvgStrategy(context)


class FedAvgStrategy:
    announces = "fedavg"
    answers: AnswerRules = ADAPTER_ANSWERS

    def __init__(self, context: StrategyContext) -> None:
        self.settings = context.settings
        self.store = context.store

    def shards(self, round_id: int) -> list[PromptShard]:
        return []

    def answer_slots(self, shards: Sequence[PromptShard]) -> dict[int, list[str]]:
        return {ADAPTER_SHARD: []}

    def answer_problem(self, round_id: int, answer: GenerationBatch | AdapterUpdate) -> str | None:
        if not isinstance(answer, AdapterUpdate):
            return "a fedavg round is answered by an adapter update"  # intake refuses others first
        try:
            shapes = check_wire(answer.tensors)
        except ChorusError as e:
            return f"bad adapter tensors: {e}"
        expected = self._first_shapes(round_id)
        if expected is not None and shapes != expected:
            return "adapter tensors differ in names or shapes from those already received this round"
        return None

    def _first_shapes(self, round_id: int) -> dict[str, tuple[int, ...]] | None:
        """Names and shapes of the first adapter stored this round, which every other must match."""
        rows = self.store.batches(round_id, ADAPTER_SHARD)
        if not rows:
            return None
        first = stored.adapter_update.decode(rows[0].body)
        return {t.name: tuple(t.shape) for t in first.tensors}

    def decide(
        self, round_id: int, closings: Sequence[ShardClosing], slots: Mapping[int, Sequence[str]]
    ) -> list[Decision]:
        decisions = []
        for closing in closings:
            if closing.status != "labelled":
                continue
            answered = set(closing.answered)
            updates = [
                (update.tensors, update.num_samples)
                for row in self.store.batches(round_id, closing.shard_id)
                if row.participant_id in answered
                for update in [stored.adapter_update.decode(row.body)]
            ]
            federation = self.settings.federation
            message = AggregatedAdapter(
                federation=federation,
                round_id=round_id,
                message_id=aggregated_adapter_id(federation, round_id),
                participant_id=COORDINATOR_USER,
                tensors=average_wire(updates),  # keeps the participants' dtype
                contributors=sorted(answered),
            )
            log.info("adapters_averaged", round=round_id, contributors=len(answered))
            reply = Outgoing(message.message_id, encode(message), "aggregated_adapter")
            decisions.append(Decision(closing.shard_id, reply))
        return decisions

    def revise(self, round_id: int, decided: Mapping[int, Decision]) -> list[Decision]:
        return []  # an average, once applied, is not taken back

    def time_parts(self, observe: Observe) -> None:
        return None  # averaging embeds nothing; the service times the whole decision


def average_adapters(updates: Sequence[tuple[Mapping[str, AnyArray], int]]) -> dict[str, AnyArray]:
    """Sample-weighted mean of adapters given as (name -> array, number of training samples).

    Every adapter must hold the same names with the same shapes; names come back in the first
    adapter's order.
    """
    if not updates:
        raise AggregationError("no adapters to average")
    _check_sample_counts([count for _, count in updates])
    reference = updates[0][0]
    for position, (state, _) in enumerate(updates[1:], start=1):
        _check_same_layout(reference, state, position)
    total = sum(count for _, count in updates)
    return {name: _weighted_mean(name, updates, total) for name in reference}


def average_wire(updates: Sequence[tuple[Sequence[Tensor], int]]) -> list[Tensor]:
    """FedAvg straight from wire tensors to wire tensors; each result keeps the first adapter's dtype."""
    states = [(arrays_from_wire(tensors), count) for tensors, count in updates]
    if not states:
        raise AggregationError("no adapters to average")
    dtypes: dict[str, WireDtype] = {name: dtype for name, (_, dtype) in states[0][0].items()}
    plain = [({name: array for name, (array, _) in state.items()}, count) for state, count in states]
    return arrays_to_wire(average_adapters(plain), dtypes)


def _check_sample_counts(counts: Sequence[int]) -> None:
    bad = [(position, count) for position, count in enumerate(counts) if isinstance(count, bool) or count < 1]
    if bad:
        listed = ", ".join(f"adapter {position}: {count!r}" for position, count in bad)
        raise AggregationError(f"every adapter needs a sample count of at least 1 ({listed})")


def _check_same_layout(
    reference: Mapping[str, AnyArray], state: Mapping[str, AnyArray], position: int
) -> None:
    missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or extra:
        raise AggregationError(
            f"adapter {position} does not match adapter 0: missing {missing[:5]}, unexpected {extra[:5]}"
            " (were they trained with the same LoRA configuration?)"
        )
    for name, array in reference.items():
        if np.shape(state[name]) != np.shape(array):
            raise AggregationError(
                f"tensor {name!r} has shape {np.shape(state[name])} in adapter {position}"
                f" but {np.shape(array)} in adapter 0"
            )


def _weighted_mean(name: str, updates: Sequence[tuple[Mapping[str, AnyArray], int]], total: int) -> AnyArray:
    arrays: list[Any] = [np.asarray(state[name]) for state, _ in updates]
    if not all(np.issubdtype(array.dtype, np.floating) for array in arrays):
        dtypes = sorted({str(array.dtype) for array in arrays})
        raise AggregationError(f"tensor {name!r} must be floating point to be averaged, got {dtypes}")
    mean = np.zeros(arrays[0].shape, dtype=np.float64)
    for array, (_, count) in zip(arrays, updates, strict=True):
        mean += array.astype(np.float64) * (count / total)
    result: AnyArray = mean.astype(np.result_type(*arrays))
    return result
