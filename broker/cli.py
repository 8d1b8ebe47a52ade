"""`chorus-broker`: run a local RabbitMQ node for Chorus (tests, the demo, one-machine rounds).

    chorus-broker up [--dir D] [--port P] [--participants a,b] [--tls-dir T]
    chorus-broker dev-certs T [--clients a,b]
    chorus-broker status [--dir D]
    chorus-broker add-participant NAME [--password-file F] [--dir D]
    chorus-broker down [--dir D]
    chorus-broker write-definitions [PATH]      # regenerates deploy/rabbitmq/definitions.json

`up` prints the coordinator's AMQP URL on the first line of stdout, so
`URL=$(chorus-broker up | head -n1)` works; logs go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from broker import topology
from broker.definitions import checked_in_definitions, render_definitions
from broker.errors import UsageError
from broker.local_node import LocalNode
from broker.tls import TlsError, TlsFiles, add_client_cert, make_dev_certs, with_client_files
from common.exits import run_command
from common.logs import configure_logging

DEFAULT_DIR = Path(os.environ.get("CHORUS_BROKER_DIR", ".chorus/rabbitmq"))
DEFINITIONS_FILE = Path("deploy/rabbitmq/definitions.json")  # from the repository root
EXIT_NOT_RUNNING = 3  # like `systemctl status` for a stopped service


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging("debug" if args.verbose else "info")
    return run_command("chorus-broker", lambda: int(args.run(args)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chorus-broker",
        description="Run a local RabbitMQ node with the Chorus topology, users and permissions.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up",
        help="start the node in the background and print the coordinator's AMQP URL",
        description="Start (or restart) the node kept in --dir; prints the coordinator URL first, "
        "then one 'NAME URL' line per new participant (their passwords are shown only here).",
    )
    _add_dir(up)
    up.add_argument("--port", type=int, help="AMQP port (default: a free one, remembered in the dir)")
    up.add_argument("--dist-port", type=int, help="Erlang distribution port (default: a free one)")
    up.add_argument("--vhost", help="virtual host (default chorus)")
    up.add_argument(
        "--participants", type=_names, default=[], help="comma-separated participant ids to create"
    )
    up.add_argument(
        "--tls-dir",
        type=Path,
        help="AMQP over TLS only, client certificates required: DIR holds ca.pem, server.pem, server.key "
        "(remembered in the dir; URLs carry DIR/USER.pem and DIR/USER.key when they exist)",
    )
    up.set_defaults(run=_up)

    certs = commands.add_parser(
        "dev-certs",
        help="make a throwaway CA, a server certificate for localhost and client certificates",
        description="Write ca.pem/ca.key, server.pem/server.key (localhost, 127.0.0.1) and USER.pem/USER.key "
        "for the coordinator and each --clients name into DIR, for `up --tls-dir DIR`; where DIR has a CA "
        "already, only adds the --clients certificates. For tests and one-machine demos only: the CA's key "
        "lies next to it.",
    )
    certs.add_argument("tls_dir", metavar="DIR", type=Path)
    certs.add_argument("--clients", type=_names, default=[], help="comma-separated participant ids")
    certs.set_defaults(run=_dev_certs)

    down = commands.add_parser("down", help="stop the node", description="Stop the node kept in --dir.")
    _add_dir(down)
    down.set_defaults(run=_down)

    status = commands.add_parser(
        "status",
        help="say whether the node runs, and its URL",
        description=f"Print the node's state; exit code 0 when it runs, {EXIT_NOT_RUNNING} when it does not.",
    )
    _add_dir(status)
    status.set_defaults(run=_status)

    add = commands.add_parser(
        "add-participant",
        help="create a participant user with least privilege, and its reply queue",
        description="Create participant NAME: it may publish only generations/control under its own id "
        "and read only its own reply queue. The password is printed once unless --password-file gives it.",
    )
    add.add_argument("name", metavar="NAME", help="participant id (letters, digits, '_' or '-')")
    add.add_argument("--password-file", type=Path, help="read the password from this file instead")
    _add_dir(add)
    add.set_defaults(run=_add_participant)

    write = commands.add_parser(
        "write-definitions",
        help="regenerate deploy/rabbitmq/definitions.json from broker.topology and broker.definitions",
        description="Write the definitions document for an operator's broker (core topology, the "
        "coordinator with the development password) to PATH; '-' writes it to stdout.",
    )
    write.add_argument(
        "path",
        metavar="PATH",
        type=Path,
        nargs="?",
        default=DEFINITIONS_FILE,
        help=f"where to write it (default {DEFINITIONS_FILE}, from the repository root)",
    )
    write.set_defaults(run=_write_definitions)
    return parser


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help=f"node data directory (default {DEFAULT_DIR}, $CHORUS_BROKER_DIR)",
    )


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def bring_up(
    data_dir: Path,
    *,
    port: int | None = None,
    dist_port: int | None = None,
    vhost: str | None = None,
    participants: Sequence[str] = (),
    tls_dir: Path | None = None,
) -> tuple[LocalNode, dict[str, str]]:
    """What `chorus-broker up` does: start the node unless it runs, add new participants.

    Returns the node and the passwords of the participants it created.
    """
    tls = _server_files(tls_dir) if tls_dir is not None else None
    node = LocalNode(data_dir, port=port, dist_port=dist_port, vhost=vhost, tls=tls)
    if not node.is_running():
        node.start()
    new = [name for name in participants if name not in node.state.participants]
    passwords = node.add_participants(dict.fromkeys(new)) if new else {}
    return node, passwords


def _up(args: argparse.Namespace) -> int:
    node, passwords = bring_up(
        args.dir,
        port=args.port,
        dist_port=args.dist_port,
        vhost=args.vhost,
        participants=args.participants,
        tls_dir=args.tls_dir,
    )
    print(_with_certificate(node, node.coordinator_url, topology.COORDINATOR_USER))
    for name in args.participants:
        if name in passwords:
            print(f"{name} {_with_certificate(node, node.url_for(name, passwords[name]), name)}")
        else:
            print(f"{name} {node.display_url(name)} (exists; password unchanged)")
    return 0


def _server_files(tls_dir: Path) -> TlsFiles:
    try:
        return TlsFiles.in_dir(tls_dir)
    except TlsError as e:
        raise UsageError(f"{e}; make development ones with: chorus-broker dev-certs {tls_dir}") from e


def _with_certificate(node: LocalNode, url: str, user: str) -> str:
    """On a TLS node, `url` with the CA and USER.pem/USER.key from its TLS dir, where that user has them."""
    if not node.state.tls:
        return url
    try:
        return with_client_files(url, TlsFiles.in_dir(Path(node.state.tls["ca_file"]).parent, user))
    except TlsError:
        return url


def _dev_certs(args: argparse.Namespace) -> int:
    """A new CA and server certificate; where DIR has a CA already, only the client certificates asked for."""
    if (args.tls_dir / "ca.key").is_file():
        clients = {name: add_client_cert(args.tls_dir, name) for name in args.clients}
    else:
        certs = make_dev_certs(args.tls_dir, clients=[topology.COORDINATOR_USER, *args.clients])
        print(f"ca {certs.ca_file}\nserver {certs.server.cert_file}")
        clients = certs.clients
    for name, files in clients.items():
        print(f"{name} {files.cert_file}")
    return 0


def _down(args: argparse.Namespace) -> int:
    node = LocalNode.existing(args.dir)
    node.stop()
    print(f"stopped {node.state.nodename}")
    return 0


def _status(args: argparse.Namespace) -> int:
    node = LocalNode.existing(args.dir)
    status = node.status()
    state = f"running, pid {status.pid}" if status.running else "stopped"
    print(f"node:         {status.nodename} ({state})")
    print(f"url:          {_with_certificate(node, node.coordinator_url, topology.COORDINATOR_USER)}")
    print(f"management:   {node.management_url} (coordinator login; monitoring only)")
    print(f"metrics:      {node.prometheus_url}")
    print(f"data dir:     {status.data_dir}")
    print(f"participants: {', '.join(status.participants) or '-'}")
    return 0 if status.running else EXIT_NOT_RUNNING


def _add_participant(args: argparse.Namespace) -> int:
    node = LocalNode.existing(args.dir)
    if not node.is_running():
        raise UsageError(f"the broker in {args.dir} is not running; run: chorus-broker up --dir {args.dir}")
    password = _read_password(args.password_file) if args.password_file else None
    chosen = node.add_participant(args.name, password)
    # A generated password is shown this once; one read from a file stays there.
    print(f"{args.name} {node.display_url(args.name) if password else node.url_for(args.name, chosen)}")
    return 0


def _write_definitions(args: argparse.Namespace) -> int:
    text = render_definitions(checked_in_definitions())
    if str(args.path) == "-":
        sys.stdout.write(text)
        return 0
    try:
        args.path.write_text(text)
    except OSError as e:
        raise UsageError(f"cannot write {args.path}: {e.strerror}; give another PATH, or - for stdout") from e
    print(f"wrote {args.path}")
    return 0


def _read_password(path: Path) -> str:
    try:
        password = path.read_text().strip()
    except OSError as e:
        raise UsageError(f"cannot read the password file {path}: {e.strerror}") from e
    if not password:
        raise UsageError(f"the password file {path} is empty")
    return password


if __name__ == "__main__":
    raise SystemExit(main())
