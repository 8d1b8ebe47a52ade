"""Hypothesis strategies for hostile traffic to a coordinator, each payload with the reason it must earn.

A `Hostile` is one publish a participant's connection can make (its own routing keys, so the broker
lets it through) that the coordinator must dead-letter. `expected` is the exact `x-chorus-reason`,
or its prefix when the tail is the decoder's own wording (`schema <problem>: ...`).
The reasons assume the round `round_id` is open, has shards `0..shards-1`, and `outsider` is not in it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import msgspec
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from broker.topology import control_key, generation_key
from schemas.messages import SCHEMA_VERSION

GOOD_KINDS = {"generation_batch", "join", "heartbeat", "participant_report", "adapter_update"}
REPLY_KINDS = ["round_opened", "pseudo_labels", "round_closed", "aggregated_adapter"]
MAX_BODY = 4 * 1024 * 1024


@dataclass(frozen=True)
class Hostile:
    category: str
    user: str  # whose connection publishes it
    routing_key: str
    body: bytes
    expected: str
    exact: bool  # `expected` is the whole reason (else a prefix)
    without_user_id: bool = False  # published with no AMQP user_id property at all

    def matches(self, reason: str) -> bool:
        return reason == self.expected if self.exact else reason.startswith(self.expected)


@dataclass(frozen=True)
class Target:
    federation: str
    round_id: int
    shards: int
    members: tuple[str, ...]  # broker users in the round
    outsider: str  # a broker user that never joined


ids = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=1, max_size=64)
texts = st.text(max_size=40)
ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
wrong_for_str = st.one_of(ints, st.none(), st.booleans(), st.lists(ints, max_size=3), st.binary(max_size=8))
wrong_for_int = st.one_of(
    texts, st.none(), st.floats(allow_nan=False), st.lists(ints, max_size=3), st.booleans()
)
wrong_for_list = st.one_of(ints, texts, st.none(), st.dictionaries(texts, ints, max_size=2))


CATEGORIES = (
    "random_bytes",
    "truncated",
    "not_a_map",
    "wrong_type",
    "missing_field",
    "bad_id",
    "huge_text",
    "huge_list",
    "unknown_kind",
    "wrong_version",
    "unknown_round",
    "foreign_participant",
    "missing_user_id",
    "wrong_federation",
    "shard_mismatch",
    "repeated_prompt",
    "unknown_prompt",
    "not_expected",
    "adapter_in_semantic",
    "deep_nesting",
)
# Strategies are built once: building them inside every draw costs more than drawing.
_categories = st.sampled_from(CATEGORIES)
_message_ids = st.text(min_size=1, max_size=40)
_model_ids = st.text(max_size=20)
_booleans = st.booleans()
_random_bodies = st.binary(max_size=300)
_not_maps = st.one_of(ints, texts, st.lists(ints, max_size=4), st.none())
_wrong_kinds = st.one_of(ints, st.none(), st.lists(texts, max_size=2))
_typed_fields = st.sampled_from(
    ["federation", "round_id", "message_id", "participant_id", "shard_id", "model_id", "answers", "answer"]
)
_required_fields = st.sampled_from(
    ["federation", "round_id", "message_id", "participant_id", "shard_id", "model_id", "answers"]
)
# At most 64 characters (an Id's limit), so the id is refused for its characters, never for its length.
_bad_ids = st.one_of(
    st.just(""), st.tuples(texts, st.sampled_from(". /*"), texts).map(lambda t: t[0][:31] + t[1] + t[2][:32])
)
_id_fields = st.sampled_from(["federation", "participant_id"])
_limited_fields = st.sampled_from(
    [
        ("answer", 8192),
        ("model_id", 256),
        ("participant_id", 64),
        ("federation", 64),
        ("message_id", 128),
        ("prompt_id", 128),
    ]
)
_overrun = st.integers(1, 5000)
_fill = st.sampled_from("abz09_-")
_list_overrun = st.integers(1, 100)
_list_items: st.SearchStrategy[Any] = st.sampled_from([0, {}, {"prompt_id": "p", "text": ""}, "x"])
_unknown_kinds = st.one_of(st.sampled_from(REPLY_KINDS), texts.filter(lambda k: k not in GOOD_KINDS))
_control_kinds = st.sampled_from(["join", "heartbeat", "participant_report", "adapter_update"])
_versions = st.integers(-(2**63), 2**64 - 1)
_round_ids = st.integers(0, 2**64 - 1)
_shard_ids = st.integers(0, 1022)
_prompt_ids = st.text(min_size=1, max_size=20)
_repeats = st.integers(2, 4)
_unknown_prompts = st.lists(_prompt_ids.map(lambda p: "zz-" + p), min_size=1, max_size=5, unique=True)
_tensor_names = st.text(min_size=1, max_size=10)
_samples = st.integers(1, 10**6)
_depths = st.integers(2_000, 20_000)
_cuts = st.integers(0, 2**32)


def _pack(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


def _schema(problem: str) -> str:
    return f"schema {problem}: "


def _other(value: str, avoid: str) -> str:
    return value if value != avoid else value + "x"


class _Replay:
    """A draw function that replays its first pass's values on later passes (one family of payloads)."""

    def __init__(self, draw: st.DrawFn) -> None:
        self._draw = draw
        self._values: list[Any] = []
        self._next = 0

    def __call__(self, strategy: st.SearchStrategy[Any]) -> Any:
        if self._next == len(self._values):
            self._values.append(self._draw(strategy))
        value = self._values[self._next]
        self._next += 1
        return value

    def rewind(self) -> None:
        self._next = 0


