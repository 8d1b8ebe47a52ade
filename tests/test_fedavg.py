"""FedAvg baseline: the weighted mean of adapters (tensors on the wire: test_adapters.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coordinator.strategies.fedavg import AggregationError, average_adapters, average_wire
from participant.adapters import tensors_from_wire, tensors_to_wire
from schemas.errors import ChorusError
from schemas.tensors import TensorWireError


def _adapter(seed: int, dtype: type[np.floating] = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layer.0.lora_A": rng.standard_normal((4, 16)).astype(dtype),
        "layer.0.lora_B": rng.standard_normal((16, 4)).astype(dtype),
    }


# ---- averaging -------------------------------------------------------------


def test_average_is_weighted_by_sample_count() -> None:
    first, second = _adapter(1), _adapter(2)
    mean = average_adapters([(first, 10), (second, 30)])
    assert list(mean) == list(first)
    for name in first:
        expected = (first[name].astype(np.float64) * 10 + second[name].astype(np.float64) * 30) / 40
        np.testing.assert_allclose(mean[name], expected, rtol=1e-6)
        assert mean[name].dtype == np.float32


def test_average_of_one_adapter_is_that_adapter() -> None:
    only = _adapter(3)
    mean = average_adapters([(only, 7)])
    for name in only:
        np.testing.assert_array_equal(mean[name], only[name])


def test_average_keeps_half_precision_and_widens_mixed_inputs() -> None:
    half = average_adapters([(_adapter(1, np.float16), 1), (_adapter(2, np.float16), 1)])
    mixed = average_adapters([(_adapter(1, np.float16), 1), (_adapter(2), 1)])
    assert all(array.dtype == np.float16 for array in half.values())
    assert all(array.dtype == np.float32 for array in mixed.values())


def test_mismatched_names_are_rejected_with_the_names() -> None:
    other = _adapter(2)
    other["layer.1.lora_A"] = other.pop("layer.0.lora_A")
    with pytest.raises(AggregationError, match=r"layer\.0\.lora_A.*layer\.1\.lora_A"):
        average_adapters([(_adapter(1), 1), (other, 1)])


def test_mismatched_shapes_are_rejected() -> None:
    other = _adapter(2)
    other["layer.0.lora_B"] = np.zeros((16, 8), dtype=np.float32)
    with pytest.raises(AggregationError, match=r"lora_B.*\(16, 8\).*\(16, 4\)"):
        average_adapters([(_adapter(1), 1), (other, 1)])


@pytest.mark.parametrize("count", [0, -3])
def test_non_positive_sample_counts_are_rejected(count: int) -> None:
    with pytest.raises(AggregationError, match="sample count"):
        average_adapters([(_adapter(1), 5), (_adapter(2), count)])


def test_nothing_or_integers_cannot_be_averaged() -> None:
    with pytest.raises(AggregationError, match="no adapters"):
        average_adapters([])
    with pytest.raises(AggregationError, match="floating point"):
        average_adapters([({"w": np.arange(4)}, 1), ({"w": np.arange(4)}, 1)])


def test_aggregation_errors_share_the_chorus_root() -> None:
    assert issubclass(AggregationError, ChorusError)
    assert issubclass(TensorWireError, ChorusError)


# ---- end to end ------------------------------------------------------------


def test_average_wire_keeps_bfloat16_and_weights_by_samples() -> None:
    first = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    second = {"w": torch.tensor([3.0, 6.0], dtype=torch.bfloat16)}
    [mean] = average_wire([(tensors_to_wire(first), 1), (tensors_to_wire(second), 3)])
    back = tensors_from_wire([mean])["w"]
    assert back.dtype == torch.bfloat16
    assert back.tolist() == [2.5, 5.0]
