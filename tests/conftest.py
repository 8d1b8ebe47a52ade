"""Shared fixtures: one real RabbitMQ node per test session, and transports over both brokers.

`rabbit_node` starts the node the way `chorus-broker up` does (in a temporary
directory, on free ports) the first time a test asks for it, and stops it at the
end. Tests that use it carry the `amqp` marker.

`transport_factory` runs a test once on the in-memory broker and once on
RabbitMQ. Every test gets its own exchange and queue names (a unique prefix),
so tests on the shared node never see each other's messages.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import structlog

from broker import cli
from broker import topology as chorus
from broker.amqp import AmqpTransport
from broker.cli import bring_up
from broker.local_node import LocalNode
from broker.memory import MemoryBroker
from broker.transport import BindingSpec, Topology, Transport


@pytest.fixture(scope="session")
def rabbit_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    node, _ = bring_up(tmp_path_factory.mktemp("rabbitmq"))
    try:
        yield node
    finally:
        # Stopped the way `chorus-broker down` stops it (which checks that command too).
        assert cli.main(["down", "--dir", str(node.data_dir)]) == 0
        structlog.reset_defaults()
        assert not node.is_running()


@pytest.fixture(scope="session")
def rabbit_participants(rabbit_node: LocalNode) -> dict[str, str]:
    """Participant users on the session node (one rabbitmqctl round for all): role -> name.

    Roles: alice, bob, carol, dave. Their passwords are in `participant_passwords`.
    """
    names = {role: f"{role}-{secrets.token_hex(3)}" for role in ("alice", "bob", "carol", "dave")}
    _PASSWORDS.update(rabbit_node.add_participants(dict.fromkeys(names.values())))
    return names


_PASSWORDS: dict[str, str] = {}


@pytest.fixture
def rabbit_vhost(rabbit_node: LocalNode) -> Callable[..., dict[str, str]]:
    """A factory for a fresh vhost on the session node with the real Chorus names.

    `rabbit_vhost(participants=("alice", "bob"))` returns user -> AMQP URL on the new
    vhost (`coordinator` and each participant). For service tests that need the
    exact `chorus.*` names and must not see other tests' messages. About a few
    seconds each (rabbitmqctl import and check).
    """

    def make(participants: tuple[str, ...] = ()) -> dict[str, str]:
        return rabbit_node.add_vhost(f"test-{secrets.token_hex(4)}", participants)

    return make


def participant_url(node: LocalNode, name: str) -> str:
    """The AMQP URL of a participant made by `rabbit_participants`."""
    return node.url_for(name, _PASSWORDS[name])


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


class TransportFactory:
    """Connections to one broker for one test, with names no other test uses."""

    def __init__(self, kind: str, node: LocalNode | None) -> None:
        self.kind = kind
        self.prefix = f"t{secrets.token_hex(4)}."
        self._node = node
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


@pytest.fixture(
    params=[
        pytest.param("memory"),
        pytest.param("amqp", marks=pytest.mark.amqp),
    ]
)
async def transport_factory(request: pytest.FixtureRequest) -> AsyncIterator[TransportFactory]:
    node: LocalNode | None = request.getfixturevalue("rabbit_node") if request.param == "amqp" else None
    factory = TransportFactory(request.param, node)
    try:
        yield factory
    finally:
        await factory.close()


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool], timeout: float = 10.0
) -> None:
    """Wait until `check()` is true (brokers settle asynchronously); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "broker"


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """For tests of tiny models: they gain nothing from intra-op threads, and on a busy machine spinning
    threads cost 5x."""
    import torch  # only the model tests pay for importing it

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests that run a CLI or runner which configures logging: put the process's logging back."""
    handlers = logging.getLogger().handlers[:]
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers = handlers
    logging.captureWarnings(False)
