"""The shipped command-line tools as a user runs them: console scripts in their own processes, from a
copy of the shipped examples/ settings with a few keys changed.

Every process has a deadline (a hang fails the test instead of blocking the suite), writes its output
to files (no pipe can fill up and stall it), and is killed if the test ends first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SCRIPTS = Path(sys.executable).parent  # the venv's bin/: where pip put the console scripts


def copy_examples(into: Path) -> Path:
    """examples/ copied to `into/examples`, so that its "../.chorus" paths land inside `into`."""
    target = into / "examples"
    shutil.copytree(EXAMPLES, target, ignore=shutil.ignore_patterns("*.md"))
    return target


def set_key(path: Path, key: str, value: object) -> None:
    """Replace the value of the one line `key = ...` in a TOML file (any table); the key must be there."""
    text = path.read_text()
    line = re.compile(rf"^{re.escape(key)}\s*=.*$", re.MULTILINE)
    if len(line.findall(text)) != 1:
        raise AssertionError(f"{path} does not have exactly one {key!r} line")
    path.write_text(line.sub(lambda _: f"{key} = {toml_value(value)}", text))


def add_top_level_keys(path: Path, **keys: object) -> None:
    """Put top-level keys first in a TOML file (before any [table], where they must go)."""
    lines = "".join(f"{key} = {toml_value(value)}\n" for key, value in keys.items())
    path.write_text(lines + path.read_text())


def toml_value(value: object) -> str:
    # JSON writes strings, numbers, booleans and lists of them as TOML does.
    return json.dumps(value)


def closed_port() -> int:
    """A localhost port nothing listens on (bound once by the OS, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@dataclass
class Finished:
    """What a command did: its exit status, what it wrote, and how long it took."""

    argv: list[str]
    cwd: Path
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def __str__(self) -> str:  # shown when an assertion about it fails
        return (
            f"{' '.join(self.argv)} exited {self.returncode} after {self.seconds:.1f}s\n"
            f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"
        )


class Command:
    """One console script running in its own process."""

    def __init__(
        self, script: str, args: Sequence[str], *, workdir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.argv = [str(SCRIPTS / script), *args]
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self._out = (workdir / f"{script}.{os.getpid()}.{id(self)}.out").open("w+")
        self._err = (workdir / f"{script}.{os.getpid()}.{id(self)}.err").open("w+")
        self._started = time.monotonic()
        self.process = subprocess.Popen(
            self.argv,
            cwd=workdir,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
        )

    def wait(self, timeout: float) -> Finished:
        """Its result; past `timeout` seconds it is killed and the test fails, saying what it wrote."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout}s:\n{self._finished()}") from None
        return self._finished()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _finished(self) -> Finished:
        seconds = time.monotonic() - self._started
        outputs = []
        for stream in (self._out, self._err):
            stream.flush()
            stream.seek(0)
            outputs.append(stream.read())
            stream.close()
        return Finished(self.argv, self.workdir, self.process.returncode, outputs[0], outputs[1], seconds)


@contextmanager
def commands() -> Iterator[list[Command]]:
    """A list to start commands into; whatever still runs when the block ends is killed."""
    started: list[Command] = []
    try:
        yield started
    finally:
        for command in started:
            command.kill()


def log_events(stderr: str) -> list[dict[str, object]]:
    """The structlog JSON lines a command wrote (its stderr is not a terminal), other lines skipped."""
    events = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def with_password(url: str, password: str) -> str:
    """`url` logging in as the same user with another password."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{parts.hostname}:{parts.port}"))
