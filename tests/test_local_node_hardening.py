"""The local node's hardening: Erlang distribution and epmd on loopback, the shipped memory and disk
alarms, and per-user connection and channel limits for participants, checked on real nodes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import aio_pika
import aiormq
import pytest
import structlog
from structlog.testing import capture_logs

from broker import node_network, topology
from broker.cli import main
from broker.definitions import (
    PARTICIPANT_LIMITS,
    PARTICIPANT_MAX_CHANNELS,
    PARTICIPANT_MAX_CONNECTIONS,
    Listings,
    find_problems,
    participant_grant,
)
from broker.local_node import DISK_FREE_LIMIT_ENV, LocalNode
from broker.transport import Topology

SHIPPED_CONF = Path(__file__).resolve().parents[1] / "deploy" / "rabbitmq" / "rabbitmq.conf"
LOOPBACK = {"127.0.0.1", "::1"}


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield  # the CLI configures structlog; later tests must not log into this test's captured stderr
    structlog.reset_defaults()


def listening_on(port: int) -> set[str]:
    """The addresses a TCP socket listens on at `port`, as `ss` (not the code under test) sees them."""
    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("needs ss (iproute2) to see where sockets listen")
    out = subprocess.run([ss, "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True)
    return {line.split()[3].rsplit(":", 1)[0].strip("[]") for line in out.stdout.splitlines() if line.strip()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- distribution and epmd -------------------------------------------------


@pytest.mark.amqp
def test_distribution_port_listens_on_loopback_only(rabbit_node: LocalNode) -> None:
    assert listening_on(rabbit_node.state.dist_port) == {"127.0.0.1"}


@pytest.mark.amqp
def test_an_epmd_the_node_starts_listens_on_loopback_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This host's epmd on 4369 may predate the node (the Debian package starts one on every
    # interface) and then stays where it listens; a port of its own makes the node start a new one.
    port = free_port()
    monkeypatch.setenv("ERL_EPMD_PORT", str(port))
    node = LocalNode(tmp_path / "node")
    node.start()
    try:
        epmd = listening_on(port)
        assert epmd, f"the node started no epmd on port {port}"
        assert epmd <= LOOPBACK
        assert listening_on(node.state.dist_port) == {"127.0.0.1"}
        assert node_network.warn_if_epmd_exposed() == []
    finally:
        node.stop()
        kill_epmd(port)


def kill_epmd(port: int) -> None:
    """Stop the epmd our node started on `port` (it outlives the node), by its pid."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    for pid in {int(p) for p in re.findall(r'\("epmd",pid=(\d+)', out)}:
        os.kill(pid, signal.SIGTERM)


@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False)])
def test_an_epmd_listening_beyond_loopback_is_reported(
    monkeypatch: pytest.MonkeyPatch, host: str, warned: bool
) -> None:
    with socket.socket() as fake_epmd:
        fake_epmd.bind((host, 0))
        fake_epmd.listen()
        monkeypatch.setenv("ERL_EPMD_PORT", str(fake_epmd.getsockname()[1]))
        with capture_logs() as logs:
            exposed = node_network.warn_if_epmd_exposed()
    assert exposed == (["0.0.0.0"] if warned else [])
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == (1 if warned else 0)
    if warned:
        assert "ERL_EPMD_ADDRESS" in warnings[0]["hint"]


# -- memory and disk alarms ------------------------------------------------


def shipped_setting(key: str) -> str:
    for line in SHIPPED_CONF.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            return value.strip()
    raise AssertionError(f"{key} is not set in {SHIPPED_CONF}")


def test_the_node_is_configured_with_the_shipped_alarms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DISK_FREE_LIMIT_ENV, raising=False)
    config = LocalNode(tmp_path / "node")._config().splitlines()
    for key in ("disk_free_limit.absolute", "vm_memory_high_watermark.relative"):
        assert f"{key} = {shipped_setting(key)}" in config


def test_disk_free_limit_can_be_lowered_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(DISK_FREE_LIMIT_ENV, "200MB")
    assert "disk_free_limit.absolute = 200MB" in LocalNode(tmp_path / "a")._config().splitlines()
    # Not a size (here: an attempt to add a config line) is refused before anything starts.
    monkeypatch.setenv(DISK_FREE_LIMIT_ENV, "1GB\nloopback_users = none")
    assert main(["up", "--dir", str(tmp_path / "b")]) == 2
    assert f"{DISK_FREE_LIMIT_ENV}='1GB\\nloopback_users = none' is not a RabbitMQ size" in (
        capsys.readouterr().err
    )


