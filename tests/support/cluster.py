"""A three-node RabbitMQ cluster on this machine, for the soak tests.

Each node is a `broker.local_node.LocalNode` in its own directory, on its own
AMQP and distribution ports; they share one Erlang cookie (written into each
node's HOME before it boots) and the second and third join the first with
`rabbitmqctl join_cluster`. The first node boots with the Chorus definitions,
so its quorum queues start with one member; `rabbitmq-queues grow` then adds
the other two nodes to every quorum queue (queues declared later get all three
by default). Users, vhosts and permissions are cluster-wide, and every node
re-imports its definitions file at boot, so every node gets the first node's
coordinator password.

A test helper, not product code: a production cluster is deployed (see
deploy/rabbitmq), not launched from Python.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker.local_node import RABBITMQ_BIN, LocalNode


class LocalCluster:
    def __init__(self, root: Path, size: int = 3) -> None:
        self.nodes = [LocalNode(root / f"node{i}") for i in range(size)]
        self._cookie = secrets.token_hex(16).upper()

    @property
    def first(self) -> LocalNode:
        return self.nodes[0]

    def start(self, participants: Sequence[str] = ()) -> dict[str, str]:
        """Boot and cluster every node; create the participants; returns their passwords."""
        for node in self.nodes:
            cookie = node.data_dir / "home" / ".erlang.cookie"
            cookie.parent.mkdir(parents=True, exist_ok=True)
            cookie.write_text(self._cookie)
            cookie.chmod(0o400)
        self.first.start()
        for node in self.nodes[1:]:
            # Each node re-imports its definitions file on every boot, cluster-wide: they must agree.
            node.state.coordinator_password = self.first.state.coordinator_password
            node.start()
            node._ctl("stop_app")
            node._ctl("reset")
            node._ctl("join_cluster", self.first.state.nodename, timeout=60)
            node._ctl("start_app", timeout=60)
        members = {m for m in self._status()["running_nodes"]}
        expected = {n.state.nodename for n in self.nodes}
        if members != expected:
            raise RuntimeError(f"cluster formed with {sorted(members)}, expected {sorted(expected)}")
        for node in self.nodes[1:]:
            self.queues("grow", node.state.nodename, "all", "--vhost-pattern", ".*", "--queue-pattern", ".*")
        return self.first.add_participants(dict.fromkeys(participants)) if participants else {}

    def url_for(self, node: LocalNode, user: str, password: str) -> str:
        return node.url_for(user, password)

    def coordinator_url(self, node: LocalNode) -> str:
        return node.url_for("coordinator", self.first.state.coordinator_password)

    def quorum_queues(self, via: LocalNode) -> list[dict[str, Any]]:
        """name, leader and members of every queue of the vhost, as `via` sees them."""
        out = via._ctl(
            "list_queues", "-p", via.vhost, "name", "type", "leader", "members", "--formatter", "json"
        )
        rows: list[dict[str, Any]] = json.loads(out) if out.strip() else []
        return [r for r in rows if r.get("type") == "quorum"]

    def queues(self, *args: str) -> str:
        """rabbitmq-queues against the first node (grow, add_member, ...)."""
        node = self.first
        done = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmq-queues"), "-n", node.state.nodename, "-q", *args],
            env=node._env(),
            cwd=node.data_dir,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmq-queues {' '.join(args)} failed: {(done.stderr or done.stdout)}")
        return done.stdout

    def _status(self) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(self.first._ctl("cluster_status", "--formatter", "json"))
        return status

    def stop(self) -> None:
        """Stop every node still running (the killed ones are gone already)."""
        for node in reversed(self.nodes):
            with contextlib.suppress(Exception):
                node.stop()
            if node.is_running():
                node.kill()
