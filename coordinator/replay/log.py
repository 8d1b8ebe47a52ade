"""Read a coordinator's record log back: files in order, frames decoded, rounds put together.

`load_log(paths)` reads files and folders of `.chorus-log` files (rotated files and several
recorder sessions replay as one log, ordered by their headers) and keeps going past damage: each
file is read up to its first bad frame, which is reported with its byte offset. `interpret(log)`
decodes what the coordinator received and published into a `Recording`: announcements, round
summaries, published pseudo-labels and every received message with how it was settled. The
`chorus-replay` commands (`inspect`, `consensus`, `publish`) all start from there.

Memory: the log is read one frame at a time, and what is kept of a frame is a `RecordedFrame`, its
fields without its body or headers, where it lies and what the body decoded to in brief (kind,
sender, round); only announcements, round summaries and published labels are kept whole. A verb
that needs a body reads it again (`RecordedFrame.load`, `batch_of`) when it gets to it, so a replay
holds about its largest frame plus a few hundred bytes per frame. A frame over `max_frame_bytes` is
not loaded at all: it is reported as skipped (`RecordedLog.skipped`), and reading goes on after it.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from broker.record_format import (
    LOG_SUFFIX,
    MAX_FRAME_BYTES,
    Damage,
    Direction,
    FrameScan,
    HeaderFrame,
    MessageFrameView,
    Settlement,
    Skipped,
    read_frame,
)
from coordinator.settings import CoordinatorSettings, settings_from_table
from schemas.codec import decode_control, decode_generation, decode_reply
from schemas.errors import ChorusError, SchemaError
from schemas.messages import GenerationBatch, PseudoLabels, RoundClosed, RoundOpened


class ReplayError(ChorusError):
    """A record log cannot be replayed as asked; the message says what is missing or wrong."""


@dataclass(frozen=True, slots=True)
class Content:
    """What a frame's body decodes to, in brief; `kind` is "" when it does not decode (`problem`)."""

    kind: str = ""
    participant_id: str = ""
    round_id: int = 0
    message_id: str = ""
    shard_id: int | None = None  # of a generation batch or pseudo-labels
    problem: str = ""
    kept: RoundOpened | RoundClosed | None = None  # the few messages a replay needs whole
    labels: bytes | None = None  # a PseudoLabels body, as published


@dataclass(frozen=True, slots=True)
class RecordedFrame:
    """A message frame as a replay keeps it: its fields without body or headers, where it lies in its
    file, and what its body decoded to (`content`)."""

    path: Path
    offset: int
    t: float
    direction: Direction
    exchange: str
    routing_key: str
    message_id: str | None
    user_id: str | None
    redelivered: bool
    settle: Settlement | None
    reason: str
    error: str
    body_size: int  # bytes of the body as recorded
    body_bytes: int  # the full size of a body that was recorded cut; 0 when it is whole
    content: Content

    def load(self) -> MessageFrameView:
        """The whole frame, body and headers, read again from its file."""
        return read_frame(self.path, self.offset)


@dataclass(frozen=True)
class RecordedFile:
    """One file: its header, how many message frames were read, where reading stopped and why."""

    path: Path
    size: int
    header: HeaderFrame | None
    frames: int
    damage: Damage | None
    skipped: tuple[Skipped, ...] = ()


@dataclass(frozen=True)
class RecordedLog:
    """The frames of one or more files, in recorded order, with what was wrong on the way."""

    files: tuple[RecordedFile, ...]
    frames: tuple[RecordedFrame, ...]
    settings: CoordinatorSettings | None
    federation: str
    damage: tuple[Damage, ...]
    notes: tuple[str, ...] = ()
    skipped: tuple[Skipped, ...] = ()  # frames over the frame limit, not loaded


