"""Publish the participants' recorded messages again, to drive a coordinator (debugging, load tests).

What goes out: every message the recorded coordinator received that is well-formed (generation
batches and control messages that decode), once per message id (redeliveries are dropped), with
its recorded exchange, routing key, message id and body, at the recorded pace divided by `speed`
(`speed` 0: as fast as possible). Headers the broker or the coordinator added (`x-...`: delivery
counts, dead-letter reasons) are not sent again.

Identity: the coordinator rejects a message whose AMQP `user_id` is not the participant it claims
to come from, and the broker stamps `user_id` from the login. So each message is published through
a connection logged in as its recorded `user_id`: `connect(user)` opens those transports (for
RabbitMQ, `amqp_connector(url, passwords)`; for an in-process `MemoryBroker`, `broker.connect`).
A message recorded without a `user_id` cannot be reproduced and is skipped. A recorded forgery
(`user_id` of another participant) is published as that other login, and rejected again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import structlog

from broker.connect import AMQP_SCHEMES, open_transport
from broker.errors import BrokerError
from broker.transport import HeaderValue, Transport
from coordinator.replay import Recording, ReplayError

log = structlog.get_logger(__name__)

Connect = Callable[[str], Transport]


@dataclass(frozen=True)
class Republish:
    t: float  # when the recorded coordinator received it
    user_id: str
    exchange: str
    routing_key: str
    message_id: str
    body: bytes
    headers: Mapping[str, HeaderValue]


@dataclass(frozen=True)
class RepublishPlan:
    messages: tuple[Republish, ...]
    skipped: Mapping[str, int]  # why -> how many

    @property
    def users(self) -> list[str]:
        return sorted({m.user_id for m in self.messages})


@dataclass
class RepublishReport:
    published: int = 0
    by_user: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)  # error -> how many
    seconds: float = 0.0


def plan_republish(recording: Recording, *, acked_only: bool = False) -> RepublishPlan:
    """The participants' messages to send again, in the order the coordinator received them."""
    chosen: list[Republish] = []
    skipped: dict[str, int] = {}
    seen: set[str] = set()

    def skip(why: str) -> None:
        skipped[why] = skipped.get(why, 0) + 1

    for item in sorted(recording.received, key=lambda r: r.frame.t):
        frame = item.frame
        message_id = frame.message_id or (item.message.message_id if item.message is not None else "")
        if item.message is None:
            skip("malformed")
        elif acked_only and frame.settle != "ack":
            skip("not acked")
        elif frame.user_id is None:
            skip("no user_id")
        elif message_id in seen:
            skip("redelivery")
        else:
            seen.add(message_id)
            chosen.append(
                Republish(
                    t=frame.t,
                    user_id=frame.user_id,
                    exchange=frame.exchange,
                    routing_key=frame.routing_key,
                    message_id=message_id,
                    body=frame.body,
                    headers=_sendable_headers(frame.headers),
                )
            )
    return RepublishPlan(messages=tuple(chosen), skipped=skipped)


def _sendable_headers(headers: Mapping[str, object]) -> dict[str, HeaderValue]:
    return {
        key: value
        for key, value in headers.items()
        if not key.startswith("x-") and isinstance(value, str | int | float | bool)
    }


async def republish(
    plan: RepublishPlan,
    connect: Connect,
    *,
    speed: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> RepublishReport:
    """Publish the plan, each message as its recorded user, at the recorded pace / `speed`."""
    if speed < 0:
        raise ReplayError(f"speed must be 0 (as fast as possible) or positive, got {speed}")
    report = RepublishReport()
    if not plan.messages:
        return report
    started = clock()
    first = plan.messages[0].t
    async with contextlib.AsyncExitStack() as stack:
        transports: dict[str, Transport] = {}
        for user in plan.users:
            transports[user] = await stack.enter_async_context(connect(user))
        for message in plan.messages:
            if speed > 0:
                delay = started + (message.t - first) / speed - clock()
                if delay > 0:
                    await sleep(delay)
            try:
                await transports[message.user_id].publish(
                    message.exchange,
                    message.routing_key,
                    message.body,
                    message_id=message.message_id,
                    headers=message.headers or None,
                )
            except BrokerError as e:
                why = type(e).__name__
                report.failed[why] = report.failed.get(why, 0) + 1
                log.warning(
                    "republish_failed",
                    message_id=message.message_id,
                    routing_key=message.routing_key,
                    error=str(e),
                )
                continue
            report.published += 1
            report.by_user[message.user_id] = report.by_user.get(message.user_id, 0) + 1
    report.seconds = clock() - started
    return report


# ---- connecting as each participant ------------------------------------------


def load_credentials(path: Path) -> dict[str, str]:
    """A JSON object {login: password}."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ReplayError(f"credentials file {path} does not exist") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ReplayError(f"credentials file {path}: not readable JSON ({e})") from e
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise ReplayError(f'credentials file {path}: expected a JSON object {{"participant": "password"}}')
    return raw


def amqp_connector(url: str, passwords: Mapping[str, str], users: Sequence[str]) -> Connect:
    """Open `url` (no user in it) as each of `users`, with its password from `passwords`."""
    parts = urlsplit(url)
    if parts.scheme not in AMQP_SCHEMES:
        raise ReplayError(
            f"publish needs a RabbitMQ URL (amqp://HOST:PORT/VHOST or amqps://...), got {parts.scheme}://; "
            "an in-process memory:// broker is reachable only from Python (coordinator.replay_publish)"
        )
    if parts.username is not None:
        raise ReplayError(
            "give the broker URL without a user (amqp://HOST:PORT/VHOST): each message is published as "
            "its recorded participant, with the password from --credentials"
        )
    missing = [user for user in users if user not in passwords]
    if missing:
        raise ReplayError(
            f"no password for {', '.join(missing)} in the credentials file; the coordinator only accepts "
            "a participant's messages from that participant's own login"
        )

    def connect(user: str) -> Transport:
        netloc = f"{quote(user, safe='')}:{quote(passwords[user], safe='')}@{parts.netloc}"
        return open_transport(
            urlunsplit(parts._replace(netloc=netloc)), connection_name=f"chorus-replay-{user}"
        )

    return connect
