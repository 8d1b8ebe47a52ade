"""The FedAvg-over-LoRA baseline: weighted mean of adapters, and tensors to and from the wire.

On the wire (`schemas.messages.Tensor`) a tensor is its name, dtype, shape and raw little-endian
bytes in row-major order; bfloat16 travels as its 16-bit pattern (NumPy has no bfloat16, so it goes
through a torch view). Averaging happens in float64 and each result keeps its inputs' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from schemas.errors import ChorusError
from schemas.messages import Tensor

WireDtype = Literal["float32", "float16", "bfloat16"]
AnyArray = npt.NDArray[Any]

_TORCH_OF_WIRE: dict[WireDtype, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_WIRE_OF_TORCH: dict[torch.dtype, WireDtype] = {value: key for key, value in _TORCH_OF_WIRE.items()}
# Little-endian NumPy dtype holding each wire dtype's bytes (bfloat16 as its raw 16 bits).
_STORAGE_OF_WIRE: dict[WireDtype, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<i2"),
}


class AggregationError(ChorusError):
    """Adapters that cannot be averaged together: different tensor names, shapes, or bad weights."""


class TensorWireError(ChorusError):
    """A tensor that cannot be put on, or taken off, the wire."""


# ---- averaging -------------------------------------------------------------


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
    arrays = [np.asarray(state[name]) for state, _ in updates]
    if not all(np.issubdtype(array.dtype, np.floating) for array in arrays):
        dtypes = sorted({str(array.dtype) for array in arrays})
        raise AggregationError(f"tensor {name!r} must be floating point to be averaged, got {dtypes}")
    mean = np.zeros(arrays[0].shape, dtype=np.float64)
    for array, (_, count) in zip(arrays, updates, strict=True):
        mean += array.astype(np.float64) * (count / total)
    result: AnyArray = mean.astype(np.result_type(*arrays))
    return result


# ---- torch <-> numpy -------------------------------------------------------


def state_to_arrays(state: Mapping[str, torch.Tensor]) -> dict[str, AnyArray]:
    """Tensors as NumPy arrays for averaging; bfloat16 (which NumPy lacks) becomes float32 exactly."""
    arrays: dict[str, AnyArray] = {}
    for name, tensor in state.items():
        plain = tensor.detach().cpu()
        if plain.dtype == torch.bfloat16:
            plain = plain.to(torch.float32)
        arrays[name] = plain.numpy()
    return arrays


def arrays_to_state(
    arrays: Mapping[str, AnyArray], dtypes: Mapping[str, torch.dtype]
) -> dict[str, torch.Tensor]:
    """Arrays back to tensors, each cast to the dtype named for it (e.g. its original dtype)."""
    missing = sorted(set(arrays) - set(dtypes))
    if missing:
        raise TensorWireError(f"no target dtype given for tensors {missing[:5]}")
    return {name: torch.from_numpy(np.array(array)).to(dtypes[name]) for name, array in arrays.items()}


# ---- wire ------------------------------------------------------------------


def tensors_to_wire(state: Mapping[str, torch.Tensor]) -> list[Tensor]:
    """One wire `Tensor` per entry, in the mapping's order; raw little-endian row-major bytes."""
    return [_tensor_to_wire(name, tensor) for name, tensor in state.items()]


def _tensor_to_wire(name: str, tensor: torch.Tensor) -> Tensor:
    wire_dtype = _WIRE_OF_TORCH.get(tensor.dtype)
    if wire_dtype is None:
        supported = ", ".join(_TORCH_OF_WIRE)
        raise TensorWireError(
            f"tensor {name!r} has dtype {tensor.dtype}; cast it to one of {supported} first"
        )
    plain = tensor.detach().cpu().contiguous()
    if wire_dtype == "bfloat16":
        plain = plain.view(torch.int16)  # same bits, a dtype NumPy can hold
    data = plain.numpy().astype(_STORAGE_OF_WIRE[wire_dtype], copy=False).tobytes()
    return Tensor(name=name, dtype=wire_dtype, shape=list(tensor.shape), data=data)


def tensors_from_wire(tensors: Sequence[Tensor]) -> dict[str, torch.Tensor]:
    """Tensors rebuilt from the wire, checked: known dtype, unique names, byte count matching shape."""
    state: dict[str, torch.Tensor] = {}
    for wire in tensors:
        if wire.name in state:
            raise TensorWireError(f"tensor {wire.name!r} appears twice in one message")
        state[wire.name] = _tensor_from_wire(wire)
    return state


def _tensor_from_wire(wire: Tensor) -> torch.Tensor:
    storage = _STORAGE_OF_WIRE.get(wire.dtype)
    if storage is None:
        raise TensorWireError(f"tensor {wire.name!r} has unsupported dtype {wire.dtype!r}")
    if any(size < 0 for size in wire.shape):
        raise TensorWireError(f"tensor {wire.name!r} has a negative dimension in shape {wire.shape}")
    expected = math.prod(wire.shape) * storage.itemsize
    if len(wire.data) != expected:
        raise TensorWireError(
            f"tensor {wire.name!r}: {len(wire.data)} bytes of data, but shape {wire.shape} of {wire.dtype}"
            f" needs {expected}"
        )
    # frombuffer is a read-only view of the message; copy so that the tensor owns writable memory.
    array = np.frombuffer(wire.data, dtype=storage).astype(storage.newbyteorder("="), copy=True)
    tensor = torch.from_numpy(array.reshape(wire.shape))
    return tensor.view(torch.bfloat16) if wire.dtype == "bfloat16" else tensor


def average_wire(updates: Sequence[tuple[Sequence[Tensor], int]]) -> list[Tensor]:
    """FedAvg straight from wire tensors to wire tensors; each result keeps the first adapter's dtype."""
    states = [(tensors_from_wire(tensors), count) for tensors, count in updates]
    if not states:
        raise AggregationError("no adapters to average")
    dtypes = {name: tensor.dtype for name, tensor in states[0][0].items()}
    mean = average_adapters([(state_to_arrays(state), count) for state, count in states])
    return tensors_to_wire(arrays_to_state(mean, dtypes))
