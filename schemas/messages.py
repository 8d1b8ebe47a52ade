"""Every message that crosses the wire, as frozen msgspec structs tagged by `kind`.

Evolution rules (PROTOCOL.md, "Schema evolution"): a new field gets a default; a
field never changes type; a tag is never reused. Decoders ignore fields they do
not know, so an older reader accepts a newer writer's additions.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

SCHEMA_VERSION = 1

# Ids travel inside routing keys and queue names, so they may not contain dots. A participant id is
# also its broker user name: broker.definitions refuses any other with the same pattern and length.
ID_CHARS = "A-Za-z0-9_-"
ID_PATTERN = rf"^[{ID_CHARS}]+$"
ID_MAX_LENGTH = 64
Id = Annotated[str, Meta(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)]
MessageId = Annotated[str, Meta(min_length=1, max_length=128)]
PromptId = Annotated[str, Meta(min_length=1, max_length=128)]
PromptText = Annotated[str, Meta(max_length=8_192)]
AnswerText = Annotated[str, Meta(max_length=8_192)]
ShortText = Annotated[str, Meta(max_length=256)]
RoundId = Annotated[int, Meta(ge=0)]
ShardId = Annotated[int, Meta(ge=0, le=1023)]
Count = Annotated[int, Meta(ge=0)]
Unit = Annotated[float, Meta(ge=-1.0, le=1.0)]
# Bounds also refuse NaN and infinity, which would poison whatever sums or compares them.
Seconds = Annotated[float, Meta(ge=0.0, le=1e12)]
Finite = Annotated[float, Meta(ge=-1e300, le=1e300)]

MAX_PROMPTS_PER_SHARD = 4_096
MAX_PARTICIPANTS = 10_000
MAX_TENSORS = 4_096
MAX_METRICS = 64


def new_message_id() -> str:
    return uuid.uuid4().hex


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", forbid_unknown_fields=False):
    """Fields every message carries. `participant_id` is the sender ("coordinator" for it)."""

    schema_version: int = SCHEMA_VERSION
    federation: Id
    round_id: RoundId
    message_id: MessageId
    participant_id: Id


# ---- parts -----------------------------------------------------------------


class Prompt(msgspec.Struct, frozen=True, kw_only=True):
    prompt_id: PromptId
    text: PromptText


class PromptShard(msgspec.Struct, frozen=True, kw_only=True):
    shard_id: ShardId
    prompts: Annotated[list[Prompt], Meta(max_length=MAX_PROMPTS_PER_SHARD)]


class GenerationParams(msgspec.Struct, frozen=True, kw_only=True):
    max_new_tokens: Annotated[int, Meta(ge=1, le=4_096)] = 64
    temperature: Annotated[float, Meta(ge=0.0, le=10.0)] = 0.0  # 0 means greedy
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    seed: Count = 0


# The answering model's mean log-probability per generated token (nats, <= 0); bounded so that a
# hostile value cannot be infinite or NaN.
MIN_LOGPROB = -1.0e4
LogProb = Annotated[float, Meta(ge=MIN_LOGPROB, le=0.0)]


# omit_defaults: an answer without a logprob (and with its token counts) encodes exactly as before the
# field existed; a key left out at its default decodes to that default.
class Answer(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    prompt_id: PromptId
    text: AnswerText
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    logprob: LogProb | None = None  # optional; consensus may prefer answers their models are sure of


class Label(msgspec.Struct, frozen=True, kw_only=True):
    prompt_id: PromptId
    text: AnswerText
    confidence: Unit
    support: Count  # how many answers agreed with the label
    source: Id  # participant whose answer became the label


class ShardOutcome(msgspec.Struct, frozen=True, kw_only=True):
    shard_id: ShardId
    status: Literal["labelled", "failed"]
    reason: ShortText = ""
    answered: Annotated[list[Id], Meta(max_length=MAX_PARTICIPANTS)] = []
    labelled: Count = 0
    abstained: Count = 0


class Tensor(msgspec.Struct, frozen=True, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=512)]
    dtype: Literal["float32", "float16", "bfloat16"]
    shape: Annotated[list[Annotated[int, Meta(ge=0)]], Meta(max_length=8)]
    data: bytes


# ---- coordinator -> participants -----------------------------------------


class RoundOpened(Message, frozen=True, kw_only=True, tag="round_opened"):
    # What the round asks of a member, an open set (PROTOCOL.md §5.4): "semantic" and "majority" (answer
    # the prompts, train on the labels), "fedavg" (send an adapter, load the average). A participant
    # that does not know the name decodes the round and sits it out, rather than refusing it.
    strategy: Id = "semantic"
    shards: Annotated[list[PromptShard], Meta(max_length=1_024)]
    generation: GenerationParams = GenerationParams()
    expected: Annotated[list[Id], Meta(max_length=MAX_PARTICIPANTS)]
    quorum: Annotated[int, Meta(ge=1)]
    deadline_unix: Seconds  # wall clock, seconds since the epoch
    opened_unix: Seconds
    # The federation run: made with the coordinator's state, the same across its restarts, new with a
    # new state. Round ids (and so message ids) start again at 1 in a new run: a participant holding
    # state for another run starts this one afresh. UNSET is never encoded, so an announcement without
    # a run id (an older coordinator's) is the same bytes as before the field existed.
    run_id: Id | UnsetType = UNSET

    def announced_run(self) -> str | None:
        """The run id, or None when the coordinator did not say."""
        return self.run_id if isinstance(self.run_id, str) else None


class PseudoLabels(Message, frozen=True, kw_only=True, tag="pseudo_labels"):
    shard_id: ShardId
    labels: Annotated[list[Label], Meta(max_length=MAX_PROMPTS_PER_SHARD)]
    abstained: Annotated[list[PromptId], Meta(max_length=MAX_PROMPTS_PER_SHARD)] = []
    # Why each abstained prompt has no label (prompt id -> the consensus's reason), for people reading
    # a report; no decision depends on it. UNSET is never encoded, so labels without abstentions (or an
    # older coordinator's) are the same bytes as before the field existed.
    abstain_reasons: (
        Annotated[dict[PromptId, ShortText], Meta(max_length=MAX_PROMPTS_PER_SHARD)] | UnsetType
    ) = UNSET
    # 0: the shard's labels. 1: a revision, sent a round later, of the labels that late answers changed
    # (late_policy "revise"): train on it once, like any labels.
    revision: Annotated[int, Meta(ge=0, le=1)] = 0

    def abstain_reason(self, prompt_id: str) -> str:
        """Why `prompt_id` abstained, or "" when the coordinator did not say."""
        return self.abstain_reasons.get(prompt_id, "") if isinstance(self.abstain_reasons, dict) else ""


class RoundClosed(Message, frozen=True, kw_only=True, tag="round_closed"):
    shards: Annotated[list[ShardOutcome], Meta(max_length=1_024)]
    answered: Annotated[list[Id], Meta(max_length=MAX_PARTICIPANTS)]
    late: Annotated[list[Id], Meta(max_length=MAX_PARTICIPANTS)] = []
    missing: Annotated[list[Id], Meta(max_length=MAX_PARTICIPANTS)] = []
    agreement: dict[Id, Unit] = {}
    bytes_received: dict[Id, Count] = {}
    bytes_sent: dict[Id, Count] = {}
    opened_unix: Seconds
    closed_unix: Seconds
    consensus_seconds: Seconds = 0.0
    final: bool = False  # the federation's last round: no RoundOpened follows


class AggregatedAdapter(Message, frozen=True, kw_only=True, tag="aggregated_adapter"):
    """FedAvg baseline: the weighted mean of the adapters received this round."""

    tensors: Annotated[list[Tensor], Meta(max_length=MAX_TENSORS)]
    contributors: Annotated[list[Id], Meta(max_length=MAX_PARTICIPANTS)]


# ---- participants -> coordinator -----------------------------------------


class Join(Message, frozen=True, kw_only=True, tag="join"):
    """Sent once at start-up; round_id is the last round the participant finished (0 if none)."""

    model_id: ShortText
    can_train: bool = True


class Heartbeat(Message, frozen=True, kw_only=True, tag="heartbeat"):
    sent_unix: Seconds


class GenerationBatch(Message, frozen=True, kw_only=True, tag="generation_batch"):
    shard_id: ShardId
    model_id: ShortText
    answers: Annotated[list[Answer], Meta(max_length=MAX_PROMPTS_PER_SHARD)]


class ParticipantReport(Message, frozen=True, kw_only=True, tag="participant_report"):
    metrics: Annotated[dict[Annotated[str, Meta(max_length=64)], Finite], Meta(max_length=MAX_METRICS)]
    train_samples: Count = 0
    train_seconds: Seconds = 0.0
    generate_seconds: Seconds = 0.0


class AdapterUpdate(Message, frozen=True, kw_only=True, tag="adapter_update"):
    """FedAvg baseline: a participant's LoRA adapter after local training."""

    tensors: Annotated[list[Tensor], Meta(max_length=MAX_TENSORS)]
    num_samples: Annotated[int, Meta(ge=1)]