def log_files(paths: Sequence[Path]) -> list[Path]:
    """`paths` with each folder replaced by the record logs in it."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.name.endswith(LOG_SUFFIX))
            if not inside:
                raise ReplayError(f"folder {path} holds no {LOG_SUFFIX} files")
            found.extend(inside)
        elif path.exists():
            found.append(path)
        else:
            raise ReplayError(f"record log {path} does not exist")
    if not found:
        raise ReplayError("no record log given")
    return list(dict.fromkeys(found))


def load_log(paths: Sequence[Path], *, max_frame_bytes: int = MAX_FRAME_BYTES) -> RecordedLog:
    """Read every file a frame at a time, order them by session and index, and keep what the replay
    needs of each good frame. A frame whose payload is over `max_frame_bytes` is skipped, not loaded."""
    scanned = [_scan(path, max_frame_bytes) for path in log_files(paths)]
    readable = sorted(
        (s for s in scanned if s[0].header is not None),
        key=lambda s: (s[0].header.session_started_unix, s[0].header.session, s[0].header.file_index),  # type: ignore[union-attr]
    )
    files = [f for f, _ in readable] + [f for f, _ in scanned if f.header is None]
    damage = tuple(f.damage for f, _ in scanned if f.damage is not None)
    if not readable:
        problems = "; ".join(str(d) for d in damage) or "no header frame"
        raise ReplayError(f"no readable record log: {problems}")
    notes = _gaps([f for f, _ in readable])
    first = readable[0][0].header
    assert first is not None
    settings, settings_note = _settings(first.settings, readable[0][0].path)
    notes += settings_note
    if any(f.header is not None and f.header.settings != first.settings for f, _ in readable[1:]):
        notes.append("sessions were recorded with different settings; replay uses the first session's")
    return RecordedLog(
        files=tuple(files),
        frames=tuple(frame for _, frames in readable for frame in frames),
        settings=settings,
        federation=first.federation,
        damage=damage,
        notes=tuple(notes),
        skipped=tuple(skip for f in files for skip in f.skipped),
    )


def _scan(path: Path, max_frame_bytes: int) -> tuple[RecordedFile, list[RecordedFrame]]:
    scan = FrameScan(path, max_frame_bytes=max_frame_bytes)
    frames = [_recorded(path, offset, view) for offset, view in scan.messages()]
    return RecordedFile(path, scan.size, scan.header, scan.frames, scan.damage, tuple(scan.skipped)), frames


def _recorded(path: Path, offset: int, frame: MessageFrameView) -> RecordedFrame:
    return RecordedFrame(
        path=path,
        offset=offset,
        t=frame.t,
        direction=frame.direction,
        exchange=frame.exchange,
        routing_key=frame.routing_key,
        message_id=frame.message_id,
        user_id=frame.user_id,
        redelivered=frame.redelivered,
        settle=frame.settle,
        reason=frame.reason,
        error=frame.error,
        body_size=len(frame.body),
        body_bytes=frame.body_bytes,
        content=_content(frame),
    )


def _content(frame: MessageFrameView) -> Content:
    """The body decoded as the coordinator would have (its codec's limits), kept in brief."""
    body = _buffer(frame.body)
    try:
        if frame.direction == "out":
            message = decode_reply(body)
        elif frame.routing_key.startswith("gen."):
            message = decode_generation(body)
        elif frame.routing_key.startswith("ctl."):
            message = decode_control(body)
        else:
            return Content(problem=f"routing key {frame.routing_key!r} is neither gen.* nor ctl.*")
    except SchemaError as e:
        return Content(problem=str(e))
    return Content(
        kind=str(type(message).__struct_config__.tag),
        participant_id=message.participant_id,
        round_id=message.round_id,
        message_id=message.message_id,
        shard_id=message.shard_id if isinstance(message, GenerationBatch | PseudoLabels) else None,
        kept=message if isinstance(message, RoundOpened | RoundClosed) else None,
        labels=bytes(frame.body) if isinstance(message, PseudoLabels) else None,
    )


def _buffer(view: memoryview) -> bytes:
    """A frame's body for the schema decoders, without copying it: msgspec reads any buffer."""
    return view  # type: ignore[return-value]  # a memoryview is a bytes-like buffer to msgspec


def batch_of(frame: RecordedFrame) -> GenerationBatch:
    """The generation batch a received frame holds, read again from the log."""
    try:
        return decode_generation(_buffer(frame.load().body))
    except (SchemaError, ChorusError) as e:
        raise ReplayError(f"{frame.path} byte {frame.offset}: the batch cannot be read again ({e})") from e


def _gaps(files: list[RecordedFile]) -> list[str]:
    """Rotated files missing from the middle of a session."""
    notes = []
    for before, after in itertools.pairwise(files):
        b, a = before.header, after.header
        assert b is not None and a is not None
        if a.session == b.session and a.file_index != b.file_index + 1:
            notes.append(
                f"session {a.session}: files {b.file_index + 1}..{a.file_index - 1} are missing "
                f"(between {before.path.name} and {after.path.name})"
            )
        if a.session != b.session and a.file_index != 0:
            notes.append(f"session {a.session}: its first files are missing (starts at {after.path.name})")
    if files and files[0].header is not None and files[0].header.file_index != 0:
        notes.append(f"session {files[0].header.session}: its first files are missing")
    return notes


def _settings(raw: dict[str, object], source: Path) -> tuple[CoordinatorSettings | None, list[str]]:
    try:
        return settings_from_table(raw), []
    except msgspec.ValidationError as e:
        return None, [f"{source}: the recorded settings cannot be read by this build ({e})"]


# ---- interpretation ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received:
    """A message the coordinator received, and the round it belongs to."""

    frame: RecordedFrame
    round_id: int  # its own round for a generation batch, else the round open when it arrived (0: none)

    @property
    def content(self) -> Content:
        return self.frame.content

    @property
    def decoded(self) -> bool:
        return bool(self.frame.content.kind)

    @property
    def problem(self) -> str:
        """Why it does not decode ("" when it does)."""
        return self.frame.content.problem

    @property
    def participant(self) -> str:
        if self.decoded:
            return self.frame.content.participant_id
        return self.frame.user_id or "?"


BatchKey = tuple[int, int, str]  # (round, shard, participant)


@dataclass
class Recording:
    """What a log says happened: rounds announced and closed, labels published, messages received."""

    federation: str
    settings: CoordinatorSettings | None
    opened: dict[int, RoundOpened] = field(default_factory=dict)
    opened_at: dict[int, float] = field(default_factory=dict)  # frame time of the announcement
    closed: dict[int, RoundClosed] = field(default_factory=dict)
    labels: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (round, shard) -> PseudoLabels
    received: list[Received] = field(default_factory=list)
    published: list[RecordedFrame] = field(default_factory=list)
    undecodable_out: int = 0

    def accepted_batches(self) -> dict[BatchKey, RecordedFrame]:
        """(round, shard, participant) -> the frame of the first acked batch: the one the coordinator
        stored (`batch_of(frame)` reads the batch itself)."""
        first: dict[BatchKey, RecordedFrame] = {}
        for item in self.received:
            content = item.frame.content
            if item.frame.settle == "ack" and content.kind == "generation_batch":
                assert content.shard_id is not None
                first.setdefault((content.round_id, content.shard_id, content.participant_id), item.frame)
        return first

    def rejected(self) -> Iterator[Received]:
        return (item for item in self.received if item.frame.settle == "dead_letter")

    def late_batches(self) -> list[BatchKey]:
        """Accepted batches that are not in their shard's recorded answered set (rounds with a summary)."""
        late = []
        for round_id, shard_id, participant in self.accepted_batches():
            summary = self.closed.get(round_id)
            if summary is None:
                continue
            answered = {o.shard_id: set(o.answered) for o in summary.shards}.get(shard_id, set())
            if participant not in answered:
                late.append((round_id, shard_id, participant))
        return sorted(late)


def interpret(log: RecordedLog) -> Recording:
    recording = Recording(federation=log.federation, settings=log.settings)
    for frame in log.frames:
        if frame.direction == "out":
            _take_published(recording, frame)
    starts = sorted((t, round_id) for round_id, t in recording.opened_at.items())
    start_times = [t for t, _ in starts]
    for frame in log.frames:
        if frame.direction == "in":
            recording.received.append(_received(frame, starts, start_times))
    return recording


def _take_published(recording: Recording, frame: RecordedFrame) -> None:
    recording.published.append(frame)
    if frame.error:
        return  # the broker never took it
    content = frame.content
    if not content.kind:
        recording.undecodable_out += 1
    elif isinstance(content.kept, RoundOpened):
        recording.opened.setdefault(content.round_id, content.kept)
        recording.opened_at.setdefault(content.round_id, frame.t)
    elif isinstance(content.kept, RoundClosed):
        recording.closed.setdefault(content.round_id, content.kept)
    elif content.labels is not None and content.shard_id is not None:
        recording.labels.setdefault((content.round_id, content.shard_id), content.labels)


def _received(frame: RecordedFrame, starts: list[tuple[float, int]], start_times: list[float]) -> Received:
    if frame.content.kind == "generation_batch":
        round_id = frame.content.round_id
    else:
        position = bisect.bisect_right(start_times, frame.t)
        round_id = starts[position - 1][1] if position else 0
    return Received(frame=frame, round_id=round_id)
