"""Rounds on RabbitMQ survive faults: the broker SIGKILLed, the link dropped, stalled or slowed.

Every test runs one semantic round with three scripted participants, breaks
something after some generations were confirmed, and then checks that the
round closed with everyone answered, that every generation a participant saw
confirmed is in the coordinator's store, and that the pseudo-labels equal
those of a fault-free run on the same inputs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.faults import NAMES, check_round, close_all, run_round_with_fault
from support.tcp_proxy import TcpProxy

from broker.cli import bring_up
from broker.local_node import LocalNode

pytestmark = [pytest.mark.amqp, pytest.mark.slow]


@pytest.fixture
def own_node(tmp_path: Path) -> Iterator[tuple[LocalNode, dict[str, str]]]:
    """A node of this test's own (it gets SIGKILLed), with the three participants; always stopped."""
    node, passwords = bring_up(tmp_path / "rabbitmq", participants=NAMES)
    try:
        yield node, passwords
    finally:
        node.stop()
        assert not node.is_running()


async def test_broker_killed_mid_round_loses_nothing(
    tmp_path: Path, own_node: tuple[LocalNode, dict[str, str]]
) -> None:
    node, passwords = own_node
    urls = {"coordinator": node.coordinator_url} | {n: node.url_for(n, passwords[n]) for n in NAMES}
    mnesia = node.data_dir / "mnesia"
    port = node.port

    def kill() -> None:
        node.kill()  # SIGKILL the whole node, as a crash would
        assert not node.is_running()

    async def restart() -> None:
        await asyncio.sleep(2.0)  # cyd's publishes are now waiting on a dead broker
        await asyncio.to_thread(node.start)  # same data dir, same ports

    coordinator, participants = await run_round_with_fault(tmp_path, urls, kill, restart)
    try:
        assert node.port == port and mnesia.is_dir()
        await check_round(tmp_path, coordinator, participants)
    finally:
        await close_all(coordinator, participants)


@pytest.mark.parametrize("fault", ["drop", "stall", "slow"])
async def test_link_faults_through_a_proxy_lose_nothing(
    tmp_path: Path, rabbit_vhost: Callable[..., dict[str, str]], fault: str
) -> None:
    direct = rabbit_vhost(participants=tuple(NAMES))
    port = int(direct["coordinator"].rsplit(":", 1)[1].split("/")[0])
    async with TcpProxy(port) as proxy:
        # Short heartbeats, so that a stalled link is noticed in seconds (aiormq: 3 missed, server: 2).
        urls = {user: proxy.url(url) + "?heartbeat=2" for user, url in direct.items()}
        before: list[int] = []

        async def inject() -> None:
            before.append(proxy.connections_made)
            if fault == "drop":
                await proxy.drop()
            elif fault == "stall":
                proxy.stall(12.0)  # longer than either side's heartbeat timeout
            else:
                proxy.slow(0.05, 20_000)

        async def heal() -> None:
            if fault == "slow":
                await asyncio.sleep(3.0)
                proxy.slow(0.0, None)

        coordinator, participants = await run_round_with_fault(tmp_path, urls, inject, heal)
        try:
            await check_round(tmp_path, coordinator, participants)
            opened = proxy.connections_made - before[0]
            if fault in ("drop", "stall"):
                # Every client (coordinator, three participants) reconnected through the proxy.
                assert opened >= 1 + len(NAMES), f"{opened} reconnections"
            else:
                assert opened == 0  # slow, not broken: no client gave up its connection
        finally:
            await close_all(coordinator, participants)
