"""Broker access for tests: per-test names on a shared broker, and the session node's participant users.

`TransportFactory` (behind conftest's `transport_factory` fixture) gives a test connections to the
in-memory broker or the session's RabbitMQ node, under a name prefix no other test uses.
`participant_url` logs in as a user made by conftest's `rabbit_participants` fixture.
"""

from __future__ import annotations

import importlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import cast

import pytest

from broker import topology as chorus
from broker.amqp import AmqpTransport
from broker.local_node import LocalNode
from broker.memory import MemoryBroker
from broker.transport import BindingSpec, Topology, Transport

# Passwords of the session node's participant users (filled by the `rabbit_participants` fixture).
PARTICIPANT_PASSWORDS: dict[str, str] = {}


def participant_url(node: LocalNode, name: str) -> str:
    """The AMQP URL of a participant made by `rabbit_participants`."""
    return node.url_for(name, PARTICIPANT_PASSWORDS[name])


def isolated(topo: Topology, prefix: str) -> Topology:
    """The same topology with every exchange and queue name prefixed (routing keys unchanged)."""

    def rename(name: str | None) -> str | None:
        return f"{prefix}{name}" if name else name

    return Topology(
        exchanges=tuple(
            replace(e, name=f"{prefix}{e.name}", alternate_exchange=rename(e.alternate_exchange))
            for e in topo.exchanges
        ),
        queues=tuple(
            replace(q, name=f"{prefix}{q.name}", dead_letter_exchange=rename(q.dead_letter_exchange))
            for q in topo.queues
        ),
        bindings=tuple(
            BindingSpec(f"{prefix}{b.queue}", f"{prefix}{b.exchange}", b.routing_key) for b in topo.bindings
        ),
    )


# What `--transport package.module:connect` names: an unopened transport for `user`, dead-lettering to
# `dead_letter_exchange` (the test-local name of chorus.dead).
Connect = Callable[..., Transport]


def load_connect(spec: str) -> Connect:
    """The `connect` callable that `spec` ("package.module:connect") names, or a UsageError that says why."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise pytest.UsageError(f"--transport {spec!r}: expected package.module:connect")
    try:
        connect = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise pytest.UsageError(f"--transport {spec!r}: {error}") from error
    if not callable(connect):
        raise pytest.UsageError(f"--transport {spec!r}: {attribute} is not callable")
    return cast(Connect, connect)


_STRANGER = MemoryBroker()


def memory_connect(user: str, *, dead_letter_exchange: str) -> Transport:
    """A `--transport` connect for the hook's own test: the memory broker, run as if it were unknown."""
    del dead_letter_exchange  # the memory broker dead-letters by the topology it is given
    return _STRANGER.connect(user)


class TransportFactory:
    """Connections to one broker for one test, with names no other test uses.

    `kind` is "memory", "amqp" (the session node) or "custom" (the `custom` connect callable)."""

    def __init__(self, kind: str, node: LocalNode | None, *, custom: Connect | None = None) -> None:
        self.kind = kind
        self.prefix = f"t{secrets.token_hex(4)}."
        self._node = node
        self._custom = custom
        self._memory = MemoryBroker()
        self._opened: list[Transport] = []

    def name(self, base: str) -> str:
        """A test-local name for a Chorus exchange or queue (`chorus.up` -> `tXXXX.chorus.up`)."""
        return f"{self.prefix}{base}"

    def topology(self, participants: tuple[str, ...] = ("alice",), delivery_limit: int = 2) -> Topology:
        """The Chorus topology under this test's names, with a reply queue per participant and the intake
        queue the coordinator declares for each."""
        topo = chorus.full_topology(participants, delivery_limit)
        return isolated(topo.merged(chorus.intake_topology(participants, delivery_limit)), self.prefix)

    async def connect(self, user: str = chorus.COORDINATOR_USER) -> Transport:
        """An open transport; closed when the test ends. On RabbitMQ only the coordinator user is set up."""
        transport: Transport
        if self.kind == "memory":
            transport = self._memory.connect(user)
        elif self._custom is not None:
            transport = self._custom(user, dead_letter_exchange=self.name(chorus.DEAD_LETTER_EXCHANGE))
        else:
            assert self._node is not None
            assert user == chorus.COORDINATOR_USER, "participants need node.add_participant first"
            transport = AmqpTransport(
                self._node.coordinator_url,
                connection_name=f"test {self.prefix}",
                dead_letter_exchange=self.name(chorus.DEAD_LETTER_EXCHANGE),
            )
        await transport.__aenter__()
        self._opened.append(transport)
        return transport

    async def depth(self, transport: Transport, queue: str) -> int:
        depth: Callable[[str], Awaitable[int]] = transport.queue_depth  # type: ignore[attr-defined]
        return await depth(queue)

    async def close(self) -> None:
        for transport in reversed(self._opened):
            await transport.close()
