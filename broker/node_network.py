"""What a local node's ports and listeners look like from this host.

Picking free ports, checking whether a port is taken or already accepts connections, telling a
TLS listener from a plain AMQP one, and reading /proc/net to see where a port listens, so that
the node's Erlang distribution port and this host's epmd are known to stay on loopback.
`broker.local_node` runs the node; this module only looks at sockets.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

LOOPBACK = "127.0.0.1"
EPMD_PORT = 4369  # epmd's default; ERL_EPMD_PORT moves it


def epmd_port() -> int:
    value = os.environ.get("ERL_EPMD_PORT", "")
    return int(value) if value.isdigit() else EPMD_PORT


def warn_if_epmd_exposed() -> list[str]:
    """Warn when this host's epmd listens beyond loopback; returns those addresses.

    ERL_EPMD_ADDRESS only binds an epmd that our node starts: one already running (e.g. the
    Debian package's system node started it) keeps listening where it does, and tells whoever
    asks which node names and distribution ports this host has.
    """
    port = epmd_port()
    exposed = exposed_addresses(port)
    if exposed:
        log.warning(
            "epmd listens beyond loopback",
            port=port,
            addresses=exposed,
            hint=(
                "it was started before this node, without ERL_EPMD_ADDRESS=127.0.0.1; stop it once no "
                "node uses it (`epmd -kill`, or stop the system rabbitmq-server first) so the next start "
                "binds a new one to loopback, or firewall the port"
            ),
        )
    return exposed


def exposed_addresses(port: int) -> list[str]:
    """The non-loopback addresses a TCP socket listens on at `port` (from /proc/net; [] if unreadable)."""
    return sorted(a for a in _listening_addresses(port) if not _is_loopback(a))


def _listening_addresses(port: int) -> set[str]:
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            columns = line.split()
            if len(columns) < 4 or columns[3] != "0A":  # 0A: LISTEN
                continue
            address, _, hex_port = columns[1].partition(":")
            if int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(address)
            if sys.byteorder == "little":  # the kernel prints each 32-bit word in host order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(str(ipaddress.ip_address(raw)))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # a just-killed node's TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def port_accepts(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def speaks_plain_amqp(host: str, port: int) -> bool:
    """Whether `port` answers an AMQP 0-9-1 protocol header with a frame (a TLS listener does not)."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"AMQP\x00\x00\x09\x01")
        try:
            return s.recv(1) == b"\x01"  # frame type 1: the Connection.Start method
        except OSError:
            return False
