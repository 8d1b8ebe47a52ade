"""Ctrl-C on `chorus-coordinator` and `chorus-participant`: each stops cleanly, logs that it was
interrupted, and exits 130 (docs/operate.md), as `chorus-run` does. Real console scripts in their
own processes, on the session's RabbitMQ node, each sent SIGINT once it is serving."""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.cli_processes import Command, add_top_level_keys, commands, copy_examples, log_events, set_key

from common.exits import EXIT_INTERRUPTED

pytestmark = pytest.mark.amqp


def stderr_so_far(command: Command) -> str:
    command._err.flush()
    return Path(command._err.name).read_text()


def wait_for_event(command: Command, event: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e.get("event") == event for e in log_events(stderr_so_far(command))):
            return
        if command.process.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"no {event!r} from {command.argv[0]}:\n{command.wait(timeout=5)}")


def test_ctrl_c_stops_the_coordinator_and_a_participant_with_130_and_a_line(
    tmp_path: Path, rabbit_vhost: Callable[..., dict[str, str]]
) -> None:
    alice = f"alice-{secrets.token_hex(3)}"
    urls = rabbit_vhost(participants=(alice,))
    examples = copy_examples(tmp_path)
    coordinator_toml = examples / "coordinator.toml"
    set_key(coordinator_toml, "embedder", "hashing")
    set_key(coordinator_toml, "min_participants", 2)  # alice alone: the coordinator waits, serving
    participant_toml = examples / "participant.toml"
    add_top_level_keys(participant_toml, command=["cat"], evaluate=False)
    (examples / f"private_{alice}.jsonl").write_text((examples / "private_alice.jsonl").read_text())

    with commands() as started:
        coordinator = Command(
            "chorus-coordinator",
            ["run", "--config", str(coordinator_toml)],
            workdir=tmp_path / "run",
            env={"CHORUS_BROKER_URL": urls["coordinator"]},
        )
        started.append(coordinator)
        participant = Command(
            "chorus-participant",
            ["run", "--config", str(participant_toml), "--id", alice],
            workdir=tmp_path / "run",
            env={"CHORUS_BROKER_URL": urls[alice]},
        )
        started.append(participant)
        wait_for_event(participant, "participant_joined")
        wait_for_event(coordinator, "member_joined")
        for command in (participant, coordinator):
            command.process.send_signal(signal.SIGINT)
        finished = [command.wait(timeout=60) for command in (participant, coordinator)]

    for result, service in zip(finished, ("chorus-participant", "chorus-coordinator"), strict=True):
        assert result.returncode == EXIT_INTERRUPTED, result
        assert "Traceback" not in result.stderr, result
        events = log_events(result.stderr)
        stopping = [e for e in events if e["event"] == "stopping"]
        assert [(e["service"], e["signal"]) for e in stopping] == [(service, "SIGINT")], result
        assert [e for e in events if e["event"] == "interrupted"][-1]["exit_status"] == 130, result