@st.composite
def hostile_family(draw: st.DrawFn, target: Target) -> list[Hostile]:
    """One drawn attack, sent by each broker user in turn (its own keys, its own identity checks)."""
    pick = _Replay(draw)
    family = []
    for user in (*target.members, target.outsider):
        pick.rewind()
        family.append(_hostile(pick, target, user))
    return family


def _hostile(draw: _Replay, target: Target, user: str) -> Hostile:
    users = [*target.members, target.outsider]
    shard = draw(st.integers(0, target.shards - 1))
    gen = generation_key(shard, user)
    ctl = control_key(user)
    key = ctl if draw(_booleans) else gen
    category = draw(_categories)
    batch: dict[str, Any] = {
        "kind": "generation_batch",
        "schema_version": SCHEMA_VERSION,
        "federation": target.federation,
        "round_id": target.round_id,
        "message_id": draw(_message_ids),
        "participant_id": user,
        "shard_id": shard,
        "model_id": draw(_model_ids),
        "answers": [],
    }
    beat = {
        "kind": "heartbeat",
        "federation": target.federation,
        "round_id": 0,
        "message_id": batch["message_id"],
        "participant_id": user,
        "sent_unix": 1.0,
    }
    message = beat if key == ctl else batch  # what the key's queue accepts

    if category == "random_bytes":
        body = draw(_random_bodies)
        try:
            raw = msgspec.msgpack.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return Hostile(category, user, key, body, _schema("malformed"), False)
        if isinstance(raw, dict) and isinstance(raw.get("kind"), str):
            return Hostile(category, user, key, body, "schema ", False)  # a lucky map: some schema problem
        return Hostile(category, user, key, body, _schema("not_a_message"), False)
    if category == "truncated":
        whole = _pack(batch | {"answers": [{"prompt_id": "p", "text": draw(texts)}]})
        cut = draw(_cuts) % len(whole)  # a fraction of the body: the replayed value fits every sender
        return Hostile(category, user, gen, whole[:cut], _schema("malformed"), False)
    if category == "not_a_map":
        value: Any = draw(_not_maps)
        if draw(_booleans):
            value = batch | {"kind": draw(_wrong_kinds)}
        return Hostile(category, user, key, _pack(value), _schema("not_a_message"), False)
    if category == "wrong_type":
        field = draw(_typed_fields)
        if field in ("round_id", "shard_id"):
            batch[field] = draw(wrong_for_int)
        elif field == "answers":
            batch[field] = draw(wrong_for_list)
        elif field == "answer":
            batch["answers"] = [{"prompt_id": draw(wrong_for_str), "text": "x"}]
        else:
            batch[field] = draw(wrong_for_str)
        return Hostile(category, user, gen, _pack(batch), _schema("invalid"), False)
    if category == "missing_field":
        del batch[draw(_required_fields)]
        return Hostile(category, user, gen, _pack(batch), _schema("invalid"), False)
    if category == "bad_id":
        batch[draw(_id_fields)] = draw(_bad_ids)
        return Hostile(category, user, gen, _pack(batch), _schema("invalid"), False)
    if category == "huge_text":
        field, limit = draw(_limited_fields)
        text = draw(_fill) * (limit + draw(_overrun))
        if field == "answer":
            batch["answers"] = [{"prompt_id": "p", "text": text}]
        elif field == "prompt_id":
            batch["answers"] = [{"prompt_id": text, "text": "x"}]
        else:
            batch[field] = text
        return Hostile(category, user, gen, _pack(batch), _schema("too_large"), False)
    if category == "huge_list":
        batch["answers"] = [draw(_list_items)] * (4096 + draw(_list_overrun))
        return Hostile(category, user, gen, _pack(batch), _schema("too_large"), False)
    if category == "unknown_kind":
        kind = draw(_unknown_kinds)
        if key == gen and draw(_booleans):
            kind = draw(_control_kinds)
        if key == ctl and draw(_booleans):
            kind = "generation_batch"
        return Hostile(category, user, key, _pack(batch | {"kind": kind}), _schema("unknown_kind"), False)
    if category == "wrong_version":
        version = draw(_versions)
        version = version if version != SCHEMA_VERSION else 0
        body = _pack(batch | {"schema_version": version})
        return Hostile(category, user, gen, body, _schema("unsupported_version"), False)
    if category == "unknown_round":
        round_id = draw(_round_ids)
        round_id = round_id if round_id != target.round_id else 0
        expected = f"round {round_id} is not open (open round: {target.round_id})"
        return Hostile(category, user, gen, _pack(batch | {"round_id": round_id}), expected, True)
    if category == "foreign_participant":
        claimed = _other(draw(st.one_of(st.sampled_from(users), ids)), user)
        expected = f"user_id {user!r} does not match participant_id {claimed!r}"
        return Hostile(category, user, key, _pack(message | {"participant_id": claimed}), expected, True)
    if category == "missing_user_id":
        expected = f"user_id is missing; participant {user!r} must publish with its own login"
        return Hostile(category, user, key, _pack(message), expected, True, without_user_id=True)
    if category == "wrong_federation":
        federation = _other(draw(ids), target.federation)
        expected = f"federation {federation!r} is not this federation ({target.federation!r})"
        return Hostile(category, user, key, _pack(message | {"federation": federation}), expected, True)
    if category == "shard_mismatch":
        other = draw(_shard_ids)
        other = other if other < shard else other + 1
        expected = f"routing key {gen!r} does not match shard_id {other}"
        return Hostile(category, user, gen, _pack(batch | {"shard_id": other}), expected, True)
    if category == "repeated_prompt":
        prompt = draw(_prompt_ids)
        answers = [{"prompt_id": prompt, "text": draw(texts)} for _ in range(draw(_repeats))]
        body = _pack(batch | {"answers": answers})
        return Hostile(category, user, gen, body, "answers repeat a prompt_id", True)
    if category == "unknown_prompt":
        prompts = draw(_unknown_prompts)
        answers = [{"prompt_id": p, "text": "x"} for p in prompts]
        expected = f"answers name prompts not in shard {shard}: {sorted(prompts)[:3]}"
        return Hostile(category, user, gen, _pack(batch | {"answers": answers}), expected, True)
    if category == "not_expected":
        user = target.outsider
        body = _pack(batch | {"participant_id": user})
        expected = f"not_expected: shard {shard} of round {target.round_id}"
        return Hostile(category, user, generation_key(shard, user), body, expected, True)
    if category == "adapter_in_semantic":
        tensor = {"name": draw(_tensor_names), "dtype": "float32", "shape": [1], "data": b"\x00" * 4}
        body = _pack(
            {
                "kind": "adapter_update",
                "federation": target.federation,
                "round_id": target.round_id,
                "message_id": batch["message_id"],
                "participant_id": user,
                "tensors": [tensor],
                "num_samples": draw(_samples),
            }
        )
        expected = "adapter updates are only taken in a fedavg federation"
        return Hostile(category, user, ctl, body, expected, True)
    assert category == "deep_nesting"
    nested = b"\x91" * draw(_depths) + b"\x01"
    if draw(_booleans):  # as the value of an unknown field of a batch
        nested = b"\x82\xa4kind\xb0generation_batch\xa5model" + nested
    return Hostile(category, user, key, nested, _schema("too_large"), False)


def oversized_bodies(target: Target, user: str) -> list[Hostile]:
    """Bodies over the 4 MiB generation limit, refused before parsing (a few: they are big)."""
    key = generation_key(0, user)
    return [
        Hostile("huge_body", user, key, fill * size, _schema("too_large"), False)
        for fill, size in ((b"\x00", MAX_BODY + 1), (b"\x91", MAX_BODY + 4096), (b"\xc1", MAX_BODY * 3 // 2))
    ]


class _Enough(Exception):
    pass


def draw_hostile(target: Target, count: int) -> list[Hostile]:
    """`count` distinct hostile payloads (distinct in who publishes what, where, and how)."""
    found: dict[tuple[str, str, bytes, bool], Hostile] = {}

    @settings(
        max_examples=count,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(hostile_family(target))
    def collect(family: list[Hostile]) -> None:
        for payload in family:
            found.setdefault(
                (payload.user, payload.routing_key, payload.body, payload.without_user_id), payload
            )
        if len(found) >= count:
            raise _Enough

    with contextlib.suppress(_Enough):
        collect()
    return list(found.values())[:count]
