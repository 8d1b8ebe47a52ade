"""The wire contract: pinned bytes for one example of every message, and every decode error."""

from __future__ import annotations

import hashlib

import msgspec
import pytest

from schemas import (
    Message,
    PseudoLabels,
    SchemaError,
    decode_control,
    decode_generation,
    decode_reply,
    encode,
)
from schemas.examples import EXAMPLES

# sha256 of each example's encoding. A change here is a wire-format change:
# follow the evolution rules in PROTOCOL.md before updating a digest.
PINNED = {
    "round_opened": "682a1fe7265a2d0111a4fbe8280149a3a753d7925bf57555c2ed2218775902b9",
    "generation_batch": "bb92214216c63a283a9aaeacdff1e9ae6536d18e3d0208bbfd25c6e3235d81cb",
    "pseudo_labels": "70794368418ab13d7d8f6d40915a48e9a9330283025774799dade05aa54b6e3b",
    "round_closed": "2b4b10a268446b3c4b96197459e4494ca5df06e93bc9674f8ba7d4a816b67507",  # with `final`
    "join": "83cb555a91260475911cf6b9c581e38060026607cdb507c809c230d45fc2fb28",
    "heartbeat": "fee71c3e30a8d89ba9bf3df54fabd9a979037998cdd3f6734ee8181e0a1b4130",
    "participant_report": "1de4b5038a7dc43f77a3f465c62f67ffead762a7d843fda323b982481d269fef",
    "adapter_update": "89c9a0d62e1267b1c99d1ebb484af91066ca6be08f401646e9b332cdd98594e3",
    "aggregated_adapter": "a457f1bc8cc4f774183a0e9bc49275260dd2bfa82a9f58e26a93fbe6d6411d43",
}

DECODERS = {
    "round_opened": decode_reply,
    "pseudo_labels": decode_reply,
    "round_closed": decode_reply,
    "aggregated_adapter": decode_reply,
    "generation_batch": decode_generation,
    "join": decode_control,
    "heartbeat": decode_control,
    "participant_report": decode_control,
    "adapter_update": decode_control,
}


def kind_of(message: Message) -> str:
    return str(type(message).__struct_config__.tag)


@pytest.mark.parametrize("message", EXAMPLES, ids=kind_of)
def test_encoding_is_pinned(message: Message) -> None:
    body = encode(message)
    assert hashlib.sha256(body).hexdigest() == PINNED[kind_of(message)]


@pytest.mark.parametrize("message", EXAMPLES, ids=kind_of)
def test_round_trip(message: Message) -> None:
    assert DECODERS[kind_of(message)](encode(message)) == message


def test_every_message_kind_has_an_example() -> None:
    assert {kind_of(m) for m in EXAMPLES} == set(PINNED) == set(DECODERS)


def test_encoding_is_a_map_led_by_kind() -> None:
    raw = msgspec.msgpack.decode(encode(EXAMPLES[1]))
    assert next(iter(raw)) == "kind"
    assert raw["kind"] == "generation_batch" and raw["schema_version"] == 1


def test_newer_writer_fields_are_ignored() -> None:
    raw = msgspec.msgpack.decode(encode(EXAMPLES[1]))
    raw["added_in_v1_1"] = {"anything": [1, 2]}
    assert decode_generation(msgspec.msgpack.encode(raw)) == EXAMPLES[1]


def mutated(**changes: object) -> bytes:
    raw = msgspec.msgpack.decode(encode(EXAMPLES[1]))
    raw.update(changes)
    return msgspec.msgpack.encode(raw)


@pytest.mark.parametrize(
    ("body", "problem", "hint"),
    [
        (b"\xc1", "malformed", "msgpack"),
        (encode(EXAMPLES[1])[:-5], "malformed", "msgpack"),
        (msgspec.msgpack.encode([1, 2]), "not_a_message", "kind"),
        (msgspec.msgpack.encode({"kind": 7}), "not_a_message", "kind"),
        (mutated(kind="round_opened"), "unknown_kind", "round_opened"),
        (mutated(kind="nonsense"), "unknown_kind", "generation_batch"),
        (mutated(schema_version=2), "unsupported_version", "2"),
        (mutated(answers="x"), "invalid", "$.answers"),
        (mutated(round_id=-1), "invalid", "$.round_id"),
        (mutated(participant_id="a.b"), "invalid", "$.participant_id"),
        (mutated(message_id=None), "invalid", "$.message_id"),
        (mutated(model_id="x" * 300), "too_large", "$.model_id"),
        (
            mutated(answers=[{"prompt_id": "p", "text": "y" * 9000}]),
            "too_large",
            "$.answers[0].text",
        ),
        (mutated(answers=[{"prompt_id": "p", "text": "a"}] * 5000), "too_large", "$.answers"),
        (b"\x00" * (5 * 1024 * 1024), "too_large", "bytes"),
    ],
)
def test_decode_errors_name_the_problem(body: bytes, problem: str, hint: str) -> None:
    with pytest.raises(SchemaError) as caught:
        decode_generation(body)
    assert caught.value.problem == problem
    assert hint in str(caught.value)


def test_missing_field_is_invalid() -> None:
    raw = msgspec.msgpack.decode(encode(EXAMPLES[1]))
    del raw["shard_id"]
    with pytest.raises(SchemaError, match="shard_id") as caught:
        decode_generation(msgspec.msgpack.encode(raw))
    assert caught.value.problem == "invalid"


def test_messages_are_immutable() -> None:
    with pytest.raises(AttributeError):
        EXAMPLES[1].round_id = 4  # type: ignore[misc]


def test_labels_from_a_writer_before_revisions_decode_as_revision_0() -> None:
    labels = next(m for m in EXAMPLES if kind_of(m) == "pseudo_labels")
    older = msgspec.to_builtins(labels)
    del older["revision"]  # what a coordinator before label revisions wrote
    decoded = DECODERS["pseudo_labels"](msgspec.msgpack.encode(older))
    assert isinstance(decoded, PseudoLabels) and decoded.revision == 0 and decoded == labels
