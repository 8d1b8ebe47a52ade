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
# Control messages other than an adapter (a Join, a Heartbeat, a report) are small: at their field
# limits they take well under this, so a larger one is refused before it is parsed.
MAX_SMALL_CONTROL_BYTES = 64 * 1024

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


class _Envelope(msgspec.Struct):
    """The two fields an error is explained with; decoding it skips every other value unbuilt, so
    explaining costs no more memory than rejecting."""

    kind: object = None
    schema_version: object = None


_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)
# Up to this size an error is explained from a full generic decode (which finds any flaw, a bad UTF-8
# string anywhere say); above it from the envelope alone, so that the explanation of a hostile body of
# millions of keys costs no more than its rejection.
FULL_EXPLAIN_BYTES = 1024 * 1024


def _kind_and_version(body: bytes) -> tuple[object, object]:
    """The `kind` and `schema_version` of a body that failed to decode; raises what decoding raises."""
    if len(body) <= FULL_EXPLAIN_BYTES:
        raw = msgspec.msgpack.decode(body)
        if not isinstance(raw, dict):
            raise msgspec.ValidationError("not a map")
        return raw.get("kind"), raw.get("schema_version")
    envelope = _envelope_decoder.decode(body)
    return envelope.kind, envelope.schema_version


class Codec(Generic[M]):
    """Decoder for the union of message kinds one queue accepts.

    `max_body_bytes` bounds every body; `kind_limits` bounds the bodies of some kinds more tightly
    (checked from the `kind` field alone before the full decode, only for bodies above the smallest).
    """

    def __init__(
        self,
        kinds: tuple[type[M], ...],
        max_body_bytes: int = MAX_BODY_BYTES,
        kind_limits: dict[str, int] | None = None,
    ) -> None:
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
            Union[kinds] if len(kinds) > 1 else kinds[0]  # noqa: UP007 - runtime union of a tuple
        )
        self._kinds = {str(k.__struct_config__.tag): k for k in kinds}
        self.max_body_bytes = max_body_bytes
        self._kind_limits = dict(kind_limits or {})
        self._smallest_limit = min(self._kind_limits.values(), default=max_body_bytes)

    def decode(self, body: bytes) -> M:
        if len(body) > self.max_body_bytes:
            raise SchemaError("too_large", f"body is {len(body)} bytes, limit {self.max_body_bytes}")
        if len(body) > self._smallest_limit:
            self._check_kind_limit(body)
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

    def _check_kind_limit(self, body: bytes) -> None:
        try:
            kind = _envelope_decoder.decode(body).kind
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
            raise self._explain(body, e) from e
        limit = self._kind_limits.get(kind) if isinstance(kind, str) else None
        if limit is not None and len(body) > limit:
            raise SchemaError("too_large", f"a {kind} body is at most {limit} bytes, this one is {len(body)}")

    def _explain(self, body: bytes, error: Exception) -> SchemaError:
        try:
            kind, version = _kind_and_version(body)
        except msgspec.ValidationError:  # valid msgpack, but not a map with string keys
            return SchemaError("not_a_message", "expected a msgpack map with a string `kind`")
        except msgspec.DecodeError as e:
            return SchemaError("malformed", f"not valid msgpack ({e})")
        except UnicodeDecodeError as e:
            return _bad_utf8(e)
        except RecursionError:
            return _too_deep()
        if not isinstance(kind, str):
            return SchemaError("not_a_message", "expected a msgpack map with a string `kind`")
        version = SCHEMA_VERSION if version is None else version
        if isinstance(version, int) and version not in SUPPORTED_VERSIONS:
            return SchemaError(
                "unsupported_version",
                f"schema_version {version}; this build reads {sorted(SUPPORTED_VERSIONS)}",
            )
        if kind not in self._kinds:
            return SchemaError(
                "unknown_kind",
                f"kind {kind!r} not accepted here; expected one of {sorted(self._kinds)}",
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
_control_codec: Codec[Message] = Codec(
    CONTROL_MESSAGES,
    max_body_bytes=MAX_ADAPTER_BODY_BYTES,
    kind_limits={
        str(k.__struct_config__.tag): MAX_SMALL_CONTROL_BYTES
        for k in CONTROL_MESSAGES
        if k is not AdapterUpdate
    },
)
_reply_codec: Codec[Message] = Codec(REPLY_MESSAGES, max_body_bytes=MAX_ADAPTER_BODY_BYTES)


def decode_generation(body: bytes) -> GenerationBatch:
    return _generation_codec.decode(body)


def decode_control(body: bytes) -> Message:
    return _control_codec.decode(body)


def decode_reply(body: bytes) -> Message:
    return _reply_codec.decode(body)
