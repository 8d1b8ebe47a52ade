"""Encode and decode wire messages; one reusable decoder per queue family.

Decoding succeeds in one msgspec pass for good input. Only when it fails do we
look closer, so that the error says *why* (malformed, unknown kind, version...).
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar, Union

import msgspec

from schemas.errors import SchemaError
from schemas.messages import (
    SCHEMA_VERSION,
    AdapterUpdate,
    AggregatedAdapter,
    GenerationBatch,
    Heartbeat,
    Join,
    Message,
    ParticipantReport,
    PseudoLabels,
    RoundClosed,
    RoundOpened,
)

SUPPORTED_VERSIONS = frozenset({SCHEMA_VERSION})

# Whole-body limits, checked before any parsing.
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_ADAPTER_BODY_BYTES = 128 * 1024 * 1024

GENERATION_MESSAGES: tuple[type[Message], ...] = (GenerationBatch,)
CONTROL_MESSAGES: tuple[type[Message], ...] = (Join, Heartbeat, ParticipantReport, AdapterUpdate)
REPLY_MESSAGES: tuple[type[Message], ...] = (
    RoundOpened,
    PseudoLabels,
    RoundClosed,
    AggregatedAdapter,
)

M = TypeVar("M", bound=Message)

_encoder = msgspec.msgpack.Encoder()


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


class Codec(Generic[M]):
    """Decoder for the union of message kinds one queue accepts."""

    def __init__(self, kinds: tuple[type[M], ...], max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
            Union[kinds] if len(kinds) > 1 else kinds[0]  # noqa: UP007 - runtime union of a tuple
        )
        self._kinds = {str(k.__struct_config__.tag): k for k in kinds}
        self.max_body_bytes = max_body_bytes

    def decode(self, body: bytes) -> M:
        if len(body) > self.max_body_bytes:
            raise SchemaError("too_large", f"body is {len(body)} bytes, limit {self.max_body_bytes}")
        try:
            message: M = self._decoder.decode(body)
        except msgspec.DecodeError as e:
            raise self._explain(body, e) from e
        except UnicodeDecodeError as e:  # msgspec raises it, not DecodeError, for a bad str payload
            raise _bad_utf8(e) from e
        except RecursionError as e:  # msgspec's guard on nesting depth
            raise _too_deep() from e
        if message.schema_version not in SUPPORTED_VERSIONS:
            raise SchemaError(
                "unsupported_version",
                f"schema_version {message.schema_version}; this build reads {sorted(SUPPORTED_VERSIONS)}",
            )
        return message

    def _explain(self, body: bytes, error: msgspec.DecodeError) -> SchemaError:
        try:
            raw = msgspec.msgpack.decode(body)
        except msgspec.DecodeError as e:
            return SchemaError("malformed", f"not valid msgpack ({e})")
        except UnicodeDecodeError as e:
            return _bad_utf8(e)
        except RecursionError:
            return _too_deep()
        if not isinstance(raw, dict) or not isinstance(raw.get("kind"), str):
            return SchemaError("not_a_message", "expected a msgpack map with a string `kind`")
        version = raw.get("schema_version", SCHEMA_VERSION)
        if isinstance(version, int) and version not in SUPPORTED_VERSIONS:
            return SchemaError(
                "unsupported_version",
                f"schema_version {version}; this build reads {sorted(SUPPORTED_VERSIONS)}",
            )
        if raw["kind"] not in self._kinds:
            return SchemaError(
                "unknown_kind",
                f"kind {raw['kind']!r} not accepted here; expected one of {sorted(self._kinds)}",
            )
        text = str(error)
        if "length" in text and ("<=" in text or "too" in text.lower()):
            return SchemaError("too_large", text)
        return SchemaError("invalid", text)


def _bad_utf8(error: UnicodeDecodeError) -> SchemaError:
    return SchemaError("malformed", f"a string is not valid UTF-8 ({error})")


def _too_deep() -> SchemaError:
    return SchemaError("too_large", "msgpack nested deeper than the decoder allows")


_generation_codec: Codec[GenerationBatch] = Codec(GENERATION_MESSAGES)  # type: ignore[arg-type]
_control_codec: Codec[Message] = Codec(CONTROL_MESSAGES, max_body_bytes=MAX_ADAPTER_BODY_BYTES)
_reply_codec: Codec[Message] = Codec(REPLY_MESSAGES, max_body_bytes=MAX_ADAPTER_BODY_BYTES)


def decode_generation(body: bytes) -> GenerationBatch:
    return _generation_codec.decode(body)


def decode_control(body: bytes) -> Message:
    return _control_codec.decode(body)


def decode_reply(body: bytes) -> Message:
    return _reply_codec.decode(body)
