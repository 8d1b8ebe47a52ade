"""A round on a three-node RabbitMQ cluster survives losing the node that leads its quorum queues
and that every client is connected to: they fail over to the other nodes in their address lists."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cluster import LocalCluster
from support.faults import NAMES, check_round, close_all, run_round_with_fault

from broker.amqp import AmqpTransport
from broker.connect import open_transport
from broker.local_node import LocalNode
from broker.topology import intake_queue, intake_topology, reply_queue

pytestmark = [pytest.mark.amqp, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[LocalCluster, dict[str, str]]]:
    cluster = LocalCluster(tmp_path / "cluster")
    try:
        passwords = cluster.start(NAMES)
        yield cluster, passwords
    finally:
        cluster.stop()
        assert not any(node.is_running() for node in cluster.nodes)


async def test_clients_on_the_node_that_dies_fail_over_and_the_round_loses_nothing(
    tmp_path: Path, cluster: tuple[LocalCluster, dict[str, str]]
) -> None:
    nodes, passwords = cluster
    doomed, *others = nodes.nodes
    everyone = {n.state.nodename for n in nodes.nodes}
    # Intake queues declared through the first node are led by it (client-local).
    async with open_transport(nodes.coordinator_url(doomed)) as on_doomed:
        await on_doomed.declare(intake_topology(NAMES))
    watched = {intake_queue(n) for n in NAMES} | {reply_queue(n) for n in NAMES}
    before = {q["name"]: q for q in nodes.quorum_queues(others[0]) if q["name"] in watched}
    assert before.keys() == watched
    for queue in before.values():
        assert set(queue["members"]) == everyone  # replicated on all three nodes
        assert queue["leader"] == doomed.state.nodename  # and led by the node about to die

    # Every client is given all three nodes, the doomed one first: the first reachable one wins.
    order = [doomed, *others]
    urls = {"coordinator": ";".join(nodes.coordinator_url(n) for n in order)}
    urls |= {name: ";".join(n.url_for(name, passwords[name]) for n in order) for name in NAMES}
    on_doomed_before: set[str] = set()

    def kill() -> None:
        on_doomed_before.update(c["user"] for c in connections(doomed))
        doomed.kill()
        assert not doomed.is_running()

    coordinator, participants = await run_round_with_fault(tmp_path, urls, kill)
    try:
        assert on_doomed_before == {"coordinator", *NAMES}  # everyone was on the node that died
        await check_round(tmp_path, coordinator, participants)
        doomed_port = f":{doomed.state.port} "
        for transport in [coordinator.transport, *(p.transport for p in participants)]:
            assert isinstance(transport, AmqpTransport)
            where = transport.connection.connected_to
            assert where is not None and doomed_port not in where  # failed over to a live node
        after = {q["name"]: q for q in nodes.quorum_queues(others[0]) if q["name"] in watched}
        for queue in after.values():
            assert queue["leader"] != doomed.state.nodename  # a surviving member took over
    finally:
        await close_all(coordinator, participants)


def connections(node: LocalNode) -> list[dict[str, Any]]:
    """The client connections `node` holds (user, peer), as rabbitmqctl lists them."""
    out = node._ctl("list_connections", "-q", "user", "peer_port", "--formatter", "json")
    rows: list[dict[str, Any]] = json.loads(out) if out.strip() else []
    return rows
