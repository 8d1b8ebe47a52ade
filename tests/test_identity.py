"""Identity checks on incoming messages: missing or forged user_id, wrong routing key."""

from __future__ import annotations

import pytest

from broker.transport import Delivery
from coordinator.identity import identity_problem, shard_of_routing_key
from schemas import Heartbeat


def heartbeat(participant: str = "alice", federation: str = "f") -> Heartbeat:
    return Heartbeat(
        federation=federation, round_id=1, message_id="m", participant_id=participant, sent_unix=1.0
    )


def delivery(user_id: str | None, routing_key: str = "ctl.alice") -> Delivery:
    return Delivery(
        body=b"",
        exchange="chorus.up",
        routing_key=routing_key,
        message_id="m",
        user_id=user_id,
        redelivered=False,
    )


@pytest.mark.parametrize(
    ("user_id", "routing_key", "message", "problem"),
    [
        (None, "ctl.alice", heartbeat(), "user_id is missing"),
        ("mallory", "ctl.alice", heartbeat(), "does not match participant_id 'alice'"),
        ("alice", "ctl.alice", heartbeat(federation="other"), "federation 'other'"),
        ("alice", "ctl.bob", heartbeat(), "does not name participant 'alice'"),
        ("alice", "ctl.alice", heartbeat(), None),
    ],
)
def test_identity_problems(
    user_id: str | None, routing_key: str, message: Heartbeat, problem: str | None
) -> None:
    found = identity_problem(delivery(user_id, routing_key), message, "f")
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_shard_of_routing_key() -> None:
    assert shard_of_routing_key("gen.3.alice") == 3
    assert shard_of_routing_key("gen.x.alice") is None
    assert shard_of_routing_key("ctl.alice") is None
    assert shard_of_routing_key("gen.1.a.b") is None
