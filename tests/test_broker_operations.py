"""What operators get from the local node: the management API and RabbitMQ's Prometheus metrics, on
loopback, readable with the coordinator's login and not with a participant's."""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

import pytest

from broker.local_node import LocalNode
from broker.topology import COORDINATOR_USER

pytestmark = pytest.mark.amqp


def get(url: str, user: str | None = None, password: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def listening_addresses(port: int) -> set[str]:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True)
    return {line.split()[3].rsplit(":", 1)[0] for line in out.stdout.splitlines()}


def test_the_coordinator_reads_the_management_api_and_a_participant_cannot(
    rabbit_node: LocalNode, rabbit_vhost: Callable[..., dict[str, str]]
) -> None:
    urls = rabbit_vhost(participants=("ops-alice",))
    alice_password = urllib.parse.unquote(urls["ops-alice"].split(":")[2].split("@")[0])
    status, body = get(
        f"{rabbit_node.management_url}/overview", COORDINATOR_USER, rabbit_node.state.coordinator_password
    )
    assert status == 200 and json.loads(body)["rabbitmq_version"]
    status, body = get(
        f"{rabbit_node.management_url}/queues", COORDINATOR_USER, rabbit_node.state.coordinator_password
    )
    assert status == 200 and any(q["name"] == "chorus.lobby" for q in json.loads(body))
    for path in ("overview", "queues", "users", "connections"):
        status, _ = get(f"{rabbit_node.management_url}/{path}", "ops-alice", alice_password)
        assert status == 401, path  # a participant has no management tag
    assert get(f"{rabbit_node.management_url}/overview")[0] == 401


def test_prometheus_metrics_are_served_and_both_listen_on_loopback_only(rabbit_node: LocalNode) -> None:
    status, body = get(rabbit_node.prometheus_url)
    assert status == 200 and b"rabbitmq_" in body
    for port in (rabbit_node.state.management_port, rabbit_node.state.prometheus_port):
        assert listening_addresses(port) == {"127.0.0.1"}, port
