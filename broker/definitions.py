"""RabbitMQ definitions: who may do what on a Chorus vhost, as the JSON document RabbitMQ imports.

- The permission policy: the coordinator may do anything on its vhost; a participant configures
  nothing, publishes only generations and control traffic under its own id, reads only its own
  reply queue, and has connection and channel limits (`participant_grant`).
- `definitions()`: users, permissions, limits and topology as RabbitMQ's definitions document (at
  boot, or `rabbitmqctl import_definitions`); `checked_in_definitions()` is what
  deploy/rabbitmq/definitions.json holds (`chorus-broker write-definitions` regenerates it).
- `find_problems()`: what a node lists (`Listings`, from rabbitmqctl) against what should be there,
  since RabbitMQ 3.10.8 silently ignores a definitions file it cannot parse.

Pure: no I/O, no AMQP client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker import topology
from broker.errors import UsageError
from broker.topology import exchange_arguments, queue_arguments
from broker.transport import Topology
from schemas.messages import ID_MAX_LENGTH, ID_PATTERN

RABBITMQ_VERSION = "3.10.8"
DEFAULT_VHOST = "chorus"
# Only for the checked-in deploy/rabbitmq/definitions.json: change it before exposing a broker.
DEV_COORDINATOR_PASSWORD = "chorus-dev-password"
_DEV_SALT = b"chrs"
_PARTICIPANT_ID = re.compile(ID_PATTERN)

# Per participant login. One participant needs one connection (a robust reconnect may briefly
# overlap the old one) and a few channels (one per consumer, one for confirmed publishes, short-
# lived ones for passive declares); without limits one login could open connections and channels
# until the broker runs out of file descriptors or memory, starving every other member. The
# coordinator's user stays unlimited.
PARTICIPANT_MAX_CONNECTIONS = 8
PARTICIPANT_MAX_CHANNELS = 64
PARTICIPANT_LIMITS: Mapping[str, int] = {
    "max-connections": PARTICIPANT_MAX_CONNECTIONS,
    "max-channels": PARTICIPANT_MAX_CHANNELS,
}


# ---------------------------------------------------------------------------
# The permission policy
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TopicGrant:
    exchange: str
    write: str
    read: str


@dataclass(frozen=True)
class UserGrant:
    """A user, its password hash and its rights on one vhost."""

    name: str
    password_hash: str
    configure: str
    write: str
    read: str
    topic: tuple[TopicGrant, ...] = ()
    limits: Mapping[str, int] = field(default_factory=dict)  # `rabbitmqctl set_user_limits`; empty: none
    tags: tuple[str, ...] = ()  # management tags; none: no access to the management API


def hash_password(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4) if salt is None else salt
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def coordinator_grant(password: str, salt: bytes | None = None) -> UserGrant:
    # "monitoring": read-only access to the management API and its metrics, for operators' dashboards.
    return UserGrant(
        topology.COORDINATOR_USER, hash_password(password, salt), ".*", ".*", ".*", tags=("monitoring",)
    )


def participant_grant(name: str, password: str) -> UserGrant:
    """Least privilege: configure nothing, publish only under its own id, read only its replies."""
    check_participant_id(name)
    return UserGrant(
        name=name,
        password_hash=hash_password(password),
        configure="^$",
        write=f"^{re.escape(topology.UP_EXCHANGE)}$",
        read=f"^{re.escape(topology.reply_queue(name))}$",
        topic=(TopicGrant(topology.UP_EXCHANGE, topology.participant_topic_pattern(name), "^$"),),
        limits=PARTICIPANT_LIMITS,
    )


def check_participant_id(name: str) -> None:
    """A participant id is a wire `Id` (schemas.messages) and not the coordinator's user name."""
    if len(name) > ID_MAX_LENGTH or not _PARTICIPANT_ID.match(name):
        raise UsageError(f"participant id {name!r} must be 1-{ID_MAX_LENGTH} letters, digits, '_' or '-'")
    if name == topology.COORDINATOR_USER:
        raise UsageError(f"{name!r} is the coordinator's user, not a participant id")


# ---------------------------------------------------------------------------
# The definitions document
# ---------------------------------------------------------------------------


