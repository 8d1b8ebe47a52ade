"""Where a run's services connect: the embedded broker, a local RabbitMQ node, or an existing one.

Brokers: the embedded `MemoryBroker` (default); `local`, a RabbitMQ node started
in `<results>/rabbitmq` the way `chorus-broker up` starts one (participant users
with least privilege), stopped at the end; or `amqp://...`, an existing broker
whose participant users exist already (each `[[participants]]` entry names its
own `broker_url`) or are created in the local node directory given as `broker_dir`.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from broker.addresses import redact_password
from broker.topology import COORDINATOR_USER, full_topology
from broker.transport import Transport
from federation.config import LoadedConfig, RunConfigError
from schemas.errors import ChorusError

NODE_DIR = "rabbitmq"


@dataclass
class BrokerPlan:
    coordinator: Callable[[], Transport]
    participants: dict[str, Callable[[], Transport]]
    description: str
    close: Callable[[], None] = lambda: None


def plan_broker(
    broker: str,
    broker_dir: Path | None,
    config: LoadedConfig,
    results: Path,
    on_node: Callable[[str], None],
) -> BrokerPlan:
    """How the coordinator and each participant connect to `broker`: "memory", "local" or an amqp:// URL."""
    ids = [p.id for p in config.run.participants]
    if broker == "memory":
        return _memory_plan(ids)
    if broker == "local":
        return _local_node_plan(ids, results / NODE_DIR, on_node)
    if broker.startswith(("amqp://", "amqps://")):
        urls = _participant_urls(broker_dir, config)
        return _amqp_plan(broker, urls, f"RabbitMQ at {redact_password(broker)}", close=lambda: None)
    raise RunConfigError(f"--broker must be memory, local or amqp://..., got {broker!r}")


def _memory_plan(ids: list[str]) -> BrokerPlan:
    from broker.memory import MemoryBroker

    memory = MemoryBroker()
    memory.declare(full_topology(ids))
    return BrokerPlan(
        coordinator=lambda: memory.connect(COORDINATOR_USER),
        participants={pid: partial(memory.connect, pid) for pid in ids},
        description="embedded memory broker",
    )


def _local_node_plan(ids: list[str], node_dir: Path, on_node: Callable[[str], None]) -> BrokerPlan:
    """A fresh RabbitMQ node in `node_dir` (one left by an earlier run is stopped and removed first),
    stopped when the run closes the plan."""
    from broker.cli import bring_up
    from broker.local_node import LocalNode

    if (node_dir / "node.json").is_file():
        with contextlib.suppress(ChorusError):
            LocalNode.existing(node_dir).stop()
    shutil.rmtree(node_dir, ignore_errors=True)
    on_node(f"starting a local RabbitMQ node in {node_dir}")
    node, passwords = bring_up(node_dir, participants=ids)
    urls = {pid: node.url_for(pid, passwords[pid]) for pid in ids}
    return _amqp_plan(
        node.coordinator_url, urls, f"local RabbitMQ node {node.display_url()}", close=node.stop
    )


def _amqp_plan(
    coordinator_url: str, urls: dict[str, str], description: str, close: Callable[[], None]
) -> BrokerPlan:
    """Every service on its own AMQP connection: the coordinator's URL, and each participant's own user."""
    from broker.connect import open_transport

    return BrokerPlan(
        coordinator=lambda: open_transport(coordinator_url, connection_name="chorus-run-coordinator"),
        participants={
            pid: partial(open_transport, url, user=pid, connection_name=f"chorus-run-{pid}")
            for pid, url in urls.items()
        },
        description=description,
        close=close,
    )


def _participant_urls(broker_dir: Path | None, config: LoadedConfig) -> dict[str, str]:
    given = {p.id: p.broker_url for p in config.run.participants if p.broker_url}
    missing = [p.id for p in config.run.participants if p.id not in given]
    if not missing:
        return given
    if broker_dir is None:
        raise RunConfigError(
            f"with --broker amqp://..., every participant needs its own broker user: give broker_url = "
            f'"amqp://ID:PASSWORD@HOST:PORT/VHOST" in its [[participants]] entry (create users with '
            f"`chorus-broker add-participant ID`), or pass --broker-dir DIR of a chorus-broker node to "
            f"create them there (missing: {', '.join(missing)})"
        )
    from broker.local_node import LocalNode

    node = LocalNode.existing(broker_dir)
    passwords = node.add_participants(dict.fromkeys(missing))
    return given | {pid: node.url_for(pid, passwords[pid]) for pid in missing}
