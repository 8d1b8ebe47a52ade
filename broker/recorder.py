"""Record every message a connection receives or publishes, as a transport decorator.

`RecordingTransport(inner, recorder)` is a `Transport`: publishes and consumed deliveries pass
through to `inner` unchanged, and each one is appended to the `Recorder`'s log (format:
`broker.record_format`). A received message is written when it is settled, with how (ack, requeue,
dead_letter and the reason), so rejected messages are in the log with their reasons; one whose
consumer goes away before settling is written as `abandoned`.

Frames are written to the file together at the end of each event-loop turn (one write for all the
messages of that turn; at once when no loop is running). Files rotate once they reach
`rotate_bytes`. `fsync`: `never` (a crash of the process loses at most the current turn's frames,
a crash of the machine what the OS had not written yet), `rotate` (also fsync each file when it is
closed), `always` (write and fsync every frame at once: durable, and a disk flush per message on
the event loop).

What a consumer does not take is recorded within bounds, since a hostile sender chooses its size
and rate: a dead-lettered message, and one acked unread (`ack_unread`: a copy whose twin is judged,
such as the lobby's copy of a member's control message), is written with its body cut to
`DEAD_LETTER_BODY_BYTES`; at most `rejected_frames_per_sender` dead letters of each sender are
written per session, the rest only counted (`rejected_unrecorded`). The headers of every received
message are kept up to `RECEIVED_HEADER_BYTES` (participants send none; a hostile one could send
a frame's worth with each message): the rest are dropped and counted in `HEADERS_CUT_KEY`.

Recording never takes the service down: if writing fails (disk full...), the recorder logs the
error once, stops recording and counts what it dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal

import structlog

from broker.record_format import FORMAT_VERSION, LOG_SUFFIX, FramePacker, Settlement
from broker.transport import (
    DEAD_LETTER_BODY_BYTES,
    DEFAULT_PREFETCH,
    DEFAULT_PUBLISH_TIMEOUT,
    Delivery,
    Handler,
    Headers,
    Subscription,
    Topology,
    Transport,
)

log = structlog.get_logger(__name__)

FsyncPolicy = Literal["never", "rotate", "always"]
DEFAULT_ROTATE_BYTES = 256 * 1024 * 1024
DEFAULT_REJECTED_FRAMES_PER_SENDER = 1_000
# The reason an ack carries when its consumer settled the delivery without reading the body.
UNREAD = "unread"
# A received message's headers are recorded up to about this many bytes (keys and values as text).
RECEIVED_HEADER_BYTES = 4096
# The header a recorded frame gets when some of the message's headers were left out: how many.
HEADERS_CUT_KEY = "x-chorus-recorder-headers-cut"


async def ack_unread(delivery: Delivery) -> None:
    """Ack `delivery` without having read its body (a copy whose twin is judged instead).

    A `RecordingTransport` records it with the body cut, as a dead letter's; any other transport
    acks it as `delivery.ack()` does.
    """
    await delivery._do("ack", UNREAD)


def bounded_headers(headers: Mapping[str, object], limit: int = RECEIVED_HEADER_BYTES) -> dict[str, object]:
    """`headers` up to about `limit` bytes, in order; a header that does not fit is left out and counted."""
    kept: dict[str, object] = {}
    size = left_out = 0
    for key, value in headers.items():
        entry = len(key) + _size_as_text(value)
        if size + entry > limit:
            left_out += 1
        else:
            kept[key] = value
            size += entry
    if left_out:
        kept[HEADERS_CUT_KEY] = left_out
    return kept


def _size_as_text(value: object) -> int:
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, int | float | bool) or value is None:
        return 8
    try:
        return len(repr(value))  # a table or an array, at most a frame's worth
    except RecursionError:
        return RECEIVED_HEADER_BYTES + 1


class Recorder:
    """Appends frames to `directory/<federation>.<session>.<index>.chorus-log`, rotating by size.

    Not thread-safe: use it from one event loop. `settings` (plain data) goes into every file's
    header so that a replay can use what the recorded service ran with.
    """

    def __init__(
        self,
        directory: Path,
        *,
        federation: str,
        settings: Mapping[str, Any],
        rotate_bytes: int = DEFAULT_ROTATE_BYTES,
        fsync: FsyncPolicy = "rotate",
        clock: Callable[[], float] = time.time,
        rejected_frames_per_sender: int = DEFAULT_REJECTED_FRAMES_PER_SENDER,
    ) -> None:
        if rotate_bytes < 1:
            raise ValueError(f"rotate_bytes must be positive, got {rotate_bytes}")
        self.directory = directory
        self.federation = federation
        self.settings = dict(settings)
        self.rotate_bytes = rotate_bytes
        self.fsync = fsync
        self.clock = clock
        self.files: list[Path] = []
        self.frames = 0
        self.bytes_written = 0
        self.dropped = 0
        self.rejected_frames_per_sender = rejected_frames_per_sender
        self.rejected_unrecorded = 0
        self._rejected_by_sender: dict[str | None, int] = {}
        self._packer = FramePacker()
        self._file: BinaryIO | None = None
        self._file_bytes = 0
        self._pending = bytearray()  # frames of this event-loop turn, not yet written
        self._pending_frames = 0
        self._flush_scheduled = False
        self._session = ""
        self._session_started = 0.0
        self._failed = False

    def __enter__(self) -> Recorder:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._file is not None

    def open(self) -> None:
        """Start a session: a new first file with its header. Opening an open recorder is a no-op."""
        if self._file is not None:
            return
        self._session_started = self.clock()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._session_started))
        self._session = f"{stamp}-{secrets.token_hex(3)}"
        self._failed = False
        self._rejected_by_sender = {}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._start_file(0)
        except OSError as e:
            self._fail(e)

    def close(self) -> None:
        """Write what is pending, fsync unless the policy is `never`, and close the current file."""
        self.flush()
        if self._file is None:
            return
        handle, self._file = self._file, None
        try:
            if self.fsync != "never":
                os.fsync(handle.fileno())
            handle.close()
        except OSError as e:
            self._fail(e)

    # -- frames ------------------------------------------------------------

    def record_received(
        self, delivery: Delivery, *, received_unix: float, settle: Settlement, reason: str = ""
    ) -> None:
        body, body_bytes = delivery.body, 0
        cut = settle == "dead_letter" or (settle == "ack" and reason == UNREAD)
        if settle == "dead_letter":
            sender = delivery.user_id
            recorded = self._rejected_by_sender.get(sender, 0)
            if recorded >= self.rejected_frames_per_sender:
                if recorded == self.rejected_frames_per_sender:  # once per sender
                    log.warning(
                        "rejected traffic of this sender no longer recorded this session",
                        user_id=sender,
                        limit=self.rejected_frames_per_sender,
                    )
                self._rejected_by_sender[sender] = recorded + 1
                self.rejected_unrecorded += 1
                return
            self._rejected_by_sender[sender] = recorded + 1
        if cut and len(body) > DEAD_LETTER_BODY_BYTES:
            body, body_bytes = body[:DEAD_LETTER_BODY_BYTES], len(body)
        self._write(
            {
                "type": "message",
                "t": received_unix,
                "direction": "in",
                "exchange": delivery.exchange,
                "routing_key": delivery.routing_key,
                "message_id": delivery.message_id,
                "user_id": delivery.user_id,
                "headers": bounded_headers(delivery.headers),
                "body": body,
                "redelivered": delivery.redelivered,
                "settle": settle,
                "reason": reason,
                "body_bytes": body_bytes,
            }
        )

    def record_published(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        user_id: str,
        headers: Headers | None,
        published_unix: float,
        error: str = "",
    ) -> None:
        self._write(
            {
                "type": "message",
                "t": published_unix,
                "direction": "out",
                "exchange": exchange,
                "routing_key": routing_key,
                "message_id": message_id,
                "user_id": user_id,
                "headers": dict(headers or {}),
                "body": body,
                "error": error,
            }
        )

    def flush(self) -> None:
        """Write the pending frames to the file (and fsync them under the `always` policy)."""
        self._flush_scheduled = False
        handle = self._file
        if not self._pending or handle is None:
            return
        try:
            written = handle.write(self._pending)
            while written < len(self._pending):  # a short write: rare on regular files
                written += handle.write(self._pending[written:])
            if self.fsync == "always":
                os.fsync(handle.fileno())
        except OSError as e:
            self.dropped += self._pending_frames
            self._fail(e)
            return
        self.frames += self._pending_frames
        self.bytes_written += len(self._pending)
        self._pending.clear()
        self._pending_frames = 0

    def _write(self, fields: dict[str, Any]) -> None:
        if self._file is None:
            self.dropped += 1
            return
        frame = self._packer.pack(fields)
        self._pending += frame
        self._pending_frames += 1
        self._file_bytes += len(frame)
        if self._file_bytes >= self.rotate_bytes:
            self._rotate()
        elif self.fsync == "always" or not self._flush_later():
            self.flush()

    def _flush_later(self) -> bool:
        """Flush at the end of this event-loop turn; False when no loop is running."""
        if self._flush_scheduled:
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        loop.call_soon(self.flush)
        self._flush_scheduled = True
        return True

    # -- files -------------------------------------------------------------

    def _start_file(self, index: int) -> None:
        path = self.directory / f"{self.federation}.{self._session}.{index:05d}{LOG_SUFFIX}"
        self._file = path.open("xb", buffering=0)  # unbuffered: `flush` decides when bytes go out
        self._file_bytes = 0
        self.files.append(path)
        header = {
            "type": "header",
            "format": FORMAT_VERSION,
            "federation": self.federation,
            "session": self._session,
            "session_started_unix": self._session_started,
            "file_index": index,
            "created_unix": self.clock(),
            "settings": self.settings,
        }
        frame = self._packer.pack(header)
        self._file.write(frame)
        self._file_bytes += len(frame)
        self.bytes_written += len(frame)

    def _rotate(self) -> None:
        index = len(self.files)
        self.close()
        if self._failed:
            return
        try:
            self._start_file(index)
        except OSError as e:
            self._fail(e)

    def _fail(self, error: OSError) -> None:
        self._pending.clear()
        self._pending_frames = 0
        if not self._failed:
            log.error(
                "recording_failed",
                directory=str(self.directory),
                error=str(error),
                hint="recording stops; the service goes on",
            )
        self._failed = True
        if self._file is not None:
            handle, self._file = self._file, None
            with contextlib.suppress(OSError):
                handle.close()


class RecordingTransport:
    """A `Transport` that records everything `inner` publishes and delivers; see the module doc.

    As an async context manager it enters `inner` and opens the recorder, and on exit closes both.
    """

    def __init__(
        self, inner: Transport, recorder: Recorder, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.inner = inner
        self.recorder = recorder
        self.user = inner.user
        self._clock = clock

    async def __aenter__(self) -> RecordingTransport:
        await self.inner.__aenter__()
        self.recorder.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.inner.__aexit__(exc_type, exc, tb)
        finally:
            self.recorder.close()

    async def declare(self, topology: Topology) -> None:
        await self.inner.declare(topology)

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: Headers | None = None,
        timeout: float = DEFAULT_PUBLISH_TIMEOUT,
        bcc: Sequence[str] = (),
    ) -> None:
        started = self._clock()
        error = ""
        try:
            await self.inner.publish(
                exchange, routing_key, body, message_id=message_id, headers=headers, timeout=timeout, bcc=bcc
            )
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            # A BCC publish is logged as one frame per key: the log says which keys a body went to
            # without a field that older readers do not know.
            for key in (routing_key, *bcc):
                self.recorder.record_published(
                    exchange,
                    key,
                    body,
                    message_id=message_id,
                    user_id=self.inner.user,
                    headers=headers,
                    published_unix=started,
                    error=error,
                )

    async def consume(
        self, queue: str, handler: Handler, *, prefetch: int = DEFAULT_PREFETCH
    ) -> Subscription:
        return await self.inner.consume(queue, self._recording(handler), prefetch=prefetch)

    def is_connected(self) -> bool:
        return self.inner.is_connected()

    async def close(self) -> None:
        try:
            await self.inner.close()
        finally:
            self.recorder.close()

    def _recording(self, handler: Handler) -> Handler:
        recorder, clock = self.recorder, self._clock

        async def record_and_handle(delivery: Delivery) -> None:
            received = clock()
            inner_settle = delivery._settle
            if inner_settle is not None:

                async def settle(action: Literal["ack", "requeue", "dead_letter"], reason: str) -> None:
                    # Written before the broker hears of it: frames follow the order of decisions.
                    recorder.record_received(delivery, received_unix=received, settle=action, reason=reason)
                    await inner_settle(action, reason)
                    # This settler and the inner one refer to the delivery, which refers to them: a cycle
                    # that would keep the body, whatever its size, until the cyclic collector runs.
                    delivery._settle = None

                delivery._settle = settle
            try:
                await handler(delivery)
            except asyncio.CancelledError:
                if not delivery.settled:
                    recorder.record_received(delivery, received_unix=received, settle="abandoned")
                raise

        return record_and_handle
