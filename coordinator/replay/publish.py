"""Publish the participants' recorded messages again, to drive a coordinator (debugging, load tests).

What goes out: every message the recorded coordinator received that is well-formed (generation
batches and control messages that decode), once per message id (redeliveries are dropped), with
its recorded exchange, routing key, message id and body, at the recorded pace divided by `speed`
(`speed` 0: as fast as possible). Headers the broker or the coordinator added (`x-...`: delivery
counts, dead-letter reasons) are not sent again.

The coordinator being driven must start from an empty state (its round numbers must match the
recorded ones) and use the recorded federation name and prompt settings. With `follow_rounds`,
each round's answers wait until that coordinator has announced the round (read from one
participant's reply queue), so a coordinator slower than the recorded one is not fed answers for
a round it has not opened yet.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import structlog

from broker.connect import AMQP_SCHEMES, open_transport
from broker.errors import BrokerError
from broker.topology import reply_queue
from broker.transport import Delivery, HeaderValue, Transport
from coordinator.replay.log import RecordedFrame, Recording, ReplayError
from schemas.codec import decode_reply
from schemas.errors import SchemaError
from schemas.messages import AdapterUpdate, GenerationBatch, RoundOpened

log = structlog.get_logger(__name__)

Connect = Callable[[str], Transport]
# The kinds of message that answer a round: only useful once the round is open.
ROUND_ANSWERS = frozenset(str(k.__struct_config__.tag) for k in (GenerationBatch, AdapterUpdate))
DEFAULT_ROUND_TIMEOUT = 120.0


@dataclass(frozen=True)
class Republish:
    t: float  # when the recorded coordinator received it
    user_id: str
    exchange: str
    routing_key: str
    message_id: str
    frame: RecordedFrame  # where its body and headers lie: read when it is published, one at a time
    needs_round: int | None = None  # a round answer (batch, adapter): only useful once that round is open

    def load(self) -> tuple[bytes, dict[str, HeaderValue]]:
        """Its body and the headers to send again, read from the log."""
        recorded = self.frame.load()
        return bytes(recorded.body), _sendable_headers(recorded.headers)


@dataclass(frozen=True)
class RepublishPlan:
    messages: tuple[Republish, ...]
    skipped: Mapping[str, int]  # why -> how many

    @property
    def users(self) -> list[str]:
        return sorted({m.user_id for m in self.messages})

    @property
    def busiest_user(self) -> str:
        """The login that sent the most round answers: surely a participant with a reply queue."""
        counts: dict[str, int] = {}
        for message in self.messages:
            counts[message.user_id] = counts.get(message.user_id, 0) + (message.needs_round is not None)
        return max(sorted(counts), key=lambda user: counts[user])


@dataclass
class RepublishReport:
    published: int = 0
    by_user: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)  # error -> how many
    waited_for_rounds: float = 0.0  # seconds spent waiting for rounds to open (follow_rounds)
    rounds_not_opened: list[int] = field(default_factory=list)  # followed, but never announced in time
    seconds: float = 0.0


class RoundWatcher:
    """Reads one participant's reply queue and notes each round the coordinator opens."""

    def __init__(self) -> None:
        self._opened: dict[int, asyncio.Event] = {}

    def _event(self, round_id: int) -> asyncio.Event:
        return self._opened.setdefault(round_id, asyncio.Event())

    async def on_reply(self, delivery: Delivery) -> None:
        try:
            message = decode_reply(delivery.body)
        except SchemaError:
            message = None
        if isinstance(message, RoundOpened):
            self._event(message.round_id).set()
        await delivery.ack()

    async def wait(self, round_id: int, timeout: float) -> bool:
        """True once round `round_id` is open; False if it is not announced within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._event(round_id).wait(), timeout)
        except TimeoutError:
            return False
        return True


def plan_republish(recording: Recording, *, acked_only: bool = False) -> RepublishPlan:
    """The participants' messages to send again, in the order the coordinator received them."""
    chosen: list[Republish] = []
    skipped: dict[str, int] = {}
    seen: set[str] = set()

    def skip(why: str) -> None:
        skipped[why] = skipped.get(why, 0) + 1

    for item in sorted(recording.received, key=lambda r: r.frame.t):
        frame = item.frame
        message_id = frame.message_id or item.content.message_id
        if not item.decoded:
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
                    frame=frame,
                    needs_round=item.content.round_id if item.content.kind in ROUND_ANSWERS else None,
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
    follow_rounds: bool = False,
    round_timeout: float = DEFAULT_ROUND_TIMEOUT,
    clock: Callable[[], float] = time.monotonic,
) -> RepublishReport:
    """Publish the plan, each message as its recorded user, at the recorded pace / `speed`.

    `follow_rounds`: before a round's first answer, wait (up to `round_timeout` seconds) until the
    coordinator announces that round, read from the reply queue of the plan's busiest participant;
    the schedule after it shifts by the time waited. Without it, a coordinator slower than the
    recorded one to open a round rejects the answers that arrive too early ("round N is not open").
    """
    if speed < 0:
        raise ReplayError(f"speed must be 0 (as fast as possible) or positive, got {speed}")
    report = RepublishReport()
    if not plan.messages:
        return report
    started = clock()
    first = plan.messages[0].t
    shift = 0.0  # seconds the schedule moved while waiting for rounds
    opened: set[int] = set()
    async with contextlib.AsyncExitStack() as stack:
        transports: dict[str, Transport] = {}
        for user in plan.users:
            transports[user] = await stack.enter_async_context(connect(user))
        watcher = RoundWatcher()
        if follow_rounds:
            watching = plan.busiest_user
            await transports[watching].consume(reply_queue(watching), watcher.on_reply)
        for message in plan.messages:
            round_id = message.needs_round
            if follow_rounds and round_id is not None and round_id not in opened:
                waited = clock()
                if not await watcher.wait(round_id, round_timeout):
                    report.rounds_not_opened.append(round_id)
                    log.warning("round_not_opened", round=round_id, waited_seconds=round_timeout)
                opened.add(round_id)
                report.waited_for_rounds += clock() - waited
                if speed > 0:  # the answers of the round go out from now, still at the recorded pace
                    shift = max(shift, clock() - started - (message.t - first) / speed)
            if speed > 0:
                delay = started + shift + (message.t - first) / speed - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
            await _publish_one(transports[message.user_id], message, report)
    report.seconds = clock() - started
    return report


async def _publish_one(transport: Transport, message: Republish, report: RepublishReport) -> None:
    try:
        body, headers = message.load()
        await transport.publish(
            message.exchange,
            message.routing_key,
            body,
            message_id=message.message_id,
            headers=headers or None,
        )
    except BrokerError as e:
        why = type(e).__name__
        report.failed[why] = report.failed.get(why, 0) + 1
        log.warning(
            "republish_failed", message_id=message.message_id, routing_key=message.routing_key, error=str(e)
        )
        return
    report.published += 1
    report.by_user[message.user_id] = report.by_user.get(message.user_id, 0) + 1


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
            "an in-process memory:// broker is reachable only from Python (coordinator.replay.publish)"
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
