"""The record log format: a file of concatenated msgpack frames, and a reader that survives damage.

Every frame is a msgpack array `[crc32, payload]`: `payload` is a msgpack `bin` holding one
msgpack map, and `crc32` (zlib) covers the payload bytes, so a flipped byte anywhere in a frame is
caught. The map's `type` says what it is:

- `header` (first frame of every file): `format`, `federation`, `session` (one recorder run),
  `session_started_unix`, `file_index` (0, 1, ... as the recorder rotates), `created_unix`, and
  `settings` (the coordinator settings as plain data).
- `message`: `t` (unix time the message was received or published), `direction` (`in`: the
  coordinator received it; `out`: it published it), `exchange`, `routing_key`, `message_id`,
  `user_id`, `headers`, `body` (the raw bytes), and for received messages `redelivered`, `settle`
  (`ack`, `requeue`, `dead_letter`, or `abandoned` when the consumer went away before settling) and
  `reason` (the dead-letter reason); for a publish that raised, `error`. A dead-lettered message's
  body is cut to its first bytes, and `body_bytes` gives its full size (0 where the body is whole).

Reading stops a file at its first bad frame (cut short, not msgpack, CRC mismatch, not a frame)
and reports that frame's byte offset; the frames before it are kept.

`FrameScan` streams a file one frame at a time, in memory bounded by its largest frame: each
payload is read once into one buffer (its length comes from the frame's prefix), and the message's
`body` is a memoryview into that buffer, not a copy. A frame whose payload is over
`max_frame_bytes` (`MAX_FRAME_BYTES` by default) is not loaded: its checksum is verified in chunks
and it is reported in `skipped`, and reading goes on after it. `read_frame(path, offset)` reads one
frame again where a scan found it. `read_log_file` holds every frame of a file at once (small files,
tests).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type stubs
import msgspec

from broker.errors import BrokerError

FORMAT_VERSION = 1
LOG_SUFFIX = ".chorus-log"
# Room for the largest message Chorus accepts (128 MiB adapter uploads) plus the frame around it.
MAX_FRAME_BYTES = 160 * 1024 * 1024

Direction = Literal["in", "out"]
Settlement = Literal["ack", "requeue", "dead_letter", "abandoned"]


class RecordLogError(BrokerError):
    """A record log cannot be read at all (missing, unreadable)."""


class HeaderFrame(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="header"):
    format: int
    federation: str
    session: str
    session_started_unix: float
    file_index: int
    created_unix: float
    settings: dict[str, Any]


class _MessageFields(msgspec.Struct, frozen=True, kw_only=True):
    t: float
    direction: Direction
    exchange: str
    routing_key: str
    message_id: str | None
    user_id: str | None
    headers: dict[str, Any]
    redelivered: bool = False
    settle: Settlement | None = None
    reason: str = ""
    error: str = ""
    body_bytes: int = 0  # the full size of a body that was cut short; 0 when `body` is all of it


class MessageFrame(_MessageFields, frozen=True, kw_only=True, tag_field="type", tag="message"):
    body: bytes


class MessageFrameView(_MessageFields, frozen=True, kw_only=True, tag_field="type", tag="message"):
    """A message frame whose `body` is a view into the payload it was read from (no copy)."""

    body: memoryview


Frame = HeaderFrame | MessageFrame
_frame_view_decoder = msgspec.msgpack.Decoder(HeaderFrame | MessageFrameView)


def _unencodable(value: object) -> object:
    """Header values msgpack cannot carry (AMQP decimals, datetimes...) are kept as text."""
    return str(value)


class FramePacker:
    """Encodes frames; one per writer (msgpack packers are not thread-safe)."""

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True, default=_unencodable)

    def pack(self, fields: dict[str, Any]) -> bytes:
        payload: bytes = self._packer.pack(fields)
        envelope: bytes = self._packer.pack([zlib.crc32(payload), payload])
        return envelope


@dataclass(frozen=True)
class Damage:
    """Where a file stops being readable, and why."""

    path: Path
    offset: int
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: bad frame at byte {self.offset}: {self.problem}"


@dataclass(frozen=True)
class Skipped:
    """A sound frame that was not loaded: its payload is over the reader's `max_frame_bytes`."""

    path: Path
    offset: int
    payload_bytes: int
    limit: int

    def __str__(self) -> str:
        return (
            f"{self.path}: frame at byte {self.offset} skipped: its payload is {self.payload_bytes} bytes, "
            f"over the {self.limit}-byte frame limit (not loaded)"
        )


