"""FedAvg baseline: weighted mean of adapters, and exact tensor transport over the wire."""

from __future__ import annotations

import struct

import msgspec
import numpy as np
import pytest
import torch

from coordinator.fedavg import (
    AggregationError,
    TensorWireError,
    arrays_to_state,
    average_adapters,
    average_wire,
    state_to_arrays,
    tensors_from_wire,
    tensors_to_wire,
)
from schemas.codec import encode
from schemas.errors import ChorusError
from schemas.messages import AdapterUpdate, Tensor


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


# ---- wire ------------------------------------------------------------------


def _awkward_values(dtype: torch.dtype) -> torch.Tensor:
    """Ordinary values plus the bit patterns a lossy conversion would break: ±0, ±inf, NaN, subnormals."""
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")], dtype=dtype)
    tiny = torch.tensor(
        [torch.finfo(dtype).tiny / 4, torch.finfo(dtype).max, torch.finfo(dtype).min], dtype=dtype
    )
    ordinary = torch.randn(37, generator=torch.Generator().manual_seed(0)).to(dtype)
    return torch.cat([special, tiny, ordinary.flatten()]).reshape(3, 15)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    integer = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[
        tensor.dtype
    ]
    return tensor.contiguous().view(integer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_wire_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    state = {
        "a": _awkward_values(dtype),
        "scalar": torch.tensor(2.5, dtype=dtype),
        "empty": torch.zeros(0, 3, dtype=dtype),
    }
    back = tensors_from_wire(tensors_to_wire(state))
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == dtype
        assert back[name].shape == tensor.shape
        assert torch.equal(_bits(back[name]), _bits(tensor))


def test_round_trip_survives_the_message_codec_and_non_contiguous_tensors() -> None:
    transposed = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()
    update = AdapterUpdate(
        federation="f",
        round_id=1,
        message_id="m",
        participant_id="p1",
        tensors=tensors_to_wire({"t": transposed}),
        num_samples=4,
    )
    decoded = msgspec.msgpack.decode(encode(update), type=AdapterUpdate)
    back = tensors_from_wire(decoded.tensors)
    assert torch.equal(back["t"], transposed)
    assert back["t"].is_contiguous()


def test_wire_bytes_are_little_endian_row_major() -> None:
    [wire] = tensors_to_wire({"w": torch.tensor([[1.0, -2.0], [0.5, 4.0]])})
    assert wire.dtype == "float32"
    assert wire.shape == [2, 2]
    assert wire.data == struct.pack("<4f", 1.0, -2.0, 0.5, 4.0)


def test_tensors_from_wire_are_writable_and_independent_of_the_message() -> None:
    wire = tensors_to_wire({"w": torch.ones(3)})
    back = tensors_from_wire(wire)
    back["w"] += 1  # would raise or corrupt the message if it were a view of the bytes
    assert torch.equal(tensors_from_wire(wire)["w"], torch.ones(3))


@pytest.mark.parametrize(
    ("dtype", "shape", "size"),
    [("float32", [2, 3], 20), ("float16", [4], 6), ("bfloat16", [2, 2], 9), ("float32", [0], 4)],
)
def test_data_length_must_match_shape(dtype: str, shape: list[int], size: int) -> None:
    bad = Tensor(name="lora_A", dtype=dtype, shape=shape, data=b"\0" * size)  # type: ignore[arg-type]
    with pytest.raises(TensorWireError, match=r"lora_A.*needs"):
        tensors_from_wire([bad])


def test_duplicate_names_and_unsupported_dtypes_are_rejected() -> None:
    [wire] = tensors_to_wire({"w": torch.ones(2)})
    with pytest.raises(TensorWireError, match="twice"):
        tensors_from_wire([wire, wire])
    with pytest.raises(TensorWireError, match=r"float64.*cast"):
        tensors_to_wire({"w": torch.ones(2, dtype=torch.float64)})


# ---- end to end ------------------------------------------------------------


def test_average_wire_keeps_bfloat16_and_weights_by_samples() -> None:
    first = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    second = {"w": torch.tensor([3.0, 6.0], dtype=torch.bfloat16)}
    [mean] = average_wire([(tensors_to_wire(first), 1), (tensors_to_wire(second), 3)])
    back = tensors_from_wire([mean])["w"]
    assert back.dtype == torch.bfloat16
    assert back.tolist() == [2.5, 5.0]


def test_state_and_array_conversions_restore_dtypes() -> None:
    state = {"a": torch.randn(2, 3).to(torch.bfloat16), "b": torch.randn(4).half()}
    arrays = state_to_arrays(state)
    assert arrays["a"].dtype == np.float32  # numpy has no bfloat16
    back = arrays_to_state(arrays, {name: tensor.dtype for name, tensor in state.items()})
    assert all(torch.equal(back[name], state[name]) for name in state)
    with pytest.raises(TensorWireError, match="dtype"):
        arrays_to_state(arrays, {})
