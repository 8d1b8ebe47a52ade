"""Administering a running local node through rabbitmqctl.

One `Rabbitmqctl` names the tool, the node and the environment to run it in; it runs one
command, runs several listing commands side by side (each rabbitmqctl boots its own Erlang VM),
gathers what the node holds into `broker.definitions.Listings`, and imports a definitions
document. Deciding what to import and whether the listings are right stays with the callers
(`broker.local_node`, `broker.definitions`).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.definitions import Listings
from broker.errors import NodeError


@dataclass(frozen=True)
class Rabbitmqctl:
    """rabbitmqctl (`program`) aimed at node `nodename`, run with `env` in `cwd`."""

    program: Path
    nodename: str
    env: Mapping[str, str]
    cwd: Path  # where an Erlang crash dump would land

    def run(self, *args: str, timeout: float = 30.0, stdin: str | None = None) -> str:
        command = [str(self.program), "-n", self.nodename, "-q", *args]
        try:
            done = subprocess.run(
                command,
                env=dict(self.env),
                cwd=self.cwd,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise NodeError(f"rabbitmqctl {args[0]} did not answer in {timeout:.0f}s") from e
        if done.returncode != 0:
            raise NodeError(f"rabbitmqctl {' '.join(args)} failed: {(done.stderr or done.stdout).strip()}")
        return done.stdout

    def run_json_many(self, commands: Sequence[Sequence[str]]) -> list[list[dict[str, Any]]]:
        """Run several listing commands side by side (each rabbitmqctl boots its own Erlang VM)."""
        base = [str(self.program), "-n", self.nodename, "-q"]
        processes = [
            subprocess.Popen(
                [*base, *args, "--formatter", "json"],
                env=dict(self.env),
                cwd=self.cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for args in commands
        ]
        results: list[list[dict[str, Any]]] = []
        for args, process in zip(commands, processes, strict=True):
            out, err = process.communicate(timeout=60)
            if process.returncode != 0:
                raise NodeError(f"rabbitmqctl {' '.join(args)} failed: {(err or out).strip()}")
            results.append(json.loads(out) if out.strip() else [])
        return results

    def listings(self, vhost: str, *, full: bool = True, limits: bool = True) -> Listings:
        """What the node has; `full=False` skips vhosts and exchanges (participants add neither),
        `limits=False` users' limits (only participants have them)."""
        commands = [
            ["list_queues", "-p", vhost, "name", "type"],
            ["list_bindings", "-p", vhost, "source_name", "destination_name", "routing_key"],
            ["list_permissions", "-p", vhost],
            ["list_topic_permissions", "-p", vhost],
        ]
        if limits:
            commands.append(["list_user_limits", "--global"])
        if full:
            commands += [["list_vhosts", "name"], ["list_exchanges", "-p", vhost, "name", "type"]]
        answers = self.run_json_many(commands)
        queues, bindings, permissions, topic = answers[:4]
        user_limits = answers[4] if limits else []
        vhosts, exchanges = answers[-2:] if full else ([{"name": vhost}], [])
        return Listings(vhosts, exchanges, queues, bindings, permissions, topic, user_limits)

    def import_definitions(self, document: dict[str, Any]) -> None:
        self.run("import_definitions", "--format", "json", stdin=json.dumps(document))
