"""A round over TLS only: a node with `listeners.tcp = none` and client certificates required.

The node is this test's own (the session node speaks plain AMQP). Certificates
come from broker.tls's throwaway CA; the coordinator and the participants log in
with their own user and password *and* show their own client certificate.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import structlog
from support.coordinators import federation_config
from support.scripted import ScriptedParticipant, consensus_answers
from support.waiting import eventually

from broker import cli
from broker.connect import open_transport
from broker.errors import BrokerError, UsageError
from broker.local_node import LocalNode
from broker.tls import TlsError, TlsFiles, add_client_cert, make_dev_certs
from broker.transport import Transport
from common.embedding import HashingEmbedder
from coordinator.service import build_coordinator
from coordinator.settings import load_coordinator_settings

AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


def tls_transport(url: str, files: TlsFiles | None, ca_file: Path) -> Transport:
    if files is None:
        return open_transport(url, ca_file=ca_file, connection_name="test tls")
    return open_transport(
        url, ca_file=ca_file, cert_file=files.cert_file, key_file=files.key_file, connection_name="test tls"
    )


async def refused(transport: Transport) -> str:
    """The error text when connecting fails; fails the test if the broker lets it in."""
    with pytest.raises(BrokerError) as refusal:
        await asyncio.wait_for(transport.__aenter__(), 20)
    await transport.close()
    return str(refusal.value)


def plain_amqp_answer(port: int) -> bytes:
    """What the port answers to an AMQP 0-9-1 protocol header (a plain listener: Connection.Start)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(AMQP_HEADER)
        try:
            return s.recv(4096)
        except (TimeoutError, ConnectionResetError):
            return b""


