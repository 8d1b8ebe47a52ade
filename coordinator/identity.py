"""Checks that a message really comes from whom it claims, and goes where it says."""

from __future__ import annotations

from broker.transport import Delivery
from schemas.ids import named_sender
from schemas.messages import Message


def identity_problem(delivery: Delivery, message: Message, federation: str) -> str | None:
    """Why this message must be rejected on identity grounds, or None.

    The broker checks `user_id` against the login, but lets an absent one pass,
    so a missing `user_id` is as bad as a forged one.
    """
    if delivery.user_id is None:
        return f"user_id is missing; participant {message.participant_id!r} must publish with its own login"
    if delivery.user_id != message.participant_id:
        return f"user_id {delivery.user_id!r} does not match participant_id {message.participant_id!r}"
    if message.federation != federation:
        return f"federation {message.federation!r} is not this federation ({federation!r})"
    suffix = f".{message.participant_id}"
    if not delivery.routing_key.endswith(suffix):
        return f"routing key {delivery.routing_key!r} does not name participant {message.participant_id!r}"
    return None


def shard_of_routing_key(routing_key: str) -> int | None:
    """The shard in `gen.<shard>.<participant>`, or None when the key has another shape."""
    parts = routing_key.split(".")
    if len(parts) != 3 or parts[0] != "gen" or not parts[1].isdigit():
        return None
    return int(parts[1])


def ownership_problem(message: Message, owner: str | None) -> str | None:
    """Why a message that passed `identity_problem` still does not belong where it arrived, or None.

    `owner` is the participant whose intake queue delivered it (None for the lobby). A copy can land
    in another member's queue through CC/BCC routing keys, which RabbitMQ 3.10.8 does not check
    against topic permissions. A message id in the deterministic format that names another
    participant is refused too, so nobody's audit trail shows ids that look like someone else's.
    """
    sender = message.participant_id
    if owner is not None and owner != sender:
        return f"arrived in participant {owner!r}'s intake queue but comes from {sender!r}"
    named = named_sender(message.message_id)
    if named is not None and named != sender:
        return f"message_id {message.message_id!r} names participant {named!r}, not the sender {sender!r}"
    return None
