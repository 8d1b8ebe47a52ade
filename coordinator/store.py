"""Coordinator state in SQLite: what must survive a crash.

Deliveries are acked only after the transaction holding their effect commits, so
anything acked is on disk. Every write is idempotent: batches by (sender, message
id) and by (round, shard, participant), publications by message id. A participant's
message ids are its own: two senders may use the same id without touching each
other's records.

The state has a run id, made when the file is created: it stays while the file lives (restarts
resume the same run) and differs between files (a fresh file is a new run), and every RoundOpened
announces it so that a participant can tell a re-run from a resumed run. `StateLock` keeps a second
coordinator process off a state file that one already uses.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, NamedTuple

from schemas.errors import ChorusError

SCHEMA = """
CREATE TABLE IF NOT EXISTS members (
    participant_id TEXT PRIMARY KEY,
    model_id TEXT NOT NULL DEFAULT '',
    can_train INTEGER NOT NULL DEFAULT 1,
    joined_unix REAL NOT NULL,
    last_seen_unix REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    opened_unix REAL NOT NULL,
    deadline_unix REAL NOT NULL,
    quorum INTEGER NOT NULL,
    expected TEXT NOT NULL,          -- JSON list of participant ids
    announcement BLOB NOT NULL,      -- the encoded RoundOpened, re-sent as is after a restart
    announced INTEGER NOT NULL DEFAULT 0,
    closed_unix REAL,
    summary BLOB                     -- the encoded RoundClosed
);
CREATE TABLE IF NOT EXISTS batches (
    message_id TEXT NOT NULL,
    round_id INTEGER NOT NULL,
    shard_id INTEGER NOT NULL,
    participant_id TEXT NOT NULL,
    received_unix REAL NOT NULL,
    late INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (participant_id, message_id),
    UNIQUE (round_id, shard_id, participant_id)
);
CREATE TABLE IF NOT EXISTS shard_closings (
    round_id INTEGER NOT NULL,
    shard_id INTEGER NOT NULL,
    status TEXT NOT NULL,            -- labelled | failed: the verdict when intake stopped
    reason TEXT NOT NULL,
    answered TEXT NOT NULL,          -- JSON list: the frozen answer set
    labels BLOB,                     -- the encoded PseudoLabels template, once consensus ran
    agreement TEXT,                  -- JSON {participant: similarity}
    PRIMARY KEY (round_id, shard_id)
);
CREATE TABLE IF NOT EXISTS revisions (
    round_id INTEGER NOT NULL,       -- the round whose labels late answers revised
    shard_id INTEGER NOT NULL,       -- NO_REVISION: the round was revised and nothing changed
    body BLOB,                       -- the encoded revision (PseudoLabels, revision 1)
    PRIMARY KEY (round_id, shard_id)
);
CREATE TABLE IF NOT EXISTS publications (
    message_id TEXT PRIMARY KEY,
    round_id INTEGER NOT NULL,
    participant_id TEXT NOT NULL,    -- '*' for an announcement to everyone
    kind TEXT NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS traffic (
    round_id INTEGER NOT NULL,
    participant_id TEXT NOT NULL,
    direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
    bytes INTEGER NOT NULL,
    PRIMARY KEY (round_id, participant_id, direction)
);
CREATE TABLE IF NOT EXISTS reports (
    message_id TEXT NOT NULL,
    round_id INTEGER NOT NULL,
    participant_id TEXT NOT NULL,
    metrics TEXT NOT NULL,
    PRIMARY KEY (participant_id, message_id)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,            -- 'run_id': this state's run, made once with the file
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS adapters (
    message_id TEXT NOT NULL,
    round_id INTEGER NOT NULL,
    participant_id TEXT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (participant_id, message_id),
    UNIQUE (round_id, participant_id)
);
"""
# PRAGMA user_version of the schema above. Version 0 keyed batches, reports and adapters by message id
# alone, across senders; opening such a file moves their rows into the new tables.
SCHEMA_VERSION = 1
NO_REVISION = -1  # the shard id of the row that marks a round as revised
_SENDER_KEYED_TABLES = ("batches", "reports", "adapters")


class StateLockedError(ChorusError):
    """Another live process holds the coordinator state (one coordinator per state file)."""


class StateLock:
    """An exclusive lock on a coordinator state file for as long as this process holds it.

    `flock` on `<state>.lock` beside the SQLite file, which holds the holder's pid. The kernel releases
    the lock when its process dies, however it dies (SIGKILL too), so a stale lock file never blocks a
    restart. The lock file is never deleted: deleting it could let two processes lock two different
    files of one name.
    """

    def __init__(self, state_path: Path | str) -> None:
        self.state_path = Path(state_path)
        self.path = self.state_path.with_name(self.state_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        """Take the lock, or raise StateLockedError naming the file and the holder's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            by = f"pid {holder}" if holder is not None else "a process whose pid it does not say"
            raise StateLockedError(
                f"the coordinator state {self.state_path} is in use by another coordinator ({by}, "
                f"lock file {self.path}); only one coordinator may run on a state: stop that one first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class Stored(Enum):
    """What storing a participant's batch did."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # the same message again, or another batch for a slot already filled
    CONFLICT = "conflict"  # a message id this sender already used for another round or shard


@dataclass(frozen=True)
class Member:
    participant_id: str
    model_id: str
    can_train: bool
    last_seen_unix: float


@dataclass(frozen=True)
class RoundRow:
    round_id: int
    status: Literal["open", "closed"]
    opened_unix: float
    deadline_unix: float
    quorum: int
    expected: tuple[str, ...]
    announcement: bytes
    announced: bool
    summary: bytes | None


@dataclass(frozen=True)
class ClosingRow:
    shard_id: int
    status: Literal["labelled", "failed"]
    reason: str
    answered: tuple[str, ...]
    labels: bytes | None
    agreement: dict[str, float] | None


class NewBatch(NamedTuple):
    """A batch to store, in the column order of the batches table."""

    message_id: str
    round_id: int
    shard_id: int
    participant_id: str
    received_unix: float
    late: bool
    body: bytes


_ADD_TRAFFIC = (  # format with the rows' placeholders
    "INSERT INTO traffic VALUES {} ON CONFLICT (round_id, participant_id, direction) "
    "DO UPDATE SET bytes = bytes + excluded.bytes"
)
_ROWS_PER_STATEMENT = 500  # at most 7 parameters each: well under SQLite's 32,766


def _chunks(batches: Sequence[NewBatch]) -> Iterator[Sequence[NewBatch]]:
    for start in range(0, len(batches), _ROWS_PER_STATEMENT):
        yield batches[start : start + _ROWS_PER_STATEMENT]


def _marks(rows: int, columns: int) -> str:
    """`rows` parenthesised groups of `columns` placeholders (one bare group when columns is 1)."""
    if columns == 1:
        return ", ".join(["?"] * rows)
    group = "(" + ", ".join(["?"] * columns) + ")"
    return ", ".join([group] * rows)


@dataclass(frozen=True)
class BatchRow:
    round_id: int
    shard_id: int
    participant_id: str
    late: bool
    body: bytes


class CoordinatorStore:
    def __init__(self, path: Path | str) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we open transactions ourselves, one per effect.
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._migrate()
        self._db.executescript(SCHEMA)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        # Made once, with the file (or the first time a file from before run ids is opened).
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('run_id', ?)", (uuid.uuid4().hex,))
        ((run_id,),) = self._db.execute("SELECT value FROM meta WHERE key = 'run_id'").fetchall()
        self.run_id: str = run_id
        self._depth = 0
        # The coordinator commits intake writes in a worker thread (the fsync off its event loop): a
        # transaction holds this lock throughout, and a read takes it, so neither sees the other's half.
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _migrate(self) -> None:
        """Re-key a version-0 file's sender-keyed tables; the columns are unchanged."""
        ((version,),) = self._db.execute("PRAGMA user_version").fetchall()
        existing = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        old = [t for t in _SENDER_KEYED_TABLES if t in existing]
        if version >= SCHEMA_VERSION or not old:
            return
        renames = "".join(f"ALTER TABLE {t} RENAME TO {t}_v0;" for t in old)
        copies = "".join(f"INSERT OR IGNORE INTO {t} SELECT * FROM {t}_v0; DROP TABLE {t}_v0;" for t in old)
        # One script, one transaction: a crash halfway leaves the version-0 file as it was.
        self._db.executescript(
            f"BEGIN IMMEDIATE; {renames} {SCHEMA} {copies} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        )

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes; nested uses (in the same thread) join the outer transaction."""
        with self._lock:
            if self._depth == 0:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if self._depth == 0:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if self._depth == 0:
                self._db.execute("COMMIT")

    def _read(self, query: str, params: tuple[object, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(query, params).fetchall()

    # -- members -----------------------------------------------------------

    def upsert_member(self, participant_id: str, model_id: str, can_train: bool, now: float) -> None:
        with self.transaction():
            self._db.execute(
                "INSERT INTO members VALUES (?, ?, ?, ?, ?) ON CONFLICT (participant_id) DO UPDATE SET "
                "model_id = excluded.model_id, can_train = excluded.can_train, "
                "last_seen_unix = max(last_seen_unix, excluded.last_seen_unix)",
                (participant_id, model_id, int(can_train), now, now),
            )

    def touch_member(self, participant_id: str, now: float) -> None:
        with self.transaction():
            self._db.execute(
                "UPDATE members SET last_seen_unix = max(last_seen_unix, ?) WHERE participant_id = ?",
                (now, participant_id),
            )

    def members(self) -> list[Member]:
        rows = self._read(
            "SELECT participant_id, model_id, can_train, last_seen_unix FROM members ORDER BY participant_id"
        )
        return [Member(p, m, bool(t), s) for p, m, t, s in rows]

    # -- rounds ------------------------------------------------------------

    def insert_round(
        self,
        *,
        round_id: int,
        opened_unix: float,
        deadline_unix: float,
        quorum: int,
        expected: Iterable[str],
        announcement: bytes,
    ) -> None:
        with self.transaction():
            self._db.execute(
                "INSERT INTO rounds (round_id, status, opened_unix, deadline_unix, quorum, expected, "
                "announcement) VALUES (?, 'open', ?, ?, ?, ?, ?)",
                (round_id, opened_unix, deadline_unix, quorum, json.dumps(sorted(expected)), announcement),
            )

    def mark_announced(self, round_id: int) -> None:
        with self.transaction():
            self._db.execute("UPDATE rounds SET announced = 1 WHERE round_id = ?", (round_id,))

    def close_round(self, round_id: int, closed_unix: float, summary: bytes) -> None:
        with self.transaction():
            self._db.execute(
                "UPDATE rounds SET status = 'closed', closed_unix = ?, summary = ? WHERE round_id = ?",
                (closed_unix, summary, round_id),
            )

    def rounds(self) -> list[RoundRow]:
        rows = self._read(
            "SELECT round_id, status, opened_unix, deadline_unix, quorum, expected, announcement, "
            "announced, summary FROM rounds ORDER BY round_id"
        )
        return [
            RoundRow(r, s, o, d, q, tuple(json.loads(e)), a, bool(n), m) for r, s, o, d, q, e, a, n, m in rows
        ]

    def summaries(self, first_round: int, last_round: int) -> list[bytes]:
        """The encoded RoundClosed of each closed round from `first_round` to `last_round`, in order."""
        rows = self._read(
            "SELECT summary FROM rounds WHERE round_id BETWEEN ? AND ? AND status = 'closed' "
            "AND summary IS NOT NULL ORDER BY round_id",
            (first_round, last_round),
        )
        return [r[0] for r in rows]

    def announcement(self, round_id: int) -> bytes | None:
        """The encoded RoundOpened of a round."""
        rows = self._read("SELECT announcement FROM rounds WHERE round_id = ?", (round_id,))
        return bytes(rows[0][0]) if rows else None

    def expected(self, round_id: int) -> list[str]:
        rows = self._read("SELECT expected FROM rounds WHERE round_id = ?", (round_id,))
        return list(json.loads(rows[0][0])) if rows else []

    def open_round(self) -> RoundRow | None:
        open_rounds = [r for r in self.rounds() if r.status == "open"]
        return open_rounds[-1] if open_rounds else None

    def last_round_id(self) -> int:
        ((value,),) = self._read("SELECT coalesce(max(round_id), 0) FROM rounds")
        return int(value)

    # -- batches -----------------------------------------------------------

    def add_batch(
        self,
        *,
        message_id: str,
        round_id: int,
        shard_id: int,
        participant_id: str,
        received_unix: float,
        late: bool,
        body: bytes,
    ) -> Stored:
        """Store one batch, one statement at a time: the reference `add_batches` is checked against."""
        with self.transaction():
            used = self._read(
                "SELECT round_id, shard_id FROM batches WHERE participant_id = ? AND message_id = ?",
                (participant_id, message_id),
            )
            if used:
                return Stored.DUPLICATE if tuple(used[0]) == (round_id, shard_id) else Stored.CONFLICT
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO batches VALUES (?, ?, ?, ?, ?, ?, ?)",
                (message_id, round_id, shard_id, participant_id, received_unix, int(late), body),
            )
            if cursor.rowcount != 1:
                return Stored.DUPLICATE
            self._add_traffic(round_id, participant_id, "in", len(body))
        return Stored.STORED

    def add_batches(self, batches: Sequence[NewBatch]) -> list[Stored]:
        """Store many batches and touch their senders in one transaction, with a handful of statements.

        Per batch, what `add_batch` would answer one by one: STORED; DUPLICATE if this sender's
        message or the (round, shard, participant) slot was already stored (or came earlier in
        `batches`); CONFLICT if the sender used this message id for another round or shard. One
        statement per step rather than per batch, because the coordinator runs this in a worker
        thread, where every SQLite call (every row stepped) hands the GIL to the event loop and waits
        to get it back.
        """
        outcomes: list[Stored] = []
        with self.transaction():
            known_ids: dict[tuple[str, str], tuple[int, int]] = {}  # (sender, id) -> (round, shard)
            known_slots: set[tuple[int, int, str]] = set()
            for chunk in _chunks(batches):
                rows = self._db.execute(
                    "SELECT message_id, round_id, shard_id, participant_id FROM batches WHERE "
                    f"(participant_id, message_id) IN (VALUES {_marks(len(chunk), 2)}) OR "
                    f"(round_id, shard_id, participant_id) IN (VALUES {_marks(len(chunk), 3)})",
                    [v for b in chunk for v in (b.participant_id, b.message_id)]
                    + [v for b in chunk for v in b[1:4]],
                ).fetchall()
                known_ids.update(((r[3], r[0]), (r[1], r[2])) for r in rows)
                known_slots.update((r[1], r[2], r[3]) for r in rows)
            fresh: list[NewBatch] = []
            traffic: dict[tuple[int, str], int] = {}
            seen: dict[str, float] = {}
            for b in batches:
                seen[b.participant_id] = max(b.received_unix, seen.get(b.participant_id, b.received_unix))
                slot = (b.round_id, b.shard_id, b.participant_id)
                used = known_ids.get((b.participant_id, b.message_id))
                if used is not None:
                    outcomes.append(Stored.DUPLICATE if used == (b.round_id, b.shard_id) else Stored.CONFLICT)
                    continue
                if slot in known_slots:
                    outcomes.append(Stored.DUPLICATE)
                    continue
                outcomes.append(Stored.STORED)
                known_ids[(b.participant_id, b.message_id)] = (b.round_id, b.shard_id)
                known_slots.add(slot)
                fresh.append(b)
                key = (b.round_id, b.participant_id)
                traffic[key] = traffic.get(key, 0) + len(b.body)
            for chunk in _chunks(fresh):
                self._db.execute(
                    f"INSERT INTO batches VALUES {_marks(len(chunk), 7)}", [v for b in chunk for v in b]
                )
            if traffic:
                self._db.execute(
                    _ADD_TRAFFIC.format(_marks(len(traffic), 4)),
                    [v for (r, p), n in traffic.items() for v in (r, p, "in", n)],
                )
            if seen:
                self._db.execute(
                    "UPDATE members SET last_seen_unix = max(last_seen_unix, touched.column2) "
                    f"FROM (VALUES {_marks(len(seen), 2)}) AS touched WHERE participant_id = touched.column1",
                    [v for item in seen.items() for v in item],
                )
        return outcomes

    def batch_slot(self, participant_id: str, message_id: str) -> tuple[int, int] | None:
        """(round, shard) of the batch this sender stored under `message_id`, if any."""
        rows = self._read(
            "SELECT round_id, shard_id FROM batches WHERE participant_id = ? AND message_id = ?",
            (participant_id, message_id),
        )
        return (int(rows[0][0]), int(rows[0][1])) if rows else None

    def batches(
        self, round_id: int, shard_id: int | None = None, *, late_only: bool = False
    ) -> list[BatchRow]:
        query = "SELECT round_id, shard_id, participant_id, late, body FROM batches WHERE round_id = ?"
        params: tuple[int, ...] = (round_id,)
        if shard_id is not None:
            query += " AND shard_id = ?"
            params += (shard_id,)
        if late_only:
            query += " AND late = 1"
        rows = self._read(query + " ORDER BY shard_id, participant_id", params)
        return [BatchRow(r, s, p, bool(late), body) for r, s, p, late, body in rows]

    def received(self, round_id: int) -> list[tuple[int, str, float, bool]]:
        """(shard, participant, arrival time, late) of every batch of a round, in arrival order."""
        rows = self._read(
            "SELECT shard_id, participant_id, received_unix, late FROM batches WHERE round_id = ? "
            "ORDER BY received_unix, rowid",
            (round_id,),
        )
        return [(s, p, t, bool(late)) for s, p, t, late in rows]

    # -- shard closings ----------------------------------------------------

    def save_closing(
        self, round_id: int, shard_id: int, status: str, reason: str, answered: Iterable[str]
    ) -> None:
        with self.transaction():
            self._db.execute(
                "INSERT OR IGNORE INTO shard_closings (round_id, shard_id, status, reason, answered) "
                "VALUES (?, ?, ?, ?, ?)",
                (round_id, shard_id, status, reason, json.dumps(sorted(answered))),
            )

    def save_labels(self, round_id: int, shard_id: int, labels: bytes, agreement: dict[str, float]) -> None:
        with self.transaction():
            self._db.execute(
                "UPDATE shard_closings SET labels = ?, agreement = ? WHERE round_id = ? AND shard_id = ?",
                (labels, json.dumps(agreement, sort_keys=True), round_id, shard_id),
            )

    def closings(self, round_id: int) -> list[ClosingRow]:
        rows = self._read(
            "SELECT shard_id, status, reason, answered, labels, agreement FROM shard_closings "
            "WHERE round_id = ? ORDER BY shard_id",
            (round_id,),
        )
        return [
            ClosingRow(s, st, r, tuple(json.loads(a)), lb, None if ag is None else json.loads(ag))
            for s, st, r, a, lb, ag in rows
        ]

    # -- label revisions -----------------------------------------------------

    def save_revisions(self, round_id: int, bodies: Mapping[int, bytes]) -> None:
        """Record that round `round_id` was revised, with the revision of each shard that changed."""
        with self.transaction():
            self._db.execute("INSERT OR IGNORE INTO revisions VALUES (?, ?, NULL)", (round_id, NO_REVISION))
            self._db.executemany(
                "INSERT OR IGNORE INTO revisions VALUES (?, ?, ?)",
                [(round_id, shard_id, body) for shard_id, body in sorted(bodies.items())],
            )

    def revisions(self, round_id: int) -> dict[int, bytes] | None:
        """Shard -> revision body of round `round_id`, or None if the round was not revised yet."""
        rows = self._read("SELECT shard_id, body FROM revisions WHERE round_id = ?", (round_id,))
        if not rows:
            return None
        return {shard_id: body for shard_id, body in rows if shard_id != NO_REVISION}

    # -- publications and traffic ------------------------------------------

    def was_published(self, message_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM publications WHERE message_id = ?", (message_id,)))

    def record_publication(
        self, message_id: str, round_id: int, recipients: Iterable[str], kind: str, nbytes: int
    ) -> None:
        """One publication, counted as `nbytes` sent to each recipient."""
        names = sorted(recipients)
        with self.transaction():
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO publications VALUES (?, ?, ?, ?, ?)",
                (message_id, round_id, ",".join(names) or "*", kind, nbytes),
            )
            if cursor.rowcount == 1:
                for name in names:
                    self._add_traffic(round_id, name, "out", nbytes)

    def add_traffic(self, round_id: int, participant_id: str, direction: str, nbytes: int) -> None:
        with self.transaction():
            self._add_traffic(round_id, participant_id, direction, nbytes)

    def _add_traffic(self, round_id: int, participant_id: str, direction: str, nbytes: int) -> None:
        self._db.execute(_ADD_TRAFFIC.format(_marks(1, 4)), (round_id, participant_id, direction, nbytes))

    def traffic(self, round_id: int, direction: str) -> dict[str, int]:
        rows = self._read(
            "SELECT participant_id, bytes FROM traffic WHERE round_id = ? AND direction = ? "
            "ORDER BY participant_id",
            (round_id, direction),
        )
        return {p: int(b) for p, b in rows}

    # -- reports and adapters ----------------------------------------------

    def add_report(
        self, message_id: str, round_id: int, participant_id: str, metrics: dict[str, float]
    ) -> bool:
        with self.transaction():
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO reports VALUES (?, ?, ?, ?)",
                (message_id, round_id, participant_id, json.dumps(metrics, sort_keys=True)),
            )
        return cursor.rowcount == 1

    def reports(self, round_id: int | None = None) -> list[tuple[int, str, dict[str, float]]]:
        query = "SELECT round_id, participant_id, metrics FROM reports"
        rows = (
            self._read(query + " ORDER BY round_id, participant_id")
            if round_id is None
            else self._read(query + " WHERE round_id = ? ORDER BY participant_id", (round_id,))
        )
        return [(r, p, json.loads(m)) for r, p, m in rows]

    def add_adapter(self, message_id: str, round_id: int, participant_id: str, body: bytes) -> bool:
        with self.transaction():
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO adapters VALUES (?, ?, ?, ?)",
                (message_id, round_id, participant_id, body),
            )
            stored = cursor.rowcount == 1
            if stored:
                self._add_traffic(round_id, participant_id, "in", len(body))
        return stored

    def adapters(self, round_id: int) -> list[tuple[str, bytes]]:
        rows = self._read(
            "SELECT participant_id, body FROM adapters WHERE round_id = ? ORDER BY participant_id",
            (round_id,),
        )
        return [(p, b) for p, b in rows]
