"""A round on a three-node RabbitMQ cluster survives losing the node that leads its quorum queues."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cluster import LocalCluster
from support.faults import NAMES, check_round, close_all, run_round_with_fault

from broker.connect import open_transport
from broker.topology import intake_queue, intake_topology, reply_queue

pytestmark = [pytest.mark.amqp, pytest.mark.soak, pytest.mark.timeout(600)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[LocalCluster, dict[str, str]]]:
    cluster = LocalCluster(tmp_path / "cluster")
    try:
        passwords = cluster.start(NAMES)
        yield cluster, passwords
    finally:
        cluster.stop()
        assert not any(node.is_running() for node in cluster.nodes)


async def test_round_survives_losing_the_quorum_leader_node(
    tmp_path: Path, cluster: tuple[LocalCluster, dict[str, str]]
) -> None:
    nodes, passwords = cluster
    doomed, serving = nodes.nodes[0], nodes.nodes[1]
    everyone = {n.state.nodename for n in nodes.nodes}
    # Intake queues are the coordinator's to declare: declared through the first node, they are led by
    # it (client-local); the coordinator's own declare, later through the second node, finds them there.
    async with open_transport(nodes.coordinator_url(doomed)) as on_doomed:
        await on_doomed.declare(intake_topology(NAMES))
    watched = {intake_queue(n) for n in NAMES} | {reply_queue(n) for n in NAMES}
    before = {q["name"]: q for q in nodes.quorum_queues(serving) if q["name"] in watched}
    assert before.keys() == watched
    for queue in before.values():
        assert set(queue["members"]) == everyone  # replicated on all three nodes
        assert queue["leader"] == doomed.state.nodename  # and led by the node about to die

    # Every client talks to the second node; the first one holds the leaders and gets SIGKILLed.
    urls = {"coordinator": nodes.coordinator_url(serving)}
    urls |= {name: serving.url_for(name, passwords[name]) for name in NAMES}

    def kill() -> None:
        doomed.kill()
        assert not doomed.is_running()

    coordinator, participants = await run_round_with_fault(tmp_path, urls, kill)
    try:
        await check_round(tmp_path, coordinator, participants)
        after = {q["name"]: q for q in nodes.quorum_queues(serving) if q["name"] in watched}
        for queue in after.values():
            assert queue["leader"] != doomed.state.nodename  # a surviving member took over
    finally:
        await close_all(coordinator, participants)
