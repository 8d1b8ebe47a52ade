"""One coordinator per state file (issue 21, point 2): `chorus-coordinator run` holds an exclusive lock
on its state for the process's lifetime; a second one on the same state exits 1 with one line naming
the file and the holder's pid; the kernel drops the lock however the holder dies, SIGKILL included.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from support.cli_processes import Command, closed_port, commands, copy_examples, log_events, set_key

from common.exits import EXIT_FAILED, EXIT_OK
from common.metrics_http import Health, MetricsError, MetricsServer
from coordinator.store import StateLock, StateLockedError

COORDINATOR = "chorus-coordinator"


def test_a_second_lock_on_one_state_is_refused_naming_the_file_and_the_holder(tmp_path: Path) -> None:
    state = tmp_path / "state" / "coordinator.sqlite3"
    with StateLock(state) as held:
        assert held.path == tmp_path / "state" / "coordinator.sqlite3.lock"
        assert held.path.read_text() == f"{os.getpid()}\n"
        # Another open of the lock file (another process's, as far as flock is concerned) cannot take it.
        with pytest.raises(StateLockedError) as refused:
            StateLock(state).acquire()
        message = str(refused.value)
        assert str(state) in message and f"pid {os.getpid()}" in message and "\n" not in message
        assert "stop that one first" in message
    with StateLock(state) as again:  # released: taken at once, the stale pid replaced
        assert again.path.read_text() == f"{os.getpid()}\n"


def test_a_taken_metrics_port_does_not_suggest_starting_a_second_copy() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError) as refused:
            MetricsServer("127.0.0.1", port, CollectorRegistry(), lambda: Health(True))
    message = str(refused.value)
    assert f"127.0.0.1:{port}" in message and "already in use" in message
    assert "rather than start a second" in message


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_until_serving(command: Command, port: int, timeout: float = 60.0) -> None:
    """Until the coordinator answers /healthz: connected, its signal handlers installed."""
    deadline = time.monotonic() + timeout
    while not healthy(port):
        if command.process.poll() is not None:
            raise AssertionError(f"exited early:\n{command.wait(1)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no /healthz after {timeout}s:\n{command.wait(1)}")
        time.sleep(0.2)


@pytest.mark.amqp
def test_a_second_coordinator_on_one_state_exits_1_and_a_third_starts_after_the_first_is_killed(
    tmp_path: Path, rabbit_vhost: Callable[..., dict[str, str]]
) -> None:
    urls = rabbit_vhost()
    examples = copy_examples(tmp_path)
    config = examples / "coordinator.toml"
    set_key(config, "embedder", "hashing")
    args = ["run", "--config", str(config), "--broker", urls["coordinator"]]
    lock_file = tmp_path / ".chorus" / "coordinator.sqlite3.lock"
    port = closed_port()
    # All three on one metrics port too: the second must be stopped by the state, not by the port.
    env = {"CHORUS_METRICS_PORT": str(port)}

    with commands() as started:
        first = Command(COORDINATOR, args, workdir=tmp_path / "run", env=env)
        started.append(first)
        wait_until_serving(first, port)
        assert lock_file.read_text() == f"{first.process.pid}\n"

        second = Command(COORDINATOR, args, workdir=tmp_path / "run", env=env)
        started.append(second)
        refused = second.wait(timeout=60)
        assert refused.returncode == EXIT_FAILED, refused
        assert "Traceback" not in refused.stderr, refused
        (line,) = refused.stderr.strip().splitlines()
        assert line.startswith(f"{COORDINATOR}: error: the coordinator state "), refused
        assert "coordinator.sqlite3" in line and f"pid {first.process.pid}" in line, refused
        assert first.process.poll() is None  # the first runs on

        first.process.send_signal(signal.SIGKILL)
        assert first.process.wait(30) == -signal.SIGKILL
        assert lock_file.read_text() == f"{first.process.pid}\n"  # a stale pid: it blocks nothing

        third = Command(COORDINATOR, args, workdir=tmp_path / "run", env=env)
        started.append(third)
        wait_until_serving(third, port)
        assert lock_file.read_text() == f"{third.process.pid}\n"
        third.process.send_signal(signal.SIGTERM)
        stopped = third.wait(timeout=60)
        first_run = first.wait(timeout=5)

    assert stopped.returncode == EXIT_OK, stopped
    runs = [
        [e["run_id"] for e in log_events(finished.stderr) if e["event"] == "coordinator_state"]
        for finished in (first_run, stopped)
    ]
    assert runs[0] == runs[1] and len(runs[0]) == 1  # the same state, so the same run, across the kill
