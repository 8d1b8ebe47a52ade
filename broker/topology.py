"""Every exchange, queue and binding of a Chorus deployment, declared in one place.

`deploy/rabbitmq/definitions.json` is generated from this module and broker.definitions (a test
fails if it drifts).
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
DEAD_LETTER_KEY = "dead"
# The lobby: where the coordinator hears from participants it does not consume an intake queue of
# yet. It gets a copy of all control traffic (`ctl.*`: so a Join reaches a coordinator even when the
# sender's intake queue is left over from another coordinator, unconsumed) and whatever matches no
# binding of chorus.up (through this alternate exchange). The coordinator acks, unread, the copies from
# participants whose intake queue it consumes.
LOBBY_EXCHANGE = "chorus.lobby"
LOBBY_QUEUE = "chorus.lobby"

DEFAULT_DELIVERY_LIMIT = 5
COORDINATOR_USER = "coordinator"

# Bulkheads: every participant's traffic to the coordinator waits in a queue of its own, so a member
# that floods fills its own queue (then its publishes are refused) and never delays another member's.
# A member legitimately has a few messages per round waiting (a batch per shard, a report, heartbeats,
# more while the coordinator is down) and at most an adapter or two in bytes.
INTAKE_MAX_MESSAGES = 2_000
INTAKE_MAX_BYTES = 256 * 1024 * 1024
# The lobby keeps the newest of what it holds (a flood there drops the oldest copies, and never makes
# the broker refuse another member's publish); a Join is tiny.
LOBBY_MAX_MESSAGES = 10_000
LOBBY_MAX_BYTES = 16 * 1024 * 1024
# The dead-letter queue keeps the newest dead letters (their bodies cut short, see
# broker.transport.dead_letter_copy) and drops the oldest beyond these bounds.
DEAD_LETTER_MAX_MESSAGES = 10_000
DEAD_LETTER_MAX_BYTES = 64 * 1024 * 1024


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


def intake_queue(participant_id: str) -> str:
    """The queue holding everything one participant sends the coordinator."""
    return f"chorus.in.{participant_id}"


def reply_queue(participant_id: str) -> str:
    return f"chorus.reply.{participant_id}"


def participant_topic_pattern(participant_id: str) -> str:
    """Routing keys a participant may publish with (RabbitMQ topic permission regex)."""
    return rf"^(gen\.[0-9]+|ctl)\.{participant_id}$"


def _work_queue(
    name: str, delivery_limit: int, max_length: int | None = None, max_length_bytes: int | None = None
) -> QueueSpec:
    return QueueSpec(
        name=name,
        quorum=True,
        delivery_limit=delivery_limit,
        dead_letter_exchange=DEAD_LETTER_EXCHANGE,
        dead_letter_routing_key=DEAD_LETTER_KEY,
        max_length=max_length,
        max_length_bytes=max_length_bytes,
    )


def core_topology(delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> Topology:
    """What the coordinator needs before any participant exists."""
    return Topology(
        exchanges=(
            ExchangeSpec(UP_EXCHANGE, "topic", alternate_exchange=LOBBY_EXCHANGE),
            ExchangeSpec(LOBBY_EXCHANGE, "fanout"),
            ExchangeSpec(DIRECT_EXCHANGE, "direct"),
            ExchangeSpec(ANNOUNCE_EXCHANGE, "fanout"),
            ExchangeSpec(DEAD_LETTER_EXCHANGE, "direct"),
        ),
        queues=(
            QueueSpec(
                name=LOBBY_QUEUE,
                quorum=True,
                delivery_limit=delivery_limit,
                max_length=LOBBY_MAX_MESSAGES,
                max_length_bytes=LOBBY_MAX_BYTES,
                overflow="drop-head",
            ),
            QueueSpec(
                name=DEAD_LETTER_QUEUE,
                quorum=True,
                max_length=DEAD_LETTER_MAX_MESSAGES,
                max_length_bytes=DEAD_LETTER_MAX_BYTES,
                overflow="drop-head",
            ),
        ),
        bindings=(
            BindingSpec(LOBBY_QUEUE, LOBBY_EXCHANGE, ""),
            BindingSpec(LOBBY_QUEUE, UP_EXCHANGE, "ctl.*"),
            BindingSpec(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, DEAD_LETTER_KEY),
        ),
    )


def participant_topology(
    participant_ids: Iterable[str], delivery_limit: int = DEFAULT_DELIVERY_LIMIT
) -> Topology:
    """Each participant's queues: its reply queue (bound for direct replies and announcements) and its
    intake queue. The operator provisions them with the participant's user, so that they exist long
    before they are used (RabbitMQ 3.10.8 can lose a quorum queue created just before it crashes); the
    coordinator declares them again, idempotently, for members it learns of from a Join."""
    return reply_topology(participant_ids, delivery_limit).merged(
        intake_topology(participant_ids, delivery_limit)
    )


def reply_topology(participant_ids: Iterable[str], delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> Topology:
    """Each participant's reply queue, bound for direct replies and for announcements."""
    queues: list[QueueSpec] = []
    bindings: list[BindingSpec] = []
    for pid in participant_ids:
        queues.append(_work_queue(reply_queue(pid), delivery_limit))
        bindings.append(BindingSpec(reply_queue(pid), DIRECT_EXCHANGE, reply_key(pid)))
        bindings.append(BindingSpec(reply_queue(pid), ANNOUNCE_EXCHANGE, ""))
    return Topology(queues=tuple(queues), bindings=tuple(bindings))


