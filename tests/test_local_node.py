"""`chorus-broker` and `broker.local_node`: the happy path on the session node, and the error paths."""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from broker import local_node, node_state, topology
from broker.cli import main
from broker.connect import open_transport
from broker.definitions import Listings, UserGrant, find_problems
from broker.local_node import LocalNode, NodeVerificationError


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    # main() configures structlog for the CLI; later tests must not log into this test's captured stderr.
    yield
    structlog.reset_defaults()


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("chorus-broker:")]
    assert len(lines) == 1, err
    return lines[0]


def test_help_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("up", "down", "status", "add-participant"):
        assert command in out


def test_taken_amqp_port_is_a_clear_error(
    tmp_path: Path, listening_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["up", "--dir", str(tmp_path / "b"), "--port", str(listening_port)]) == 2
    line = one_line_error(capsys)
    assert f"port {listening_port} is already in use" in line


def test_taken_distribution_port_is_a_clear_error(
    tmp_path: Path, listening_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["up", "--dir", str(tmp_path / "b"), "--dist-port", str(listening_port)]) == 2
    assert "distribution port" in one_line_error(capsys)


def test_missing_rabbitmq_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(local_node, "RABBITMQ_BIN", tmp_path / "nowhere")
    assert main(["up", "--dir", str(tmp_path / "b")]) == 2
    assert "run: apt-get install -y rabbitmq-server" in one_line_error(capsys)


@pytest.mark.parametrize("command", [["status"], ["down"], ["add-participant", "alice"]])
def test_commands_on_a_dir_without_a_broker_are_user_errors(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command, "--dir", str(tmp_path / "empty")]) == 2
    assert "no broker was started" in one_line_error(capsys)


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["up", "--port", "not-a-port"])
    assert exit_info.value.code == 2


def test_a_node_json_from_the_days_of_shard_queues_still_loads(tmp_path: Path) -> None:
    saved = {
        "nodename": "chorus-0ld@localhost",
        "port": 5999,
        "dist_port": 25999,
        "vhost": "chorus",
        "shards": 4,  # written by versions that had shard queues; ignored now
        "delivery_limit": 5,
        "coordinator_password": "pw",
        "participants": ["alice"],
        "pid": None,
        "tls": None,
    }
    (tmp_path / node_state.STATE_FILE).write_text(json.dumps(saved))
    node = LocalNode.existing(tmp_path)
    assert (node.state.nodename, node.state.port, node.state.participants) == (
        "chorus-0ld@localhost",
        5999,
        ["alice"],
    )
    assert "shards" not in dataclasses.asdict(node.state)


def test_find_problems_names_what_is_missing() -> None:
    topo = topology.full_topology(["alice"])
    grant = UserGrant("alice", "hash", "^$", r"^chorus\.up$", r"^chorus\.reply\.alice$")
    found = Listings(
        vhosts=[{"name": "chorus"}],
        exchanges=[{"name": e.name, "type": e.type} for e in topo.exchanges],
        queues=[{"name": q.name, "type": "quorum"} for q in topo.queues if q.name != "chorus.lobby"],
        bindings=[],
        permissions=[],
        topic_permissions=[],
    )
    problems = find_problems(topo, "chorus", [grant], found)
    assert "queue 'chorus.lobby' is missing" in problems
    assert "user 'alice' lacks its permissions on vhost 'chorus'" in problems
    assert any("binding chorus.up -[ctl.*]-> chorus.lobby" in p for p in problems)
    assert find_problems(topo, "other", [grant], found) == ["vhost 'other' does not exist"]


@pytest.mark.amqp
def test_up_on_a_running_node_prints_its_url(
    rabbit_node: LocalNode, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["up", "--dir", str(rabbit_node.data_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == rabbit_node.coordinator_url
    assert rabbit_node.is_running()


@pytest.mark.amqp
def test_status_of_the_running_node(rabbit_node: LocalNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--dir", str(rabbit_node.data_dir)]) == 0
    out = capsys.readouterr().out
    assert "running" in out
    assert rabbit_node.coordinator_url in out


@pytest.mark.amqp
def test_options_that_contradict_the_dir_are_refused(
    rabbit_node: LocalNode, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["up", "--dir", str(rabbit_node.data_dir), "--vhost", "other"]) == 2
    assert "was set up with vhost chorus, not other" in one_line_error(capsys)


@pytest.mark.amqp
def test_bad_participant_id_is_refused(rabbit_node: LocalNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["add-participant", "a.b", "--dir", str(rabbit_node.data_dir)]) == 2
    assert "participant id 'a.b'" in one_line_error(capsys)


@pytest.mark.amqp
async def test_add_participant_with_a_password_file(
    rabbit_node: LocalNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "erin.secret"
    secret.write_text("correct horse battery\n")
    assert (
        main(["add-participant", "erin", "--password-file", str(secret), "--dir", str(rabbit_node.data_dir)])
        == 0
    )
    out = capsys.readouterr().out
    assert "correct horse" not in out  # a password from a file is never echoed
    node = LocalNode.existing(rabbit_node.data_dir)
    assert "erin" in node.state.participants
    async with open_transport(node.url_for("erin", "correct horse battery")) as erin:
        await erin.publish(topology.UP_EXCHANGE, topology.control_key("erin"), b"hello", message_id="e1")


@pytest.mark.amqp
def test_verify_reports_definitions_that_did_not_load(rabbit_node: LocalNode) -> None:
    node = LocalNode.existing(rabbit_node.data_dir)
    node.state.participants.append("ghost")  # expected, but never created on the broker
    with pytest.raises(NodeVerificationError) as error:
        node.verify()
    message = str(error.value)
    assert "queue 'chorus.reply.ghost' is missing" in message
    assert "user 'ghost' lacks its permissions" in message
    assert "silently skips a definitions file" in message