def definitions(topo: Topology, vhost: str, users: Sequence[UserGrant]) -> dict[str, Any]:
    """The definitions document RabbitMQ imports (at boot, or with `rabbitmqctl import_definitions`)."""
    return {
        "rabbit_version": RABBITMQ_VERSION,
        "rabbitmq_version": RABBITMQ_VERSION,
        "users": [
            {
                "name": user.name,
                "password_hash": user.password_hash,
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": list(user.tags),
                "limits": dict(user.limits),
            }
            for user in users
        ],
        "vhosts": [{"name": vhost}],
        "permissions": [
            {"user": u.name, "vhost": vhost, "configure": u.configure, "write": u.write, "read": u.read}
            for u in users
        ],
        "topic_permissions": [
            {"user": u.name, "vhost": vhost, "exchange": t.exchange, "write": t.write, "read": t.read}
            for u in users
            for t in u.topic
        ],
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": queue_arguments(q),
            }
            for q in topo.queues
        ],
        "exchanges": [
            {
                "name": e.name,
                "vhost": vhost,
                "type": e.type,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": exchange_arguments(e),
            }
            for e in topo.exchanges
        ],
        "bindings": [
            {
                "source": b.exchange,
                "vhost": vhost,
                "destination": b.queue,
                "destination_type": "queue",
                "routing_key": b.routing_key,
                "arguments": {},
            }
            for b in topo.bindings
        ],
    }


def checked_in_definitions() -> dict[str, Any]:
    """What deploy/rabbitmq/definitions.json holds: core topology, the coordinator with the dev password."""
    coordinator = coordinator_grant(DEV_COORDINATOR_PASSWORD, salt=_DEV_SALT)
    return definitions(topology.core_topology(), DEFAULT_VHOST, [coordinator])


def render_definitions(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2) + "\n"


# ---------------------------------------------------------------------------
# Verification: what rabbitmqctl lists against what should be there
# ---------------------------------------------------------------------------


@dataclass
class Listings:
    """rabbitmqctl's answers, parsed from its JSON formatter."""

    vhosts: list[dict[str, Any]]
    exchanges: list[dict[str, Any]]
    queues: list[dict[str, Any]]
    bindings: list[dict[str, Any]]
    permissions: list[dict[str, Any]]
    topic_permissions: list[dict[str, Any]]
    # `list_user_limits --global`: {"user": ..., "limits": "<JSON object>"} for each user that has any.
    user_limits: list[dict[str, Any]] = field(default_factory=list)

    def limits_of(self, user: str) -> dict[str, int]:
        for row in self.user_limits:
            if row.get("user") == user:
                limits = row.get("limits") or {}
                return dict(json.loads(limits) if isinstance(limits, str) else limits)
        return {}


def find_problems(topo: Topology, vhost: str, users: Sequence[UserGrant], found: Listings) -> list[str]:
    """Everything expected but missing or different; empty when the node is as it should be."""
    problems: list[str] = []
    if vhost not in {v["name"] for v in found.vhosts}:
        return [f"vhost {vhost!r} does not exist"]
    exchanges = {e["name"]: e["type"] for e in found.exchanges}
    for exchange in topo.exchanges:
        if exchanges.get(exchange.name) != exchange.type:
            problems.append(f"{exchange.type} exchange {exchange.name!r} is missing")
    queues = {q["name"]: q.get("type") for q in found.queues}
    for queue in topo.queues:
        if queue.name not in queues:
            problems.append(f"queue {queue.name!r} is missing")
        elif queue.quorum and queues[queue.name] != "quorum":
            problems.append(f"queue {queue.name!r} is {queues[queue.name]}, not quorum")
    bindings = {(b["source_name"], b["destination_name"], b["routing_key"]) for b in found.bindings}
    for binding in topo.bindings:
        if (binding.exchange, binding.queue, binding.routing_key) not in bindings:
            problems.append(
                f"binding {binding.exchange} -[{binding.routing_key}]-> {binding.queue} is missing"
            )
    permissions = {p["user"]: (p["configure"], p["write"], p["read"]) for p in found.permissions}
    topic = {(p["user"], p["exchange"]): (p["write"], p["read"]) for p in found.topic_permissions}
    for user in users:
        if permissions.get(user.name) != (user.configure, user.write, user.read):
            problems.append(f"user {user.name!r} lacks its permissions on vhost {vhost!r}")
        for grant in user.topic:
            if topic.get((user.name, grant.exchange)) != (grant.write, grant.read):
                problems.append(f"user {user.name!r} lacks its topic permission on {grant.exchange!r}")
        if user.limits and found.limits_of(user.name) != dict(user.limits):
            problems.append(f"user {user.name!r} lacks its limits {dict(user.limits)}")
    return problems
