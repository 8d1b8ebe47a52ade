"""Members that flood the lobby: every control message a member sends leaves a copy there.

`LobbyAttacker` runs in a child process (as `support.attackers.Attacker` does), so that the
coordinator's memory, measured in the test process, is the coordinator's own. Modes:

- `heartbeats`: valid heartbeats padded to `amount` bytes with a key no decoder knows (decoders skip
  unknown keys), and `header_bytes` of headers, as fast as the broker confirms them, for `seconds`;
- `oversized`: `count` control messages of `amount` bytes each (no message: zeros), one after another.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import DeliveredMessage

from broker.amqp import AmqpTransport
from broker.transport import Delivery
from coordinator.service import Coordinator
from participant.learner import FunctionLearner
from participant.service import Participant
from participant.settings import ParticipantSettings
from support.attackers import REPO, Attacker

# It prints "ready" once connected and joined, then waits for a line on stdin before attacking.
_LOBBY_ATTACKER = """
import asyncio, sys, time
import msgspec
from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import DeliveredMessage

from broker.amqp import AmqpTransport
from broker.transport import Delivery
from participant.testing import publish_join
from broker.topology import UP_EXCHANGE, control_key
from schemas import new_message_id

def padded_heartbeat(federation, user, size):
    beat = {"kind": "heartbeat", "schema_version": 1, "federation": federation, "round_id": 0,
            "message_id": new_message_id(), "participant_id": user, "sent_unix": time.time(), "pad": b""}
    bare = len(msgspec.msgpack.encode(beat))
    beat["pad"] = b"p" * max(0, size - bare - 4)
    return msgspec.msgpack.encode(beat)

async def main(url, user, federation, mode, amount, count, seconds, header_bytes):
    transport = AmqpTransport(url, connection_name="lobby attacker")
    await transport.connect()
    await publish_join(transport, federation, user, "flood")
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    sent = refused = 0
    headers = {"x-pad": "h" * header_bytes} if header_bytes else None
    async def send(payload, timeout):
        nonlocal sent, refused
        try:
            await transport.publish(UP_EXCHANGE, control_key(user), payload, message_id=new_message_id(),
                                    headers=headers, timeout=timeout)
            sent += 1
        except Exception:
            refused += 1
    if mode == "oversized":
        for _ in range(count):
            await send(bytes(amount), 60.0)
    else:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.gather(*(send(padded_heartbeat(federation, user, amount), 2.0) for _ in range(50)))
    print(f"sent {sent} refused {refused}", flush=True)
    await transport.close()

asyncio.run(main(*sys.argv[1:5], int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7]), int(sys.argv[8])))
"""


class LobbyAttacker(Attacker):
    """A member flooding the lobby: `ready()` once it joined, `go()` to attack, `finish()` for its tally."""

    def __init__(
        self,
        url: str,
        user: str,
        federation: str,
        mode: str,
        amount: int,
        *,
        count: int = 0,
        seconds: float = 0.0,
        header_bytes: int = 0,
    ) -> None:
        options = [str(amount), str(count), str(seconds), str(header_bytes)]
        self.process = subprocess.Popen(
            [sys.executable, "-c", _LOBBY_ATTACKER, url, user, federation, mode, *options],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )


async def participant_service_at(url: str, name: str, federation: str, state_dir: Path) -> Participant:
    """The participant service with a black-box learner, logged in to RabbitMQ at `url`, started (joined)."""
    transport = AmqpTransport(url, connection_name=f"test {name}")
    await transport.__aenter__()
    settings = ParticipantSettings(
        federation=federation, participant_id=name, state_dir=str(state_dir), progress=False, evaluate=False
    )
    learner = FunctionLearner(lambda prompt: f"The answer to {prompt} is the standard one.", model_id="box")
    participant = Participant(settings, transport, learner)
    await participant.start()
    return participant


def member_ids(coordinator: Coordinator) -> set[str]:
    return {m.participant_id for m in coordinator.store.members()}


def bodies_held(at_least: int) -> list[str]:
    """The types of the objects (deliveries, broker messages) still holding a body of `at_least` bytes,
    found without running the cyclic garbage collector: what only that collector would free."""
    holders = (Delivery, AbstractIncomingMessage, DeliveredMessage)
    return [
        type(thing).__name__
        for thing in gc.get_objects()
        if isinstance(thing, holders) and len(thing.body) >= at_least
    ]
