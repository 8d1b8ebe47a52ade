"""Shared fixtures: one real RabbitMQ node per test session, and transports over both brokers.

`rabbit_node` starts the node the way `chorus-broker up` does (in a temporary
directory, on free ports) the first time a test asks for it, and stops it at the
end. Tests that use it carry the `amqp` marker.

`transport_factory` runs a test once on the in-memory broker and once on
RabbitMQ. Every test gets its own exchange and queue names (a unique prefix),
so tests on the shared node never see each other's messages. With
`--transport package.module:connect` it runs on that transport instead: the
conformance suite for a `Transport` of your own (docs/operate.md).

Helpers that tests call (rather than receive as fixtures) live in tests/support/.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import structlog
from support.brokers import PARTICIPANT_PASSWORDS, TransportFactory, load_connect

from broker import cli
from broker.cli import bring_up
from broker.local_node import LocalNode


@pytest.fixture(autouse=True)
def default_logging() -> Iterator[None]:
    """Each test starts from structlog's defaults: a CLI's main() run by an earlier test may have left a
    level (say, warning) that would hide the info lines a test captures with capture_logs."""
    structlog.reset_defaults()
    yield


CHECKOUT = Path(__file__).resolve().parent.parent
CACHES = {".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", "__pycache__"}


@pytest.fixture(autouse=True)
def nothing_left_in_the_checkout() -> Iterator[None]:
    """A test writes under its tmp_path: a file it leaves at the repository's top level (a default
    relative path, say `coordinator.sqlite3`) fails that test, here, where it is named."""
    before = set(CHECKOUT.iterdir())
    yield
    left = sorted(p.name for p in set(CHECKOUT.iterdir()) - before if p.name not in CACHES)
    if left:
        pytest.fail(f"the test left {left} in {CHECKOUT}")


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

    Roles: alice, bob, carol, dave. `support.brokers.participant_url` gives a URL that logs in as one.
    """
    names = {role: f"{role}-{secrets.token_hex(3)}" for role in ("alice", "bob", "carol", "dave")}
    PARTICIPANT_PASSWORDS.update(rabbit_node.add_participants(dict.fromkeys(names.values())))
    return names


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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--transport",
        metavar="package.module:connect",
        help="run the transport_factory tests on this transport only: connect(user, *, dead_letter_exchange) "
        "returns an unopened Transport",
    )


def pytest_configure(config: pytest.Config) -> None:
    spec = config.getoption("--transport")
    if spec:
        load_connect(spec)  # a bad name is a usage error before any test runs


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "transport_factory" not in metafunc.fixturenames:
        return
    kinds = [pytest.param("memory"), pytest.param("amqp", marks=pytest.mark.amqp)]
    if metafunc.config.getoption("--transport"):
        kinds = [pytest.param("custom")]
    metafunc.parametrize("transport_factory", kinds, indirect=True)


@pytest.fixture
async def transport_factory(request: pytest.FixtureRequest) -> AsyncIterator[TransportFactory]:
    node: LocalNode | None = request.getfixturevalue("rabbit_node") if request.param == "amqp" else None
    custom = request.config.getoption("--transport") if request.param == "custom" else None
    factory = TransportFactory(request.param, node, custom=load_connect(custom) if custom else None)
    try:
        yield factory
    finally:
        await factory.close()


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
