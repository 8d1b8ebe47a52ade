"""A local RabbitMQ node from the Debian package, run as an ordinary process.

Everything the node writes lives in one data directory: its config, the
definitions it loads at boot, its Mnesia/quorum data, logs, and `HOME` (the
Erlang cookie). RabbitMQ 3.10.8 silently ignores a definitions file it cannot
parse, so every start ends by *checking* with rabbitmqctl that the vhost,
exchanges, queues, bindings, permissions and participants' limits are really there.

Hardened for a shared machine: the node's Erlang distribution port (and an epmd
that it starts) listen on loopback only, it runs the memory and disk alarms of
deploy/rabbitmq/rabbitmq.conf, and each participant user has connection and
channel limits (`PARTICIPANT_LIMITS`).

    node = LocalNode(Path(".chorus/rabbitmq"))
    node.start()                       # free ports picked, state kept in node.json
    node.coordinator_url               # amqp://coordinator:...@127.0.0.1:PORT/chorus
    node.add_participant("alice")      # -> generated password
    node.stop()

What the node should hold (users, permissions, limits, topology) is `broker.definitions`; this
module runs the process, imports the definitions into it, and checks that they took. Its helpers:
`broker.node_state` (node.json), `broker.node_network` (ports, listeners, epmd) and
`broker.node_admin` (running rabbitmqctl).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import structlog

from broker import topology
from broker.definitions import (
    DEFAULT_VHOST,
    PARTICIPANT_LIMITS,
    Listings,
    coordinator_grant,
    definitions,
    find_problems,
    participant_grant,
    render_definitions,
)
from broker.errors import NodeError, UsageError
from broker.node_admin import Rabbitmqctl
from broker.node_network import (
    LOOPBACK,
    exposed_addresses,
    free_port,
    port_accepts,
    port_is_free,
    speaks_plain_amqp,
    warn_if_epmd_exposed,
)
from broker.node_state import (
    DEFAULT_HOST,
    STATE_FILE,
    NodeState,
    check_same,
    load_state,
    save_state,
    write_private,
)
from broker.tls import TlsFiles
from broker.transport import Topology

log = structlog.get_logger(__name__)

RABBITMQ_BIN = Path(os.environ.get("CHORUS_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
CONSUMER_TIMEOUT_MS = 30 * 60 * 1000
# Idle Erlang schedulers otherwise busy-wait, which starves everything else on a small machine.
_ERL_ARGS = "+sbwt none +sbwtdcpu none +sbwtdio none"
# The management API and RabbitMQ's Prometheus endpoint, for operators (both bound to loopback).
PLUGINS = ("rabbitmq_management", "rabbitmq_prometheus")
# The node's Erlang distribution listener (and rabbitmqctl's) on loopback only: anyone who reaches it
# and has the cookie controls the node, so it is never exposed, whatever the AMQP host.
_DIST_ON_LOOPBACK = "-kernel inet_dist_use_interface {127,0,0,1}"

# The alarms shipped in deploy/rabbitmq/rabbitmq.conf (a test keeps the two in step): publishers
# are blocked before memory or disk run out, rather than the node crashing.
MEMORY_HIGH_WATERMARK = 0.6
DISK_FREE_LIMIT = "1GB"
# Overrides DISK_FREE_LIMIT on a machine with less free disk than that (e.g. 200MB).
DISK_FREE_LIMIT_ENV = "CHORUS_DISK_FREE_LIMIT"
# RabbitMQ's information units: k/K/kiB/KiB, M/MiB, G/GiB are powers of 2; kB/KB, MB, GB powers of 10.
_SIZE = re.compile(r"^[0-9]+(k|K|kiB|KiB|kB|KB|M|MiB|MB|G|GiB|GB)?$")


class RabbitMQMissing(UsageError):
    pass


class PortInUse(UsageError):
    pass


class NodeVerificationError(NodeError):
    """The node runs, but the definitions it should have loaded are not (all) there."""


# ---------------------------------------------------------------------------
# The node
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeStatus:
    running: bool
    nodename: str
    pid: int | None
    port: int
    vhost: str
    data_dir: Path
    participants: tuple[str, ...]


class LocalNode:
    """One RabbitMQ node whose every file lives under `data_dir`.

    A data directory that held a node before keeps its node name, ports, vhost,
    delivery limit and coordinator password (node.json); passing different ones is an error.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        dist_port: int | None = None,
        vhost: str | None = None,
        delivery_limit: int | None = None,
        host: str = DEFAULT_HOST,
        tls: TlsFiles | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self._process: subprocess.Popen[bytes] | None = None
        previous = load_state(self.data_dir / STATE_FILE)
        if previous is None:
            self.state = NodeState(
                nodename=f"chorus-{secrets.token_hex(4)}@localhost",
                port=port or free_port(host),
                dist_port=dist_port or free_port(LOOPBACK),
                host=host,
                vhost=vhost or DEFAULT_VHOST,
                delivery_limit=delivery_limit or topology.DEFAULT_DELIVERY_LIMIT,
                coordinator_password=secrets.token_urlsafe(18),
            )
        else:
            self.state = previous
            check_same("port", port, previous.port, self.data_dir)
            check_same("dist port", dist_port, previous.dist_port, self.data_dir)
            check_same("vhost", vhost, previous.vhost, self.data_dir)
            check_same("delivery limit", delivery_limit, previous.delivery_limit, self.data_dir)
        if tls is not None:  # kept in node.json; new files (a renewed certificate) replace the old ones
            self.state.tls = {k: str(Path(v).resolve()) for k, v in asdict(tls).items()}
        # A node.json from before the plugins were enabled has no ports for them yet.
        self.state.management_port = self.state.management_port or free_port(LOOPBACK)
        self.state.prometheus_port = self.state.prometheus_port or free_port(LOOPBACK)

    @classmethod
    def existing(cls, data_dir: Path) -> LocalNode:
        """The node a previous `start` set up in `data_dir` (for `down`/`status` from another process)."""
        if not (data_dir / STATE_FILE).is_file():
            raise UsageError(f"no broker was started in {data_dir} (no {STATE_FILE}); run: chorus-broker up")
        return cls(data_dir)

    # -- URLs --------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.state.port

    @property
    def vhost(self) -> str:
        return self.state.vhost

    @property
    def coordinator_url(self) -> str:
        return self.url_for(topology.COORDINATOR_USER, self.state.coordinator_password)

    @property
    def management_url(self) -> str:
        """The management HTTP API (users tagged for it only: the coordinator, not participants)."""
        return f"http://{LOOPBACK}:{self.state.management_port}/api"

    @property
    def prometheus_url(self) -> str:
        """RabbitMQ's own metrics, in the Prometheus text format."""
        return f"http://{LOOPBACK}:{self.state.prometheus_port}/metrics"

    def url_for(self, user: str, password: str, vhost: str | None = None) -> str:
        return self._url(user, quote(password, safe=""), vhost)

    def display_url(self, user: str = topology.COORDINATOR_USER) -> str:
        """The URL with the password masked, for logs and status lines."""
        return self._url(user, "***")

    def _url(self, user: str, quoted_password: str, vhost: str | None = None) -> str:
        where = f"{self.state.host}:{self.state.port}/{quote(vhost or self.state.vhost, safe='')}"
        scheme = "amqps" if self.state.tls else "amqp"
        return f"{scheme}://{quote(user, safe='')}:{quoted_password}@{where}"

    def topology(self, participants: Iterable[str] = ()) -> Topology:
        return topology.full_topology(participants, self.state.delivery_limit)

    # -- lifecycle ---------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Boot the node, load the definitions, and check they took. Returns once it serves AMQP."""
        _require_rabbitmq()
        if self.is_running():
            raise UsageError(f"the node in {self.data_dir} is already running (pid {self.state.pid})")
        for name, port, host in (
            ("AMQP", self.state.port, self.state.host),
            ("distribution", self.state.dist_port, LOOPBACK),
            ("management", self.state.management_port, LOOPBACK),
            ("Prometheus", self.state.prometheus_port, LOOPBACK),
        ):
            if not port_is_free(host, port):
                raise PortInUse(
                    f"{name} port {port} is already in use (another broker?); stop it, "
                    "or pick another port with --port / a new --dir"
                )
        self._write_files()
        output = open(self._log_dir / "node.out", "ab")  # noqa: SIM115 - handed to the child process
        with output:
            self._process = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,  # its own process group: kill() takes the whole node, nothing else
            )
        self.state.pid = self._process.pid
        save_state(self.data_dir / STATE_FILE, self.state)
        log.info(
            "starting rabbitmq", node=self.state.nodename, port=self.state.port, data_dir=str(self.data_dir)
        )
        try:
            self._wait_until_serving(timeout)
            self._check_listeners()
            found = self._listings(self.state.vhost, limits=bool(self.state.participants))
            self._raise_problems(self._restore_participant_limits(found))
            if self.state.tls and speaks_plain_amqp(self.state.host, self.state.port):
                raise NodeError(f"port {self.state.port} serves plain AMQP although TLS was asked for")
        except BaseException:
            self.kill()
            raise
        log.info("rabbitmq is up", node=self.state.nodename, url=self.display_url())

    def stop(self, timeout: float = 30.0) -> None:
        """Stop gracefully (rabbitmqctl stop); SIGKILL if it does not go in time."""
        if not self.is_running():
            self._forget_pid()
            return
        try:
            self._ctl("stop", timeout=timeout)
        except NodeError as e:
            log.warning("graceful stop failed; killing", error=str(e))
        if not self._wait_for_exit(timeout):
            self.kill()
            return
        self._forget_pid()

    def kill(self) -> None:
        """SIGKILL the node's process group, as a crash would. `start()` brings it back on the same ports."""
        pid = self.state.pid
        if pid is not None and _is_our_node(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            self._wait_for_exit(10.0)
        self._forget_pid()

    def is_running(self) -> bool:
        pid = self.state.pid
        if pid is None:
            return False
        if self._process is not None and self._process.pid == pid:
            return self._process.poll() is None
        return _is_our_node(pid)

    def status(self) -> NodeStatus:
        return NodeStatus(
            running=self.is_running(),
            nodename=self.state.nodename,
            pid=self.state.pid,
            port=self.state.port,
            vhost=self.state.vhost,
            data_dir=self.data_dir,
            participants=tuple(self.state.participants),
        )

    # -- users -------------------------------------------------------------

    def add_participant(self, name: str, password: str | None = None) -> str:
        """Create a least-privilege user, its reply queue and bindings; returns its password."""
        return self.add_participants({name: password})[name]

    def add_participants(self, passwords: Mapping[str, str | None]) -> dict[str, str]:
        """`add_participant` for several at once (one import, one check); a None password is generated."""
        chosen = {name: password or secrets.token_urlsafe(18) for name, password in passwords.items()}
        grants = [participant_grant(name, password) for name, password in chosen.items()]
        topo = topology.participant_topology(chosen, self.state.delivery_limit)
        self._import(definitions(topo, self.state.vhost, grants))
        problems = find_problems(topo, self.state.vhost, grants, self._listings(self.state.vhost, full=False))
        if problems:
            raise NodeVerificationError("participants were not set up: " + "; ".join(problems))
        self.state.participants += [name for name in chosen if name not in self.state.participants]
        save_state(self.data_dir / STATE_FILE, self.state)
        log.info("participants added", participants=sorted(chosen), vhost=self.state.vhost)
        return chosen

    def add_vhost(self, vhost: str, participants: Iterable[str] = ()) -> dict[str, str]:
        """Another vhost with the full Chorus topology, for tests that want a broker of their own.

        Returns user -> AMQP URL on that vhost: the coordinator, and each participant
        with a new password (users are node-wide: an existing participant's password changes).
        """
        names = list(participants)
        passwords = {name: secrets.token_urlsafe(18) for name in names}
        grants = [coordinator_grant(self.state.coordinator_password)]
        grants += [participant_grant(name, passwords[name]) for name in names]
        topo = topology.full_topology(names, self.state.delivery_limit)
        self._import(definitions(topo, vhost, grants))
        problems = find_problems(topo, vhost, grants, self._listings(vhost, limits=bool(names)))
        if problems:
            raise NodeVerificationError(f"vhost {vhost!r} was not set up: " + "; ".join(problems))
        urls = {
            topology.COORDINATOR_USER: self.url_for(
                topology.COORDINATOR_USER, self.state.coordinator_password, vhost
            )
        }
        urls.update({name: self.url_for(name, password, vhost) for name, password in passwords.items()})
        return urls

    def close_all_connections(self, explanation: str = "closed by broker.local_node") -> None:
        """Make the broker drop every client connection on the vhost, as a network failure would."""
        self._ctl("close_all_connections", "-p", self.state.vhost, explanation)

    def verify(self) -> None:
        """Check the vhost, topology, permissions and participants' limits exist (3.10.8 skips
        an unparsable definitions file)."""
        self._raise_problems(self._listings(self.state.vhost, limits=bool(self.state.participants)))

    def _raise_problems(self, found: Listings) -> None:
        grants = [coordinator_grant(self.state.coordinator_password)]
        grants += [participant_grant(name, "unused") for name in self.state.participants]
        topo = self.topology(self.state.participants)
        problems = find_problems(topo, self.state.vhost, grants, found)
        if problems:
            raise NodeVerificationError(
                "RabbitMQ started but did not load its definitions ("
                + "; ".join(problems)
                + f"). RabbitMQ 3.10.8 silently skips a definitions file it cannot parse: check "
                f"{self.data_dir / 'definitions.json'} and the log in {self._log_dir}"
            )

    # -- internals ---------------------------------------------------------

    @property
    def _log_dir(self) -> Path:
        return self.data_dir / "log"

    def _write_files(self) -> None:
        for sub in ("home", "mnesia", "log"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        core = topology.core_topology(self.state.delivery_limit)
        document = definitions(core, self.state.vhost, [coordinator_grant(self.state.coordinator_password)])
        write_private(self.data_dir / "definitions.json", render_definitions(document))
        (self.data_dir / "rabbitmq.conf").write_text(self._config())
        (self.data_dir / "enabled_plugins").write_text(f"[{','.join(PLUGINS)}].\n")
        (self.data_dir / "rabbitmq-env.conf").write_text(
            "# empty: keeps /etc/rabbitmq/rabbitmq-env.conf out\n"
        )

    def _config(self) -> str:
        config = (
            "# Generated by broker.local_node for this data directory.\n"
            f"load_definitions = {self.data_dir / 'definitions.json'}\n"
            f"default_vhost = {self.state.vhost}\n"
            f"consumer_timeout = {CONSUMER_TIMEOUT_MS}\n"
            f"vm_memory_high_watermark.relative = {MEMORY_HIGH_WATERMARK}\n"
            f"disk_free_limit.absolute = {disk_free_limit()}\n"
            # Operators' views, on loopback only: reach them through an SSH tunnel or a reverse proxy.
            f"management.tcp.ip = {LOOPBACK}\n"
            f"management.tcp.port = {self.state.management_port}\n"
            f"prometheus.tcp.ip = {LOOPBACK}\n"
            f"prometheus.tcp.port = {self.state.prometheus_port}\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        if self.state.tls:
            tls = self.state.tls
            config += (
                "listeners.tcp = none\n"
                f"listeners.ssl.default = {self.state.host}:{self.state.port}\n"
                f"ssl_options.cacertfile = {tls['ca_file']}\n"
                f"ssl_options.certfile = {tls['cert_file']}\n"
                f"ssl_options.keyfile = {tls['key_file']}\n"
                "ssl_options.verify = verify_peer\n"
                "ssl_options.fail_if_no_peer_cert = true\n"
                "ssl_options.versions.1 = tlsv1.3\n"
                "ssl_options.versions.2 = tlsv1.2\n"
            )
        return config

    def _env(self) -> dict[str, str]:
        """The node's environment, also used for rabbitmqctl and the other CLI tools."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        if "ERL_EPMD_PORT" in os.environ:  # where this host's epmd is: every Erlang tool must agree
            env["ERL_EPMD_PORT"] = os.environ["ERL_EPMD_PORT"]
        env.update(
            HOME=str(self.data_dir / "home"),
            RABBITMQ_NODENAME=self.state.nodename,
            RABBITMQ_NODE_IP_ADDRESS=self.state.host,
            RABBITMQ_NODE_PORT=str(self.state.port),
            RABBITMQ_DIST_PORT=str(self.state.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.data_dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self._log_dir),
            RABBITMQ_CONFIG_FILE=str(self.data_dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.data_dir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.data_dir / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.data_dir / "rabbitmq-env.conf"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=f"{_ERL_ARGS} {_DIST_ON_LOOPBACK}",
            RABBITMQ_CTL_ERL_ARGS=_DIST_ON_LOOPBACK,
            # Only an epmd that the node (or rabbitmqctl) starts itself: one already running stays
            # where it listens, which `_check_listeners` reports.
            ERL_EPMD_ADDRESS=LOOPBACK,
            ERL_CRASH_DUMP=str(self._log_dir / "erl_crash.dump"),
        )
        if self.state.tls:
            # 3.10.8 turns RABBITMQ_NODE_PORT into a plain TCP listener (and opens no TLS one on that
            # port) unless the config says `listeners.tcp = none`; leave it out all the same.
            del env["RABBITMQ_NODE_IP_ADDRESS"], env["RABBITMQ_NODE_PORT"]
        return env

    def _check_listeners(self) -> None:
        """The distribution port must listen on loopback only; an exposed epmd is reported."""
        exposed = exposed_addresses(self.state.dist_port)
        if exposed:
            raise NodeError(
                f"the Erlang distribution port {self.state.dist_port} listens on {', '.join(exposed)}, "
                f"not only on {LOOPBACK}; see the log in {self._log_dir}"
            )
        warn_if_epmd_exposed()

    def _restore_participant_limits(self, found: Listings) -> Listings:
        """Set the limits of participants that lack them (made before they existed, or changed by
        hand); returns the listings, fetched again when anything changed."""
        names = [n for n in self.state.participants if found.limits_of(n) != dict(PARTICIPANT_LIMITS)]
        if not names:
            return found
        limits = json.dumps(dict(PARTICIPANT_LIMITS))
        for name in names:
            self._ctl("set_user_limits", name, limits)
        log.info("participant limits set", participants=sorted(names), limits=limits)
        return self._listings(self.state.vhost)

    def _wait_until_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not port_accepts(self.state.host, self.state.port):
            if self._process is not None and self._process.poll() is not None:
                raise self._startup_failure()
            if time.monotonic() > deadline:
                raise NodeError(
                    f"RabbitMQ did not open port {self.state.port} in {timeout:.0f}s; see {self._log_dir}"
                )
            time.sleep(0.2)
        self._ctl(
            "await_startup", "--timeout", str(max(1, int(deadline - time.monotonic()))), timeout=timeout
        )

    def _startup_failure(self) -> NodeError:
        tail = _tail(self._log_dir / "node.out") + _tail(self._log_dir / f"{self.state.nodename}.log")
        if "eaddrinuse" in tail or "dist_port_already_used" in tail:
            ports = f"{self.state.port} or {self.state.dist_port}"
            return PortInUse(
                f"RabbitMQ could not listen: port {ports} is already in use; pick another --port"
            )
        return NodeError(f"RabbitMQ exited during start-up; last log lines:\n{tail[-2000:]}")

    def _wait_for_exit(self, timeout: float) -> bool:
        pid = self.state.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.pid == pid:
                if self._process.poll() is not None:
                    return True
            elif pid is None or not _is_our_node(pid):  # a zombie counts as gone
                return True
            time.sleep(0.1)
        return False

    def _forget_pid(self) -> None:
        self._process = None
        if self.state.pid is not None:
            self.state.pid = None
            save_state(self.data_dir / STATE_FILE, self.state)

    def _rabbitmqctl(self) -> Rabbitmqctl:
        """rabbitmqctl aimed at this node, with the node's environment (also for tests' own commands)."""
        return Rabbitmqctl(RABBITMQ_BIN / "rabbitmqctl", self.state.nodename, self._env(), self.data_dir)

    def _ctl(self, *args: str, timeout: float = 30.0, stdin: str | None = None) -> str:
        return self._rabbitmqctl().run(*args, timeout=timeout, stdin=stdin)

    def _listings(self, vhost: str, *, full: bool = True, limits: bool = True) -> Listings:
        return self._rabbitmqctl().listings(vhost, full=full, limits=limits)

    def _import(self, document: dict[str, Any]) -> None:
        self._rabbitmqctl().import_definitions(document)


def _require_rabbitmq() -> None:
    if not (RABBITMQ_BIN / "rabbitmq-server").is_file() or shutil.which("erl") is None:
        raise RabbitMQMissing(
            f"RabbitMQ is not installed ({RABBITMQ_BIN / 'rabbitmq-server'} or erl missing); "
            "run: apt-get install -y rabbitmq-server"
        )


def disk_free_limit() -> str:
    """The disk alarm's free-space limit: `$CHORUS_DISK_FREE_LIMIT`, else the shipped 1GB."""
    value = os.environ.get(DISK_FREE_LIMIT_ENV, "").strip() or DISK_FREE_LIMIT
    if not _SIZE.match(value):
        raise UsageError(
            f"{DISK_FREE_LIMIT_ENV}={value!r} is not a RabbitMQ size; use e.g. 1GB, 200MB or 500000000"
        )
    return value


def _is_our_node(pid: int) -> bool:
    """Whether `pid` is still a rabbitmq-server (and not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    zombie = stat.rpartition(")")[2].split()[0] == "Z"
    return not zombie and b"rabbitmq-server" in cmdline


def _tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""
