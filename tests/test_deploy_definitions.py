"""deploy/rabbitmq/definitions.json matches the code, and participants get only what they need."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import structlog
from support.brokers import participant_url
from support.waiting import eventually

from broker import topology
from broker.amqp import AccessRefused
from broker.cli import main
from broker.connect import open_transport
from broker.definitions import (
    DEV_COORDINATOR_PASSWORD,
    checked_in_definitions,
    definitions,
    hash_password,
    participant_grant,
)
from broker.errors import BrokerError
from broker.local_node import LocalNode
from broker.transport import REASON_HEADER, Delivery

DEFINITIONS = Path(__file__).resolve().parents[1] / "deploy" / "rabbitmq" / "definitions.json"


def test_checked_in_definitions_match_the_topology() -> None:
    assert json.loads(DEFINITIONS.read_text()) == checked_in_definitions(), (
        "deploy/rabbitmq/definitions.json is stale; run: "
        "chorus-broker write-definitions deploy/rabbitmq/definitions.json"
    )


def test_chorus_broker_write_definitions_regenerates_the_checked_in_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "definitions.json"
    try:
        assert main(["write-definitions", str(target)]) == 0
        assert target.read_text() == DEFINITIONS.read_text()
        assert capsys.readouterr().out == f"wrote {target}\n"
        assert main(["write-definitions", "-"]) == 0
        assert json.loads(capsys.readouterr().out) == checked_in_definitions()
        assert main(["write-definitions", str(tmp_path / "no-such-dir" / "definitions.json")]) == 2
        assert "cannot write" in capsys.readouterr().err
    finally:
        structlog.reset_defaults()  # main() configures logging for the CLI


def test_checked_in_definitions_declare_bounded_quorum_queues() -> None:
    document = checked_in_definitions()
    queues = {q["name"]: q["arguments"] for q in document["queues"]}
    assert set(queues) == {topology.LOBBY_QUEUE, topology.DEAD_LETTER_QUEUE}
    # Both keep their newest when full: a flood there drops old messages, and never has the broker
    # refuse anyone's publish.
    assert queues[topology.LOBBY_QUEUE] == {
        "x-queue-type": "quorum",
        "x-delivery-limit": topology.DEFAULT_DELIVERY_LIMIT,
        "x-overflow": "drop-head",
        "x-max-length": topology.LOBBY_MAX_MESSAGES,
        "x-max-length-bytes": topology.LOBBY_MAX_BYTES,
    }
    assert queues[topology.DEAD_LETTER_QUEUE] == {
        "x-queue-type": "quorum",
        "x-overflow": "drop-head",
        "x-max-length": topology.DEAD_LETTER_MAX_MESSAGES,
        "x-max-length-bytes": topology.DEAD_LETTER_MAX_BYTES,
    }


def test_checked_in_definitions_send_unclaimed_up_traffic_to_the_lobby() -> None:
    document = checked_in_definitions()
    exchanges = {e["name"]: (e["type"], e["arguments"]) for e in document["exchanges"]}
    assert exchanges[topology.UP_EXCHANGE] == ("topic", {"alternate-exchange": topology.LOBBY_EXCHANGE})
    assert exchanges[topology.LOBBY_EXCHANGE] == ("fanout", {})
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in document["bindings"]}
    # No intake queue exists until the coordinator declares one: only the lobby listens on chorus.up.
    assert {b for b in bindings if b[0] in (topology.UP_EXCHANGE, topology.LOBBY_EXCHANGE)} == {
        (topology.UP_EXCHANGE, topology.LOBBY_QUEUE, "ctl.*"),
        (topology.LOBBY_EXCHANGE, topology.LOBBY_QUEUE, ""),
    }


def test_intake_queues_are_bounded_quorum_queues_bound_to_their_owners_keys_only() -> None:
    document = definitions(topology.intake_topology(["alice", "bob"]), "v", [])
    queues = {q["name"]: q["arguments"] for q in document["queues"]}
    assert set(queues) == {"chorus.in.alice", "chorus.in.bob"}
    for arguments in queues.values():
        # Dead-lettered at least once; a member that floods fills its own queue and is refused.
        assert arguments == {
            "x-queue-type": "quorum",
            "x-delivery-limit": topology.DEFAULT_DELIVERY_LIMIT,
            "x-dead-letter-exchange": topology.DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": topology.DEAD_LETTER_KEY,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-max-length": topology.INTAKE_MAX_MESSAGES,
            "x-max-length-bytes": topology.INTAKE_MAX_BYTES,
        }
    assert {(b["source"], b["destination"], b["routing_key"]) for b in document["bindings"]} == {
        (topology.UP_EXCHANGE, "chorus.in.alice", "gen.*.alice"),
        (topology.UP_EXCHANGE, "chorus.in.alice", "ctl.alice"),
        (topology.UP_EXCHANGE, "chorus.in.bob", "gen.*.bob"),
        (topology.UP_EXCHANGE, "chorus.in.bob", "ctl.bob"),
    }


def test_dev_password_hash_is_rabbitmq_sha256_with_its_salt() -> None:
    (user,) = checked_in_definitions()["users"]
    stored = user["password_hash"]
    salt = base64.b64decode(stored)[:4]
    assert hash_password(DEV_COORDINATOR_PASSWORD, salt) == stored


def test_participant_grant_is_least_privilege() -> None:
    grant = participant_grant("alice", "pw")
    assert (grant.configure, grant.write, grant.read) == ("^$", r"^chorus\.up$", r"^chorus\.reply\.alice$")
    (topic,) = grant.topic
    assert topic.exchange == topology.UP_EXCHANGE
    assert topic.write == topology.participant_topic_pattern("alice")
    assert topic.read == "^$"


@pytest.mark.amqp
async def test_participant_cannot_impersonate_or_read_another_participant(
    rabbit_node: LocalNode, rabbit_participants: dict[str, str]
) -> None:
    alice, bob = rabbit_participants["alice"], rabbit_participants["bob"]
    async with open_transport(participant_url(rabbit_node, alice)) as as_alice:
        # Its own keys are fine.
        await as_alice.publish(topology.UP_EXCHANGE, topology.generation_key(0, alice), b"g", message_id="a0")
        await as_alice.publish(topology.UP_EXCHANGE, topology.control_key(alice), b"c", message_id="a1")
        # Another participant's key, or any other exchange, is refused.
        with pytest.raises(AccessRefused):
            await as_alice.publish(
                topology.UP_EXCHANGE, topology.generation_key(0, bob), b"g", message_id="a2"
            )
        with pytest.raises(AccessRefused):
            await as_alice.publish(topology.DIRECT_EXCHANGE, topology.reply_key(bob), b"r", message_id="a3")
        # Reading another's replies, or configuring anything, is refused.
        with pytest.raises(AccessRefused):
            await as_alice.consume(topology.reply_queue(bob), _ignore)
        with pytest.raises(BrokerError):
            await as_alice.declare(topology.participant_topology(["mallory"]))
        # After all that the connection still works, and its own reply queue is readable.
        await as_alice.publish(topology.UP_EXCHANGE, topology.generation_key(1, alice), b"g", message_id="a4")
        await as_alice.consume(topology.reply_queue(alice), _ignore)


@pytest.mark.amqp
async def test_participant_dead_letter_falls_back_to_the_queue(
    rabbit_node: LocalNode, rabbit_participants: dict[str, str]
) -> None:
    name = rabbit_participants["carol"]
    dead: list[Delivery] = []

    async def collect(delivery: Delivery) -> None:
        if delivery.headers.get("x-first-death-queue") == topology.reply_queue(name):
            dead.append(delivery)

    async with open_transport(rabbit_node.coordinator_url) as coordinator:
        await coordinator.consume(topology.DEAD_LETTER_QUEUE, collect)
        await coordinator.publish(topology.DIRECT_EXCHANGE, topology.reply_key(name), b"bad", message_id="d1")
        async with open_transport(participant_url(rabbit_node, name)) as participant:

            async def reject(delivery: Delivery) -> None:
                await delivery.dead_letter("unreadable")

            await participant.consume(topology.reply_queue(name), reject)
            # A participant may not publish to the DLX: the queue dead-letters the message instead.
            await eventually(lambda: len(dead) == 1)
    assert dead[0].message_id == "d1"
    assert dead[0].headers[REASON_HEADER] == "rejected"


async def _ignore(delivery: Delivery) -> None:
    return None
