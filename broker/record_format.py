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
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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


class MessageFrame(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="message"):
    t: float
    direction: Direction
    exchange: str
    routing_key: str
    message_id: str | None
    user_id: str | None
    headers: dict[str, Any]
    body: bytes
    redelivered: bool = False
    settle: Settlement | None = None
    reason: str = ""
    error: str = ""
    body_bytes: int = 0  # the full size of a body that was cut short; 0 when `body` is all of it


Frame = HeaderFrame | MessageFrame


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
class LogFile:
    """One file's good frames; `damage` is set when reading stopped before the end of the file."""

    path: Path
    size: int
    header: HeaderFrame | None
    frames: tuple[MessageFrame, ...]
    damage: Damage | None


def read_log_file(path: Path) -> LogFile:
    """Every good frame of `path`, up to the first bad one (reported in `damage`)."""
    try:
        handle = path.open("rb")
    except OSError as e:
        raise RecordLogError(f"cannot open record log {path}: {e.strerror or e}") from e
    with handle:
        size = path.stat().st_size
        unpacker = msgpack.Unpacker(handle, raw=False, max_buffer_size=MAX_FRAME_BYTES)
        header: HeaderFrame | None = None
        frames: list[MessageFrame] = []
        offset = 0
        while True:
            try:
                envelope = unpacker.unpack()
            except msgpack.OutOfData:
                if offset < size:
                    missing = "the file ends inside this frame (truncated)"
                    return LogFile(path, size, header, tuple(frames), Damage(path, offset, missing))
                if header is None:
                    empty = Damage(path, 0, "the file is empty: no header frame (truncated)")
                    return LogFile(path, size, None, (), empty)
                return LogFile(path, size, header, tuple(frames), None)
            except (ValueError, msgpack.UnpackException) as e:
                problem = f"not msgpack ({type(e).__name__}: {str(e) or 'invalid type byte'})"
                return LogFile(path, size, header, tuple(frames), Damage(path, offset, problem))
            frame_or_problem = _check_frame(envelope, first=header is None and not frames)
            if isinstance(frame_or_problem, str):
                return LogFile(path, size, header, tuple(frames), Damage(path, offset, frame_or_problem))
            if isinstance(frame_or_problem, HeaderFrame):
                header = frame_or_problem
            else:
                frames.append(frame_or_problem)
            offset = unpacker.tell()


def _check_frame(envelope: object, *, first: bool) -> Frame | str:
    """The frame in `envelope`, or what is wrong with it."""
    if not (isinstance(envelope, list) and len(envelope) == 2):
        return "not a frame (expected a msgpack array [crc32, payload])"
    crc, payload = envelope
    if not isinstance(crc, int) or not isinstance(payload, bytes):
        return "not a frame (expected [crc32 as int, payload as bin])"
    if zlib.crc32(payload) != crc:
        return f"checksum mismatch (stored {crc:#010x}, computed {zlib.crc32(payload):#010x}): corrupt"
    try:
        fields = msgpack.unpackb(payload, raw=False)
        frame: Frame = msgspec.convert(fields, Frame)
    except (ValueError, msgpack.UnpackException, msgspec.ValidationError) as e:
        return f"payload is not a valid frame ({e})"
    if first and not isinstance(frame, HeaderFrame):
        return "the file does not start with a header frame: not a Chorus record log"
    if isinstance(frame, HeaderFrame):
        if not first:
            return "a header frame in the middle of a file"
        if frame.format != FORMAT_VERSION:
            return f"record format {frame.format}; this build reads format {FORMAT_VERSION}"
    return frame
