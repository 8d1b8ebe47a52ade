"""Hostile participants and the measurements the attack tests take on a real broker.

The heavy attackers (a huge control message, a flood) run in a child process, so that the
coordinator's memory and event loop, measured in the test process, are the coordinator's own.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np

from broker.local_node import LocalNode
from broker.topology import UP_EXCHANGE, control_key, generation_key
from broker.transport import Delivery
from schemas import Answer, GenerationBatch, ParticipantReport, RoundOpened, encode
from schemas.ids import batch_id, report_id
from support.scripted import ScriptedParticipant

REPO = Path(__file__).resolve().parents[2]


@dataclass
class IdThief(ScriptedParticipant):
    """Publishes, under its own login and keys, batches and a report carrying `victim`'s message ids
    before its own honest batches; one honest batch also goes to the victim's key in BCC."""

    protocol_ids: bool = True
    victim: str = ""
    thefts: list[str] = field(default_factory=list)

    async def _answer(self, opened: RoundOpened) -> None:
        r = opened.round_id
        for shard in opened.shards:
            stolen = msgspec.structs.replace(
                self.batch(opened, shard),
                message_id=batch_id(self.victim, r, shard.shard_id),
                model_id="thief",
                answers=[Answer(prompt_id=p.prompt_id, text="stolen slot") for p in shard.prompts],
            )
            await self._steal(generation_key(shard.shard_id, self.participant_id), stolen)
        report = ParticipantReport(
            federation=self.federation,
            round_id=r,
            message_id=report_id(self.victim, r),
            participant_id=self.participant_id,
            metrics={"loss": 0.0},
        )
        await self._steal(control_key(self.participant_id), report)
        for index, shard in enumerate(opened.shards):
            # RabbitMQ 3.10.8 does not check topic permissions on BCC keys: a copy lands in the
            # victim's intake queue.
            bcc = [generation_key(shard.shard_id, self.victim)] if index == 0 else []
            await self.send(self.batch(opened, shard), bcc)

    async def _steal(self, key: str, message: GenerationBatch | ParticipantReport) -> None:
        self.thefts.append(message.message_id)
        await self.transport.publish(UP_EXCHANGE, key, encode(message), message_id=message.message_id)


@dataclass
class DeadLetters:
    """Everything that reaches chorus.dead of one vhost, collected by an inspector connection."""

    deliveries: list[Delivery] = field(default_factory=list)

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)

    def reasons(self) -> list[str]:
        return [str(d.headers.get("x-chorus-reason", "")) for d in self.deliveries]


def hostile_map(keys: int) -> bytes:
    """A msgpack map of `keys` integer keys, each with nil: valid msgpack, not a message."""
    entries = np.empty((keys, 6), dtype=np.uint8)
    entries[:, 0] = 0xCE  # uint32
    entries[:, 1:5] = np.arange(keys, dtype=">u4").view(np.uint8).reshape(keys, 4)
    entries[:, 5] = 0xC0  # nil
    return b"\xdf" + keys.to_bytes(4, "big") + entries.tobytes()


def rss_status(field_name: str) -> int:
    """VmRSS or VmHWM (peak) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field_name} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Start VmHWM over from the current RSS (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def queue_stats(node: LocalNode, vhost: str) -> dict[str, tuple[int, int]]:
    """queue -> (messages, message bytes), as rabbitmqctl lists them."""
    out = node._ctl(
        "list_queues", "-q", "-p", vhost, "name", "messages", "message_bytes", "--formatter", "json"
    )
    return {q["name"]: (int(q["messages"] or 0), int(q["message_bytes"] or 0)) for q in json.loads(out)}


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# A child process that logs in as an attacker and publishes `mode`'s traffic; it prints "ready" once
# connected (and joined, for a flood), then waits for a line on stdin before attacking.
_ATTACKER = """
import asyncio, sys, time
from broker.amqp import AmqpTransport
from participant.testing import publish_join
from broker.topology import UP_EXCHANGE, control_key, generation_key
from schemas import new_message_id
from support.attackers import hostile_map

async def main(url, user, federation, mode, amount, seconds):
    transport = AmqpTransport(url, connection_name="attacker")
    await transport.connect()
    if mode == "flood":
        await publish_join(transport, federation, user, "flood")
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    sent = refused = 0
    async def send(key, payload):
        nonlocal sent, refused
        try:
            timeout = 60.0 if mode == "huge" else 2.0
            await transport.publish(UP_EXCHANGE, key, payload, message_id=new_message_id(), timeout=timeout)
            sent += 1
        except Exception:
            refused += 1
    if mode == "huge":
        await send(control_key(user), hostile_map(amount))
    else:
        small, big = b"\\x81\\xa4kind\\xa5bogus", b"\\x00" * (4 * 1024 * 1024 + 1)
        end = time.monotonic() + seconds
        rounds = 0
        while time.monotonic() < end:
            rounds += 1
            payloads = [big] if rounds % 10 == 0 else [small] * 200
            await asyncio.gather(*(send(generation_key(0, user), p) for p in payloads))
    print(f"sent {sent} refused {refused}", flush=True)
    await transport.close()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6])))
"""


class Attacker:
    """An attacker process: `ready()` once it is connected, `go()` to attack, `finish()` for its tally."""

    def __init__(self, url: str, user: str, federation: str, mode: str, amount: int, seconds: float = 0.0):
        self.process = subprocess.Popen(
            [sys.executable, "-c", _ATTACKER, url, user, federation, mode, str(amount), str(seconds)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    async def ready(self) -> None:
        assert self.process.stdout is not None
        while (line := await asyncio.to_thread(self.process.stdout.readline)).strip() != "ready":
            assert line, f"attacker did not start (exit code {self.process.poll()})"  # log lines go by

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    async def finish(self, timeout: float = 120.0) -> str:
        out, _ = await asyncio.to_thread(self.process.communicate, None, timeout)
        assert self.process.returncode == 0, f"attacker failed: {out}"
        return [line for line in out.splitlines() if line.startswith("sent ")][-1]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
