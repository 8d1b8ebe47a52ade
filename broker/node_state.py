"""What a local node's data directory remembers between runs: node.json.

`NodeState` is the node name, ports, vhost, delivery limit, coordinator password, participants,
pid and TLS files of one node; this module reads and writes it (readable by its owner only),
drops keys that earlier versions wrote, and refuses options that contradict what a directory
was set up with. `broker.local_node` decides what goes in it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from broker import topology
from broker.definitions import DEFAULT_VHOST
from broker.errors import UsageError

STATE_FILE = "node.json"
DEFAULT_HOST = "127.0.0.1"


@dataclass
class NodeState:
    """What a node's data directory remembers between runs (node.json, readable by its owner only)."""

    nodename: str
    port: int
    dist_port: int
    host: str = DEFAULT_HOST
    vhost: str = DEFAULT_VHOST
    delivery_limit: int = topology.DEFAULT_DELIVERY_LIMIT
    coordinator_password: str = ""
    participants: list[str] = field(default_factory=list)
    pid: int | None = None
    management_port: int = 0  # the management API and UI, on loopback (0: not chosen yet)
    prometheus_port: int = 0  # the Prometheus metrics endpoint, on loopback
    tls: dict[str, str] | None = None  # TlsFiles' paths: AMQP over TLS only, client certificates required


# Keys of node.json files that earlier versions wrote and this one ignores (shard queues are gone).
_RETIRED_STATE_KEYS = ("shards",)


def load_state(path: Path) -> NodeState | None:
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        if isinstance(saved, dict):
            for key in _RETIRED_STATE_KEYS:
                saved.pop(key, None)
        return NodeState(**saved)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path} is not a Chorus broker state file ({e}); use another --dir") from e


def save_state(path: Path, state: NodeState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, json.dumps(asdict(state), indent=2) + "\n")


def write_private(path: Path, text: str) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(text)


def check_same(what: str, given: object, kept: object, data_dir: Path) -> None:
    if given is not None and given != kept:
        raise UsageError(
            f"the broker in {data_dir} was set up with {what} {kept}, not {given}; "
            "leave the option out or use another --dir"
        )
