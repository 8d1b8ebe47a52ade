"""Every exchange, queue and binding of a Chorus deployment, declared in one place.

`deploy/rabbitmq/definitions.json` is generated from this module (and a test
fails if the two drift).
"""

from __future__ import annotations

from collections.abc import Iterable

from broker.transport import BindingSpec, ExchangeSpec, QueueSpec, Topology

# Participants -> coordinator: generations and control traffic.
UP_EXCHANGE = "chorus.up"
# Coordinator -> one participant (pseudo-labels, adapters) and -> all (announcements).
DIRECT_EXCHANGE = "chorus.down"
ANNOUNCE_EXCHANGE = "chorus.announce"
DEAD_LETTER_EXCHANGE = "chorus.dlx"
DEAD_LETTER_QUEUE = "chorus.dead"
CONTROL_QUEUE = "chorus.control"
DEAD_LETTER_KEY = "dead"

DEFAULT_SHARDS = 4
DEFAULT_DELIVERY_LIMIT = 5
COORDINATOR_USER = "coordinator"


def generation_key(shard_id: int, participant_id: str) -> str:
    return f"gen.{shard_id}.{participant_id}"


def control_key(participant_id: str) -> str:
    return f"ctl.{participant_id}"


def reply_key(participant_id: str) -> str:
    return f"reply.{participant_id}"


# The routing key of a reply sent to several participants in one publish, their reply keys in BCC. No
# queue is bound to it, and no participant id makes `reply.<id>` equal to it.
SHARED_REPLY_KEY = "reply"
# Reply keys per publish: the BCC header must fit in one AMQP frame (frame_max, 128 KiB by default),
# and 256 keys of at most 70 characters take under 20 KiB.
MAX_BCC_KEYS = 256


def shard_queue(shard_id: int) -> str:
    return f"chorus.gen.{shard_id}"


def reply_queue(participant_id: str) -> str:
    return f"chorus.reply.{participant_id}"


def participant_topic_pattern(participant_id: str) -> str:
    """Routing keys a participant may publish with (RabbitMQ topic permission regex)."""
    return rf"^(gen\.[0-9]+|ctl)\.{participant_id}$"


def _work_queue(name: str, delivery_limit: int) -> QueueSpec:
    return QueueSpec(
        name=name,
        quorum=True,
        delivery_limit=delivery_limit,
        dead_letter_exchange=DEAD_LETTER_EXCHANGE,
        dead_letter_routing_key=DEAD_LETTER_KEY,
    )


def core_topology(shards: int = DEFAULT_SHARDS, delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> Topology:
    """What the coordinator needs before any participant exists."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    queues = [_work_queue(shard_queue(s), delivery_limit) for s in range(shards)]
    queues.append(_work_queue(CONTROL_QUEUE, delivery_limit))
    queues.append(QueueSpec(name=DEAD_LETTER_QUEUE, quorum=True))
    bindings = [BindingSpec(shard_queue(s), UP_EXCHANGE, f"gen.{s}.*") for s in range(shards)]
    bindings.append(BindingSpec(CONTROL_QUEUE, UP_EXCHANGE, "ctl.*"))
    bindings.append(BindingSpec(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, DEAD_LETTER_KEY))
    return Topology(
        exchanges=(
            ExchangeSpec(UP_EXCHANGE, "topic"),
            ExchangeSpec(DIRECT_EXCHANGE, "direct"),
            ExchangeSpec(ANNOUNCE_EXCHANGE, "fanout"),
            ExchangeSpec(DEAD_LETTER_EXCHANGE, "direct"),
        ),
        queues=tuple(queues),
        bindings=tuple(bindings),
    )


def participant_topology(
    participant_ids: Iterable[str], delivery_limit: int = DEFAULT_DELIVERY_LIMIT
) -> Topology:
    """Each participant's reply queue, bound for direct replies and for announcements."""
    queues: list[QueueSpec] = []
    bindings: list[BindingSpec] = []
    for pid in participant_ids:
        queues.append(_work_queue(reply_queue(pid), delivery_limit))
        bindings.append(BindingSpec(reply_queue(pid), DIRECT_EXCHANGE, reply_key(pid)))
        bindings.append(BindingSpec(reply_queue(pid), ANNOUNCE_EXCHANGE, ""))
    return Topology(queues=tuple(queues), bindings=tuple(bindings))


def full_topology(
    participant_ids: Iterable[str],
    shards: int = DEFAULT_SHARDS,
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
) -> Topology:
    return core_topology(shards, delivery_limit).merged(participant_topology(participant_ids, delivery_limit))