def intake_topology(participant_ids: Iterable[str], delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> Topology:
    """Each participant's intake queue, bound to its own keys. A Join reaches the coordinator through the
    lobby's copy of control traffic whether or not this queue exists, and the coordinator then consumes
    it; until then what the participant sends waits here."""
    queues: list[QueueSpec] = []
    bindings: list[BindingSpec] = []
    for pid in participant_ids:
        intake = intake_queue(pid)
        queues.append(_work_queue(intake, delivery_limit, INTAKE_MAX_MESSAGES, INTAKE_MAX_BYTES))
        bindings.append(BindingSpec(intake, UP_EXCHANGE, f"gen.*.{pid}"))
        bindings.append(BindingSpec(intake, UP_EXCHANGE, control_key(pid)))
    return Topology(queues=tuple(queues), bindings=tuple(bindings))


def full_topology(participant_ids: Iterable[str], delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> Topology:
    """The core topology and these participants' reply queues: what a participant needs to find when it
    starts. Their intake queues come from the operator's provisioning (`participant_topology`) or from
    the coordinator; until one exists, what its participant sends goes to the lobby."""
    return core_topology(delivery_limit).merged(reply_topology(participant_ids, delivery_limit))


def queue_arguments(spec: QueueSpec) -> dict[str, str | int]:
    """The `x-` arguments a queue is declared with (by `AmqpTransport`, and in definitions.json)."""
    if not spec.quorum:
        return {}
    arguments: dict[str, str | int] = {"x-queue-type": "quorum"}
    if spec.delivery_limit is not None:
        arguments["x-delivery-limit"] = spec.delivery_limit
    if spec.dead_letter_exchange is not None:
        arguments["x-dead-letter-exchange"] = spec.dead_letter_exchange
        if spec.dead_letter_routing_key is not None:
            arguments["x-dead-letter-routing-key"] = spec.dead_letter_routing_key
        # At-least-once dead-lettering keeps a message until the DLX confirms it; it needs reject-publish.
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
    elif spec.max_length is not None or spec.max_length_bytes is not None:
        arguments["x-overflow"] = spec.overflow
    if spec.max_length is not None:
        arguments["x-max-length"] = spec.max_length
    if spec.max_length_bytes is not None:
        arguments["x-max-length-bytes"] = spec.max_length_bytes
    return arguments


def exchange_arguments(spec: ExchangeSpec) -> dict[str, str]:
    """The arguments an exchange is declared with (by `AmqpTransport`, and in definitions.json)."""
    if spec.alternate_exchange is None:
        return {}
    return {"alternate-exchange": spec.alternate_exchange}