@pytest.mark.amqp
def test_the_running_node_has_the_shipped_alarms(rabbit_node: LocalNode) -> None:
    status = json.loads(rabbit_node._ctl("status", "--formatter", "json"))
    assert status["vm_memory_high_watermark_setting"] == {"relative": 0.6}
    if os.environ.get(DISK_FREE_LIMIT_ENV):
        pytest.skip(f"{DISK_FREE_LIMIT_ENV} overrides the shipped disk limit in this session")
    assert status["disk_free_limit"] == 1_000_000_000  # 1GB


# -- per-user limits -------------------------------------------------------


@pytest.fixture(scope="module")
def limited(rabbit_node: LocalNode) -> dict[str, str]:
    """A vhost with one participant: `coordinator` and `participant` -> URL, `name` -> its user."""
    name = f"limits-{secrets.token_hex(3)}"
    urls = rabbit_node.add_vhost(name, (name,))
    return {"coordinator": urls[topology.COORDINATOR_USER], "participant": urls[name], "name": name}


async def node_logged(node: LocalNode, text: str, timeout: float = 10.0) -> bool:
    log_file = node.data_dir / "log" / f"{node.state.nodename}.log"
    deadline = time.monotonic() + timeout
    while text not in log_file.read_text(errors="replace"):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as opened:
        yield opened


async def open_connections(stack: AsyncExitStack, url: str, count: int) -> None:
    for _ in range(count):
        await stack.enter_async_context(await aio_pika.connect(url, timeout=10))


@pytest.mark.amqp
async def test_a_participant_cannot_open_more_connections_than_its_limit(
    rabbit_node: LocalNode, limited: dict[str, str], stack: AsyncExitStack
) -> None:
    await open_connections(stack, limited["participant"], PARTICIPANT_MAX_CONNECTIONS)
    # The broker answers connection.open with connection.close; aiormq drops the reply text, the log has it.
    with pytest.raises(aiormq.exceptions.AMQPError, match=r"Connection\.Close"):
        await aio_pika.connect(limited["participant"], timeout=10)
    refusal = (
        f"connection refused for user '{limited['name']}': "
        f"user connection limit ({PARTICIPANT_MAX_CONNECTIONS}) is reached"
    )
    assert await node_logged(rabbit_node, refusal)
    # The coordinator's user is not limited.
    await open_connections(stack, limited["coordinator"], PARTICIPANT_MAX_CONNECTIONS + 2)


@pytest.mark.amqp
async def test_a_participant_cannot_open_more_channels_than_its_limit(
    limited: dict[str, str], stack: AsyncExitStack
) -> None:
    participant = await stack.enter_async_context(await aio_pika.connect(limited["participant"], timeout=10))
    for _ in range(PARTICIPANT_MAX_CHANNELS):
        await participant.channel()
    limit = f"channels opened for user '{limited['name']}' has reached the maximum allowed user limit"
    with pytest.raises(aiormq.exceptions.ConnectionNotAllowed, match=limit):
        await participant.channel()
    coordinator = await stack.enter_async_context(await aio_pika.connect(limited["coordinator"], timeout=10))
    for _ in range(PARTICIPANT_MAX_CHANNELS + 2):
        await coordinator.channel()


def test_find_problems_names_missing_limits() -> None:
    grant = participant_grant("alice", "pw")
    topo = Topology()  # only the user matters here
    found = Listings(
        vhosts=[{"name": "chorus"}],
        exchanges=[],
        queues=[],
        bindings=[],
        permissions=[
            {"user": "alice", "configure": grant.configure, "write": grant.write, "read": grant.read}
        ],
        topic_permissions=[
            {"user": "alice", "exchange": t.exchange, "write": t.write, "read": t.read} for t in grant.topic
        ],
    )
    assert find_problems(topo, "chorus", [grant], found) == [
        f"user 'alice' lacks its limits {dict(PARTICIPANT_LIMITS)}"
    ]
    found.user_limits = [{"user": "alice", "limits": json.dumps(dict(PARTICIPANT_LIMITS))}]
    assert find_problems(topo, "chorus", [grant], found) == []


@pytest.mark.amqp
def test_participants_without_their_limits_get_them_back_at_start(rabbit_node: LocalNode) -> None:
    node = LocalNode.existing(rabbit_node.data_dir)
    name = f"unlimited-{secrets.token_hex(3)}"
    node.add_participant(name)
    node._ctl("clear_user_limits", name, "all")  # as a participant made before limits existed
    # What start() does before it verifies (find_problems would name the missing limits otherwise).
    found = node._restore_participant_limits(node._listings(node.vhost, full=False))
    assert found.limits_of(name) == dict(PARTICIPANT_LIMITS)
