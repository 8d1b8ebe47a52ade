"""Tensors on the wire, as NumPy arrays: no torch, so that the coordinator never needs it.

A wire `Tensor` is its name, dtype, shape and raw little-endian bytes in row-major order; bfloat16
travels as its 16-bit pattern. NumPy has no bfloat16, so here a bfloat16 tensor is a float32 array
(exactly: bfloat16 is float32 with the low 16 mantissa bits dropped), and float32 values go back to
bfloat16 rounding to nearest even, as torch does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from schemas.errors import ChorusError
from schemas.messages import Tensor

WireDtype = Literal["float32", "float16", "bfloat16"]
WIRE_DTYPES: tuple[WireDtype, ...] = ("float32", "float16", "bfloat16")
AnyArray = npt.NDArray[Any]

# Little-endian NumPy dtype holding each wire dtype's bytes (bfloat16 as its raw 16 bits).
_STORAGE: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}


class TensorWireError(ChorusError):
    """A tensor that cannot be put on, or taken off, the wire."""


def arrays_from_wire(tensors: Sequence[Tensor]) -> dict[str, tuple[AnyArray, WireDtype]]:
    """Arrays rebuilt from the wire, each with its wire dtype; checked: known dtype, unique names, byte
    count matching the shape. bfloat16 comes back as float32, exactly."""
    arrays: dict[str, tuple[AnyArray, WireDtype]] = {}
    for wire in tensors:
        if wire.name in arrays:
            raise TensorWireError(f"tensor {wire.name!r} appears twice in one message")
        arrays[wire.name] = (_array_from_wire(wire), wire.dtype)
    return arrays


def check_wire(tensors: Sequence[Tensor]) -> dict[str, tuple[int, ...]]:
    """Names and shapes, after the checks `arrays_from_wire` makes, without copying any data."""
    shapes: dict[str, tuple[int, ...]] = {}
    for wire in tensors:
        if wire.name in shapes:
            raise TensorWireError(f"tensor {wire.name!r} appears twice in one message")
        _check_size(wire)
        shapes[wire.name] = tuple(wire.shape)
    return shapes


def _check_size(wire: Tensor) -> np.dtype[Any]:
    storage = _STORAGE.get(wire.dtype)
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
    return storage


def _array_from_wire(wire: Tensor) -> AnyArray:
    storage = _check_size(wire)
    # frombuffer is a read-only view of the message; copy so that the array owns writable memory.
    raw = np.frombuffer(wire.data, dtype=storage).astype(storage.newbyteorder("="), copy=True)
    array = bfloat16_bits_to_float32(raw) if wire.dtype == "bfloat16" else raw
    return array.reshape(wire.shape)


def arrays_to_wire(arrays: Mapping[str, AnyArray], dtypes: Mapping[str, WireDtype]) -> list[Tensor]:
    """One wire `Tensor` per array, in the mapping's order, cast to the wire dtype named for it."""
    missing = sorted(set(arrays) - set(dtypes))
    if missing:
        raise TensorWireError(f"no wire dtype given for tensors {missing[:5]}")
    wire = []
    for name, array in arrays.items():
        dtype = dtypes[name]
        if dtype not in _STORAGE:
            raise TensorWireError(f"tensor {name!r}: {dtype!r} is not a wire dtype; use one of {WIRE_DTYPES}")
        values = np.asarray(array)  # keeps a 0-d array 0-d; tobytes() is row-major whatever the layout
        if dtype == "bfloat16":
            stored = float32_to_bfloat16_bits(values.astype(np.float32))
        else:
            stored = values.astype(_STORAGE[dtype])
        data = stored.astype(_STORAGE[dtype], copy=False).tobytes()
        wire.append(Tensor(name=name, dtype=dtype, shape=list(values.shape), data=data))
    return wire


def bfloat16_bits_to_float32(bits: AnyArray) -> AnyArray:
    widened: AnyArray = bits.astype(np.uint32) << np.uint32(16)
    return widened.view(np.float32)


def float32_to_bfloat16_bits(values: AnyArray) -> AnyArray:
    """Round to nearest, ties to even (torch's rule). A NaN keeps its sign and top payload bits, made
    quiet, so a bfloat16 read from the wire goes back bit for bit."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    high = bits >> np.uint32(16)
    rounded = (bits + (np.uint32(0x7FFF) + (high & np.uint32(1)))) >> np.uint32(16)
    out: AnyArray = np.where(np.isnan(values), high | np.uint32(0x0040), rounded).astype(np.uint16)
    return out