@dataclass(frozen=True)
class LogFile:
    """One file's good frames; `damage` is set when reading stopped before the end of the file."""

    path: Path
    size: int
    header: HeaderFrame | None
    frames: tuple[MessageFrame, ...]
    damage: Damage | None
    skipped: tuple[Skipped, ...] = ()


def read_log_file(path: Path, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> LogFile:
    """Every good frame of `path`, up to the first bad one (reported in `damage`), all in memory."""
    scan = FrameScan(path, max_frame_bytes=max_frame_bytes)
    frames = tuple(
        MessageFrame(**{f: getattr(view, f) for f in _MESSAGE_FIELDS}, body=bytes(view.body))
        for _, view in scan.messages()
    )
    return LogFile(path, scan.size, scan.header, frames, scan.damage, tuple(scan.skipped))


_MESSAGE_FIELDS = _MessageFields.__struct_fields__
_CHUNK = 1 << 20  # bytes read at a time from a frame that is checked but not loaded
_TRUNCATED = "the file ends inside this frame (truncated)"


class _BadFrame(Exception):
    """What is wrong with the frame at the current offset (internal to the reader)."""


@dataclass
class FrameScan:
    """One pass over a record file, a frame at a time: `messages()` yields them; after it has
    finished, `header`, `damage`, `skipped` and `frames` say what the file held."""

    path: Path
    max_frame_bytes: int = MAX_FRAME_BYTES
    size: int = 0
    header: HeaderFrame | None = None
    damage: Damage | None = None
    skipped: list[Skipped] = field(default_factory=list)
    frames: int = 0  # message frames yielded

    def __post_init__(self) -> None:
        try:
            self.size = self.path.stat().st_size
        except OSError as e:
            raise RecordLogError(f"cannot open record log {self.path}: {e.strerror or e}") from e

    def messages(self) -> Iterator[tuple[int, MessageFrameView]]:
        """(byte offset, frame) of each message frame, read once; the file is open while this runs."""
        try:
            opened: BinaryIO = self.path.open("rb")
        except OSError as e:
            raise RecordLogError(f"cannot open record log {self.path}: {e.strerror or e}") from e
        with opened as handle:
            offset = 0
            while offset < self.size:
                try:
                    frame = self._next(handle, offset)
                except _BadFrame as e:
                    self.damage = Damage(self.path, offset, str(e))
                    return
                here, offset = offset, handle.tell()
                if isinstance(frame, MessageFrameView):
                    self.frames += 1
                    yield here, frame
            if self.header is None:
                self.damage = Damage(self.path, 0, "the file is empty: no header frame (truncated)")

    def _next(self, handle: BinaryIO, offset: int) -> HeaderFrame | MessageFrameView | None:
        """The frame at `offset` (None: skipped, over the limit); raises _BadFrame."""
        crc, length = _frame_prefix(handle)
        first = offset == 0
        if length > self.max_frame_bytes:
            if first:
                raise _BadFrame(f"a {length}-byte first frame: not a Chorus record log header")
            _check_unloaded(handle, crc, length)
            self.skipped.append(Skipped(self.path, offset, length, self.max_frame_bytes))
            return None
        payload = handle.read(length)
        if len(payload) < length:
            raise _BadFrame(_TRUNCATED)
        return _checked_frame(crc, payload, first=first, header=self)


def read_frame(path: Path, offset: int) -> MessageFrameView:
    """The message frame a `FrameScan` of `path` found at `offset`, read again (checksum checked)."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            crc, length = _frame_prefix(handle)
            payload = handle.read(length)
    except OSError as e:
        raise RecordLogError(f"cannot read record log {path}: {e.strerror or e}") from e
    except _BadFrame as e:
        raise RecordLogError(f"{path}: bad frame at byte {offset}: {e}") from e
    try:
        if len(payload) < length:
            raise _BadFrame(_TRUNCATED)
        frame = _checked_frame(crc, payload, first=False, header=None)
    except _BadFrame as e:
        raise RecordLogError(f"{path}: bad frame at byte {offset}: {e}") from e
    if not isinstance(frame, MessageFrameView):
        raise RecordLogError(f"{path}: the frame at byte {offset} is not a message")
    return frame


_UINT_BYTES = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_BIN_BYTES = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def _frame_prefix(handle: BinaryIO) -> tuple[int, int]:
    """The stored checksum and payload length of the frame at the handle's position, which is left at
    the first payload byte. A frame is the msgpack array [crc32 as uint, payload as bin]."""
    start = _read_exactly(handle, 2)
    if start[0] != 0x92:
        if start[0] == 0xC1:
            raise _BadFrame("not msgpack (0xc1 is no msgpack type byte)")
        raise _BadFrame(
            f"not a frame (starts with byte {start[0]:#04x}, expected a msgpack array [crc32, payload])"
        )
    if start[1] <= 0x7F:
        crc, marker = start[1], _read_exactly(handle, 1)[0]
    elif start[1] in _UINT_BYTES:
        raw = _read_exactly(handle, _UINT_BYTES[start[1]] + 1)
        crc, marker = int.from_bytes(raw[:-1], "big"), raw[-1]
    else:
        raise _BadFrame("not a frame (expected [crc32 as int, payload as bin])")
    if marker not in _BIN_BYTES:
        raise _BadFrame("not a frame (expected [crc32 as int, payload as bin])")
    return crc, int.from_bytes(_read_exactly(handle, _BIN_BYTES[marker]), "big")


def _read_exactly(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) < size:
        raise _BadFrame(_TRUNCATED)
    return data


def _check_unloaded(handle: BinaryIO, crc: int, length: int) -> None:
    """Verify a payload's checksum reading it a chunk at a time; the handle ends after it."""
    computed, left = 0, length
    while left:
        chunk = handle.read(min(left, _CHUNK))
        if not chunk:
            raise _BadFrame(_TRUNCATED)
        computed, left = zlib.crc32(chunk, computed), left - len(chunk)
    if computed != crc:
        raise _BadFrame(_mismatch(crc, computed))


def _mismatch(stored: int, computed: int) -> str:
    return f"checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): corrupt"


def _checked_frame(
    crc: int, payload: bytes, *, first: bool, header: FrameScan | None
) -> HeaderFrame | MessageFrameView:
    """The frame in a payload whose checksum and kind are right; raises _BadFrame. A header frame is
    stored on `header` (the scan)."""
    computed = zlib.crc32(payload)
    if computed != crc:
        raise _BadFrame(_mismatch(crc, computed))
    try:
        frame = _frame_view_decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        raise _BadFrame(f"payload is not a valid frame ({e})") from e
    if first and not isinstance(frame, HeaderFrame):
        raise _BadFrame("the file does not start with a header frame: not a Chorus record log")
    if isinstance(frame, HeaderFrame):
        if not first:
            raise _BadFrame("a header frame in the middle of a file")
        if frame.format != FORMAT_VERSION:
            raise _BadFrame(f"record format {frame.format}; this build reads format {FORMAT_VERSION}")
        if header is not None:
            header.header = frame
    return frame
