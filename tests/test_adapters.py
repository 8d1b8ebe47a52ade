"""A participant's adapter on the wire: torch tensors to wire tensors and back, exactly."""

from __future__ import annotations

import struct

import msgspec
import numpy as np
import pytest
import torch

from participant.adapters import arrays_to_state, state_to_arrays, tensors_from_wire, tensors_to_wire
from schemas.codec import encode
from schemas.messages import AdapterUpdate, Tensor
from schemas.tensors import TensorWireError, arrays_from_wire


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


def test_state_and_array_conversions_restore_dtypes() -> None:
    state = {"a": torch.randn(2, 3).to(torch.bfloat16), "b": torch.randn(4).half()}
    arrays = state_to_arrays(state)
    assert arrays["a"].dtype == np.float32  # numpy has no bfloat16
    back = arrays_to_state(arrays, {name: tensor.dtype for name, tensor in state.items()})
    assert all(torch.equal(back[name], state[name]) for name in state)
    with pytest.raises(TensorWireError, match="dtype"):
        arrays_to_state(arrays, {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_wire_bytes_are_the_tensors_own_bits(dtype: torch.dtype) -> None:
    tensor = _awkward_values(dtype)
    [wire] = tensors_to_wire({"w": tensor})
    little_endian = {torch.float32: "<i4", torch.float16: "<i2", torch.bfloat16: "<i2"}[dtype]
    assert wire.data == _bits(tensor).numpy().astype(little_endian).tobytes()


def test_the_torch_free_codec_reads_what_a_participant_sends() -> None:
    state = {"a": torch.randn(2, 3).to(torch.bfloat16), "b": torch.randn(4).half(), "c": torch.randn(5)}
    decoded = arrays_from_wire(tensors_to_wire(state))
    assert {name: dtype for name, (_, dtype) in decoded.items()} == {
        "a": "bfloat16",
        "b": "float16",
        "c": "float32",
    }
    for name, tensor in state.items():
        np.testing.assert_array_equal(decoded[name][0], tensor.float().numpy())
