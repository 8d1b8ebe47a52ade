"""Read a coordinator's record log back: files in order, frames decoded, rounds put together.

`load_log(paths)` reads files and folders of `.chorus-log` files (rotated files and several
recorder sessions replay as one log, ordered by their headers) and keeps going past damage: each
file is read up to its first bad frame, which is reported with its byte offset. `interpret(log)`
decodes what the coordinator received and published into a `Recording`: announcements, round
summaries, published pseudo-labels and every received message with how it was settled. The
`chorus-replay` commands (`inspect`, `consensus`, `publish`) all start from there.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from broker.record_format import LOG_SUFFIX, Damage, LogFile, MessageFrame, read_log_file
from coordinator.settings import CoordinatorSettings
from schemas.codec import decode_control, decode_generation, decode_reply
from schemas.errors import ChorusError, SchemaError
from schemas.messages import GenerationBatch, Message, PseudoLabels, RoundClosed, RoundOpened


class ReplayError(ChorusError):
    """A record log cannot be replayed as asked; the message says what is missing or wrong."""


@dataclass(frozen=True)
class RecordedLog:
    """The frames of one or more files, in recorded order, with what was wrong on the way."""

    files: tuple[LogFile, ...]
    frames: tuple[MessageFrame, ...]
    settings: CoordinatorSettings | None
    federation: str
    damage: tuple[Damage, ...]
    notes: tuple[str, ...] = ()


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


def load_log(paths: Sequence[Path]) -> RecordedLog:
    """Read every file, order them by session and index, and keep the good frames of each."""
    files = [read_log_file(path) for path in log_files(paths)]
    readable = sorted(
        (f for f in files if f.header is not None),
        key=lambda f: (f.header.session_started_unix, f.header.session, f.header.file_index),  # type: ignore[union-attr]
    )
    unreadable = [f for f in files if f.header is None]
    damage = tuple(f.damage for f in files if f.damage is not None)
    if not readable:
        problems = "; ".join(str(d) for d in damage) or "no header frame"
        raise ReplayError(f"no readable record log: {problems}")
    notes = _gaps(readable)
    first = readable[0].header
    assert first is not None
    settings, settings_note = _settings(first.settings, readable[0].path)
    notes += settings_note
    if any(f.header is not None and f.header.settings != first.settings for f in readable[1:]):
        notes.append("sessions were recorded with different settings; replay uses the first session's")
    return RecordedLog(
        files=tuple(readable + unreadable),
        frames=tuple(frame for f in readable for frame in f.frames),
        settings=settings,
        federation=first.federation,
        damage=damage,
        notes=tuple(notes),
    )


def _gaps(files: list[LogFile]) -> list[str]:
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
        return msgspec.convert(raw, CoordinatorSettings), []
    except msgspec.ValidationError as e:
        return None, [f"{source}: the recorded settings cannot be read by this build ({e})"]


# ---- interpretation ---------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """A message the coordinator received, decoded when possible, and the round it belongs to."""

    frame: MessageFrame
    message: Message | None
    problem: str  # why it does not decode ("" when it does)
    round_id: int  # its own round for a generation batch, else the round open when it arrived (0: none)

    @property
    def participant(self) -> str:
        if self.message is not None:
            return self.message.participant_id
        return self.frame.user_id or "?"


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
    published: list[MessageFrame] = field(default_factory=list)
    undecodable_out: int = 0

    def accepted_batches(self) -> dict[tuple[int, int, str], tuple[float, GenerationBatch]]:
        """(round, shard, participant) -> the first acked batch: the one the coordinator stored."""
        first: dict[tuple[int, int, str], tuple[float, GenerationBatch]] = {}
        for item in self.received:
            if item.frame.settle == "ack" and isinstance(item.message, GenerationBatch):
                batch = item.message
                key = (batch.round_id, batch.shard_id, batch.participant_id)
                first.setdefault(key, (item.frame.t, batch))
        return first

    def rejected(self) -> Iterator[Received]:
        return (item for item in self.received if item.frame.settle == "dead_letter")

    def late_batches(self) -> list[tuple[int, int, str]]:
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


def _take_published(recording: Recording, frame: MessageFrame) -> None:
    recording.published.append(frame)
    if frame.error:
        return  # the broker never took it
    try:
        message = decode_reply(frame.body)
    except SchemaError:
        recording.undecodable_out += 1
        return
    if isinstance(message, RoundOpened):
        recording.opened.setdefault(message.round_id, message)
        recording.opened_at.setdefault(message.round_id, frame.t)
    elif isinstance(message, RoundClosed):
        recording.closed.setdefault(message.round_id, message)
    elif isinstance(message, PseudoLabels):
        recording.labels.setdefault((message.round_id, message.shard_id), frame.body)


def _received(frame: MessageFrame, starts: list[tuple[float, int]], start_times: list[float]) -> Received:
    message: Message | None = None
    problem = ""
    try:
        if frame.routing_key.startswith("gen."):
            message = decode_generation(frame.body)
        elif frame.routing_key.startswith("ctl."):
            message = decode_control(frame.body)
        else:
            problem = f"routing key {frame.routing_key!r} is neither gen.* nor ctl.*"
    except SchemaError as e:
        problem = str(e)
    if isinstance(message, GenerationBatch):
        round_id = message.round_id
    else:
        position = bisect.bisect_right(start_times, frame.t)
        round_id = starts[position - 1][1] if position else 0
    return Received(frame=frame, message=message, problem=problem, round_id=round_id)