def test_dev_certificates_chain_to_their_ca(tmp_path: Path) -> None:
    certs = make_dev_certs(tmp_path, clients=["alice"])
    alice = certs.clients["alice"]
    for files, purpose in ((certs.server, "sslserver"), (alice, "sslclient")):
        done = subprocess.run(
            ["openssl", "verify", "-purpose", purpose, "-CAfile", str(certs.ca_file), str(files.cert_file)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(certs.server.cert_file)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text
    context = ssl.create_default_context(cafile=str(certs.ca_file))
    context.load_cert_chain(alice.cert_file, alice.key_file)  # the pair matches
    assert alice.key_file.stat().st_mode & 0o077 == 0
    assert TlsFiles.in_dir(tmp_path, "alice") == alice
    with pytest.raises(TlsError, match="missing"):
        TlsFiles.in_dir(tmp_path, "bob")


def test_tls_node_has_no_plain_listener_in_its_config(tmp_path: Path) -> None:
    certs = make_dev_certs(tmp_path / "tls", clients=["coordinator"])
    node = LocalNode(tmp_path / "node", tls=certs.server)
    config = node._config()
    assert "listeners.tcp = none\n" in config
    assert f"listeners.ssl.default = 127.0.0.1:{node.port}\n" in config
    assert "ssl_options.verify = verify_peer\n" in config
    assert "ssl_options.fail_if_no_peer_cert = true\n" in config
    assert f"ssl_options.keyfile = {certs.server.key_file}\n" in config
    env = node._env()
    assert "RABBITMQ_NODE_PORT" not in env and "RABBITMQ_NODE_IP_ADDRESS" not in env
    assert node.coordinator_url.startswith("amqps://coordinator:")
    url = cli._with_certificate(node, node.coordinator_url, "coordinator")
    assert f"certfile={certs.clients['coordinator'].cert_file}".replace("/", "%2F") in url
    assert cli._with_certificate(node, node.coordinator_url, "alice") == node.coordinator_url  # no alice.pem
    plain = LocalNode(tmp_path / "plain")
    assert plain.coordinator_url.startswith("amqp://") and "listeners.tcp" not in plain._config()
    assert plain._env()["RABBITMQ_NODE_PORT"] == str(plain.port)


def test_dev_certs_command_keeps_an_existing_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        assert cli.main(["dev-certs", str(tmp_path), "--clients", "alice"]) == 0
        ca = (tmp_path / "ca.pem").read_bytes()
        assert cli.main(["dev-certs", str(tmp_path), "--clients", "bob"]) == 0
    finally:
        structlog.reset_defaults()
    assert (tmp_path / "ca.pem").read_bytes() == ca
    assert {p.name for p in tmp_path.glob("*.pem")} == {
        "ca.pem",
        "server.pem",
        "coordinator.pem",
        "alice.pem",
        "bob.pem",
    }
    assert capsys.readouterr().out.splitlines()[-1] == f"bob {tmp_path / 'bob.pem'}"
    with pytest.raises(UsageError, match="dev-certs"):
        cli.bring_up(tmp_path / "node", tls_dir=tmp_path / "nothing-here")


@pytest.mark.amqp
@pytest.mark.slow
async def test_round_over_tls_with_client_certificates(tmp_path: Path) -> None:
    alice, bob = f"alice-{secrets.token_hex(2)}", f"bob-{secrets.token_hex(2)}"
    certs = make_dev_certs(tmp_path / "tls")  # the CA and the server's certificate
    node = LocalNode(tmp_path / "node", tls=certs.server)
    starting = asyncio.create_task(asyncio.to_thread(node.start))
    try:
        # Client certificates while the node boots (each openssl run takes a moment on a busy machine).
        clients = {name: add_client_cert(certs.directory, name) for name in ("coordinator", alice, bob)}
        stranger = make_dev_certs(tmp_path / "other-ca", clients=["coordinator"]).clients["coordinator"]
        await starting
        assert node.coordinator_url.startswith("amqps://")
        adding = asyncio.create_task(asyncio.to_thread(node.add_participants, {alice: None, bob: None}))
        listeners = asyncio.create_task(
            asyncio.to_thread(node._ctl, "eval", "application:get_env(rabbit, tcp_listeners).")
        )

        # No plain listener: the TLS port does not speak AMQP in the clear, and the node has no other.
        assert not plain_amqp_answer(node.port).startswith(b"\x01")  # frame type 1: Connection.Start
        plain_url = node.coordinator_url.replace("amqps://", "amqp://", 1)
        await refused(open_transport(plain_url, connection_name="test plain"))
        # TLS without a client certificate, or with one from another CA: refused by the broker.
        await refused(tls_transport(node.coordinator_url, None, certs.ca_file))
        await refused(tls_transport(node.coordinator_url, stranger, certs.ca_file))

        federation = f"f{secrets.token_hex(3)}"
        config = federation_config(tmp_path, federation, min_participants=2, quorum=2)
        settings = load_coordinator_settings(config, env={})
        coordinator_transport = tls_transport(node.coordinator_url, clients["coordinator"], certs.ca_file)
        await coordinator_transport.__aenter__()
        coordinator = build_coordinator(settings, coordinator_transport, embedder=HashingEmbedder())
        await coordinator.start()
        passwords = await adding
        participants: list[ScriptedParticipant] = []
        for name, password in passwords.items():
            transport = tls_transport(node.url_for(name, password), clients[name], certs.ca_file)
            await transport.__aenter__()
            participants.append(
                ScriptedParticipant(name, transport, consensus_answers, federation=federation)
            )
        for participant in participants:
            await participant.join()
        await asyncio.wait_for(coordinator.drive(), 30)
        (summary,) = coordinator.closed_rounds
        assert summary.answered == sorted([alice, bob])
        assert sum(o.labelled for o in summary.shards) == 6
        for participant in participants:
            await eventually(lambda p=participant: len(p.labels) == 3 and len(p.closed) == 1)
        assert (await listeners).strip() == "{ok,[]}"
        await coordinator.stop_intake()
        for participant in participants:
            await participant.leave()
            await participant.transport.close()
        await coordinator_transport.close()
        coordinator.store.close()
    finally:
        await asyncio.gather(starting, return_exceptions=True)
        node.stop()
    assert not node.is_running()
    assert LocalNode(tmp_path / "node").coordinator_url.startswith("amqps://")  # remembered in node.json
