"""Typed decoders for the bodies the coordinator keeps in its store.

Each body was checked when it arrived (intake) or made by the coordinator itself, so reading it back
needs its type, not a guess: a body of another kind is a `SchemaError`, never an `assert`.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import msgspec

from schemas.errors import SchemaError
from schemas.messages import AdapterUpdate, Message, PseudoLabels, RoundClosed, RoundOpened

M = TypeVar("M", bound=Message)


class StoredDecoder(Generic[M]):
    """A msgspec decoder of one message kind whose errors are `SchemaError`s that name it."""

    def __init__(self, kind: type[M]) -> None:
        self._decoder = msgspec.msgpack.Decoder(kind)
        self._name = kind.__name__

    def decode(self, body: bytes) -> M:
        try:
            return self._decoder.decode(body)
        except msgspec.DecodeError as e:
            raise SchemaError("invalid", f"a stored {self._name} does not decode: {e}") from e


announcement = StoredDecoder(RoundOpened)
summary = StoredDecoder(RoundClosed)
pseudo_labels = StoredDecoder(PseudoLabels)
adapter_update = StoredDecoder(AdapterUpdate)
