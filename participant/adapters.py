"""A LoRA adapter's torch state dict on the wire, and back, bit for bit, with the codec in schemas/tensors.py.

Each tensor keeps its dtype (float32, float16 or bfloat16). The codec checks and lays out the bytes;
bfloat16, which NumPy lacks, crosses as its own 16 bits in both directions, because a float32 -> bfloat16
cast (the codec's or torch's) turns every NaN into the canonical one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec
import numpy as np
import torch

from schemas.messages import Tensor
from schemas.tensors import (
    WIRE_DTYPES,
    AnyArray,
    TensorWireError,
    WireDtype,
    arrays_from_wire,
    arrays_to_wire,
)

TORCH_OF_WIRE: dict[WireDtype, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
WIRE_OF_TORCH: dict[torch.dtype, WireDtype] = {value: key for key, value in TORCH_OF_WIRE.items()}


def tensors_to_wire(state: Mapping[str, torch.Tensor]) -> list[Tensor]:
    """One wire `Tensor` per entry, in the mapping's order, each in its own dtype."""
    return [_tensor_to_wire(name, tensor) for name, tensor in state.items()]


def tensors_from_wire(tensors: Sequence[Tensor]) -> dict[str, torch.Tensor]:
    """Tensors rebuilt from the wire (checked by the codec), each in its wire dtype, owning its memory."""
    return {
        name: _tensor_from_array(array, dtype) for name, (array, dtype) in arrays_from_wire(tensors).items()
    }


def wire_dtype(name: str, tensor: torch.Tensor) -> WireDtype:
    dtype = WIRE_OF_TORCH.get(tensor.dtype)
    if dtype is None:
        raise TensorWireError(
            f"tensor {name!r} has dtype {tensor.dtype}; cast it to one of {', '.join(WIRE_DTYPES)} first"
        )
    return dtype


def _tensor_to_wire(name: str, tensor: torch.Tensor) -> Tensor:
    dtype = wire_dtype(name, tensor)
    plain = tensor.detach().cpu()
    if dtype == "bfloat16":
        # Its own bits: through float32, the codec's rounding back would canonicalise NaNs.
        bits = plain.contiguous().view(torch.int16).numpy()
        return Tensor(name=name, dtype=dtype, shape=list(plain.shape), data=bits.astype("<i2").tobytes())
    [wire] = arrays_to_wire({name: plain.numpy()}, {name: dtype})
    # arrays_to_wire gives a 0-d array shape [1] (np.ascontiguousarray is at least 1-d); a scalar's is [].
    return wire if plain.dim() else msgspec.structs.replace(wire, shape=[])


def _tensor_from_array(array: AnyArray, dtype: WireDtype) -> torch.Tensor:
    # The codec's arrays are fresh copies, so the tensors may share their memory.
    if dtype == "bfloat16":
        # The codec's float32 holds the bfloat16 bits in its high half: take them back unchanged.
        bits = np.asarray(array.view(np.uint32) >> np.uint32(16)).astype(np.uint16).view(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16)
    return torch.from_numpy(array)


def state_to_arrays(state: Mapping[str, torch.Tensor]) -> dict[str, AnyArray]:
    """Tensors as NumPy arrays, to compute on; bfloat16 (which NumPy lacks) becomes float32 exactly."""
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
    # np.array copies: the tensor must not share memory with the caller's array.
    return {name: torch.from_numpy(np.array(array)).to(dtypes[name]) for name, array in arrays.items()}
