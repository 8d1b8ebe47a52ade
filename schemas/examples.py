"""One example of every wire message, shared by the pinned-bytes tests and the golden files.

`tests/test_schemas.py` pins the sha256 of each example's encoding, and `schemas.contract` writes the
same bytes as `schemas/golden/valid/<kind>.msgpack`: changing an example changes both, on purpose.
"""

from __future__ import annotations

from typing import TypedDict

from schemas.messages import (
    AdapterUpdate,
    AggregatedAdapter,
    Answer,
    GenerationBatch,
    GenerationParams,
    Heartbeat,
    Join,
    Label,
    Message,
    ParticipantReport,
    Prompt,
    PromptShard,
    PseudoLabels,
    RoundClosed,
    RoundOpened,
    ShardOutcome,
    Tensor,
)


class _Common(TypedDict):
    federation: str
    round_id: int
    message_id: str


BASE: _Common = {"federation": "demo", "round_id": 3, "message_id": "m-1"}

EXAMPLES: list[Message] = [
    RoundOpened(
        **BASE,
        participant_id="coordinator",
        shards=[PromptShard(shard_id=0, prompts=[Prompt(prompt_id="p1", text="What is 2+2?")])],
        generation=GenerationParams(max_new_tokens=32),
        expected=["alice", "bob"],
        quorum=2,
        deadline_unix=1_800_000_060.0,
        opened_unix=1_800_000_000.0,
    ),
    GenerationBatch(
        **BASE,
        participant_id="alice",
        shard_id=0,
        model_id="smollm2-135m-instruct",
        answers=[Answer(prompt_id="p1", text="Four.", prompt_tokens=9, completion_tokens=2)],
    ),
    PseudoLabels(
        **BASE,
        participant_id="coordinator",
        shard_id=0,
        labels=[Label(prompt_id="p1", text="Four.", confidence=0.91, support=2, source="alice")],
        abstained=["p2"],
    ),
    RoundClosed(
        **BASE,
        participant_id="coordinator",
        shards=[ShardOutcome(shard_id=0, status="labelled", answered=["alice", "bob"], labelled=1)],
        answered=["alice", "bob"],
        late=["carol"],
        agreement={"alice": 0.9, "bob": 0.8},
        bytes_received={"alice": 120},
        bytes_sent={"alice": 300},
        opened_unix=1_800_000_000.0,
        closed_unix=1_800_000_030.0,
    ),
    Join(**BASE, participant_id="alice", model_id="tiny-llama"),
    Heartbeat(**BASE, participant_id="alice", sent_unix=1_800_000_001.5),
    ParticipantReport(**BASE, participant_id="alice", metrics={"rouge_l": 0.25}, train_samples=40),
    AdapterUpdate(
        **BASE,
        participant_id="alice",
        tensors=[Tensor(name="lora_A", dtype="float32", shape=[1, 2], data=b"\x00" * 8)],
        num_samples=10,
    ),
    AggregatedAdapter(
        **BASE,
        participant_id="coordinator",
        tensors=[Tensor(name="lora_A", dtype="float16", shape=[2], data=b"\x00" * 4)],
        contributors=["alice"],
    ),
]


def kind_of(message: Message | type[Message]) -> str:
    """The `kind` tag of a message or message type."""
    return str(message.__struct_config__.tag)


def example(kind: str) -> Message:
    """The example of the message tagged `kind`."""
    return next(m for m in EXAMPLES if kind_of(m) == kind)
