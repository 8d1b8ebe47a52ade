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
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, NamedTuple

from coordinator.decisions import Decision, Outgoing, Stage
from schemas.codec import decode_reply
from schemas.errors import ChorusError
from schemas.messages import PseudoLabels

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
CREATE TABLE IF NOT EXISTS batches (  -- every answer: a GenerationBatch, or an AdapterUpdate
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
    PRIMARY KEY (round_id, shard_id)
);
CREATE TABLE IF NOT EXISTS decisions (
    round_id INTEGER NOT NULL,
    shard_id INTEGER NOT NULL,       -- WHOLE_ROUND: the row that marks the round's stage as done
    stage TEXT NOT NULL CHECK (stage IN ('decided', 'revised')),
    message_id TEXT,                 -- the reply's (NULL on a WHOLE_ROUND row, as are the others)
    kind TEXT,                       -- how its publication is recorded, e.g. 'pseudo_labels'
    body BLOB,                       -- the encoded reply, re-sent as is after a restart
    agreement TEXT,                  -- JSON {participant: agreement}, for RoundClosed
    labelled INTEGER,
    abstained INTEGER,
    PRIMARY KEY (round_id, shard_id, stage)
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
"""
# PRAGMA user_version of the schema above; opening an older file migrates it (`_migrate`).
SCHEMA_VERSION = 2
WHOLE_ROUND = -1  # the shard id of the row that marks a round's stage as done (`save_decisions`)
# Tables of version 1 that version 2 changed or dropped. Version 0 keyed the first three by message id
# alone, across senders; version 1 re-keyed them by sender.
_SENDER_KEYED = ("batches", "reports", "adapters")
_V1_TABLES = {
    "batches": "CREATE TABLE batches (message_id TEXT NOT NULL, round_id INTEGER NOT NULL, "
    "shard_id INTEGER NOT NULL, participant_id TEXT NOT NULL, received_unix REAL NOT NULL, "
    "late INTEGER NOT NULL, body BLOB NOT NULL, PRIMARY KEY (participant_id, message_id), "
    "UNIQUE (round_id, shard_id, participant_id));",
    "reports": "CREATE TABLE reports (message_id TEXT NOT NULL, round_id INTEGER NOT NULL, "
    "participant_id TEXT NOT NULL, metrics TEXT NOT NULL, PRIMARY KEY (participant_id, message_id));",
    "adapters": "CREATE TABLE adapters (message_id TEXT NOT NULL, round_id INTEGER NOT NULL, "
    "participant_id TEXT NOT NULL, body BLOB NOT NULL, PRIMARY KEY (participant_id, message_id), "
    "UNIQUE (round_id, participant_id));",
    "shard_closings": "CREATE TABLE shard_closings (round_id INTEGER NOT NULL, shard_id INTEGER NOT NULL, "
    "status TEXT NOT NULL, reason TEXT NOT NULL, answered TEXT NOT NULL, labels BLOB, agreement TEXT, "
    "PRIMARY KEY (round_id, shard_id));",
    "revisions": "CREATE TABLE revisions (round_id INTEGER NOT NULL, shard_id INTEGER NOT NULL, body BLOB, "
    "PRIMARY KEY (round_id, shard_id));",
}
# Version 1 kept semantic labels in shard_closings and their revisions in a table of their own, and
# adapters apart from batches: version 2 holds every strategy's replies in `decisions`, every answer in
# `batches` (an adapter at the round's one shard, 0, arrived when its round opened).
_V1_TO_V2 = """
INSERT OR IGNORE INTO batches SELECT a.message_id, a.round_id, 0, a.participant_id,
    coalesce(r.opened_unix, 0), 0, a.body FROM adapters AS a LEFT JOIN rounds AS r USING (round_id);
DROP TABLE adapters;
DROP TABLE revisions;
ALTER TABLE shard_closings DROP COLUMN labels;
ALTER TABLE shard_closings DROP COLUMN agreement;
"""


class StateVersionError(ChorusError):
    """A coordinator state file this build cannot read or migrate."""


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


def _v1_reply(path: Path | str, round_id: int, shard_id: int, body: bytes) -> tuple[str, int, int]:
    """(message id, labelled, abstained) of the PseudoLabels a version-1 file stored."""
    try:
        message = decode_reply(body)
        problem = None if isinstance(message, PseudoLabels) else f"a {type(message).__name__}"
    except ChorusError as e:
        problem = str(e)
    if problem is not None or not isinstance(message, PseudoLabels):
        raise StateVersionError(
            f"the coordinator state {path} (schema version 1) holds labels for round {round_id} shard "
            f"{shard_id} that are no PseudoLabels ({problem}): it cannot be migrated; start with a new "
            "state_path"
        )
    return message.message_id, len(message.labels), len(message.abstained)


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
    decision: Decision | None = None  # what the strategy decided as the shard closed (None: not yet)

    @property
    def labels(self) -> bytes | None:
        """The encoded PseudoLabels decided for this shard, when that is its reply (for readers of a
        state: the status command, replay)."""
        decision = self.decision
        return (
            decision.reply.body if decision is not None and decision.reply.kind == "pseudo_labels" else None
        )

    @property
    def agreement(self) -> dict[str, float] | None:
        """Each member's agreement with the decision, as `RoundClosed.agreement` averages it."""
        return None if self.decision is None else dict(self.decision.agreement)


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
        self._migrate(path)
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

    def _migrate(self, path: Path | str) -> None:
        """Bring an older file to SCHEMA_VERSION, one version at a time, each step in one transaction
        (a crash halfway leaves the file as it was); refuse a file from a newer build."""
        ((version,),) = self._db.execute("PRAGMA user_version").fetchall()
        existing = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version > SCHEMA_VERSION:
            self._db.close()
            raise StateVersionError(
                f"the coordinator state {path} has schema version {version}, newer than this build's "
                f"{SCHEMA_VERSION}: run the Chorus version that wrote it, or start with a new state_path"
            )
        if not existing:
            return  # a new file: SCHEMA makes it
        if version < 1:
            self._rekey_by_sender(existing)
        if version < 2:
            self._move_replies_to_decisions(path)

    def _rekey_by_sender(self, existing: set[str]) -> None:
        """Version 0 -> 1: re-key the sender-keyed tables; the columns are unchanged."""
        old = [t for t in _SENDER_KEYED if t in existing]
        renames = "".join(f"ALTER TABLE {t} RENAME TO {t}_v0;" for t in old)
        creates = "".join(_V1_TABLES[t] for t in old)
        copies = "".join(f"INSERT OR IGNORE INTO {t} SELECT * FROM {t}_v0; DROP TABLE {t}_v0;" for t in old)
        self._db.executescript(
            f"BEGIN IMMEDIATE; {renames} {creates} {copies} PRAGMA user_version = 1; COMMIT;"
        )

    def _move_replies_to_decisions(self, path: Path | str) -> None:
        """Version 1 -> 2: labels and their revisions into `decisions`, adapters into `batches`."""
        # Every table either version has, for a file from before some of them existed (each statement
        # idempotent, so a crash before the move below only leaves empty tables).
        v1_tables = "".join(
            t.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS") for t in _V1_TABLES.values()
        )
        self._db.executescript(v1_tables + SCHEMA)
        decisions = self._v1_decisions(path)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT OR IGNORE INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", decisions
            )
            for statement in _V1_TO_V2.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute("PRAGMA user_version = 2")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _v1_decisions(self, path: Path | str) -> list[tuple[object, ...]]:
        """A version-1 file's labels and revisions, as rows of `decisions`."""
        rows: list[tuple[object, ...]] = []
        closings = "SELECT round_id, shard_id, labels, agreement FROM shard_closings WHERE labels IS NOT NULL"
        for round_id, shard_id, body, agreement in self._db.execute(closings).fetchall():
            reply = _v1_reply(path, round_id, shard_id, body)
            rows.append(
                (
                    round_id,
                    shard_id,
                    "decided",
                    reply[0],
                    "pseudo_labels",
                    body,
                    agreement or "{}",
                    *reply[1:],
                )
            )
        for round_id, shard_id, body in self._db.execute(
            "SELECT round_id, shard_id, body FROM revisions"
        ).fetchall():
            if body is None:  # the row that said the round was revised
                rows.append((round_id, WHOLE_ROUND, "revised", None, None, None, None, None, None))
            else:
                reply = _v1_reply(path, round_id, shard_id, body)
                rows.append(
                    (round_id, shard_id, "revised", reply[0], "label_revision", body, "{}", *reply[1:])
                )
        return rows

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

    def closings(self, round_id: int) -> list[ClosingRow]:
        """The round's closed shards, each with what the strategy decided for it (if it did yet)."""
        rows = self._read(
            "SELECT shard_id, status, reason, answered FROM shard_closings WHERE round_id = ? "
            "ORDER BY shard_id",
            (round_id,),
        )
        decided = self.decisions(round_id, "decided")
        return [ClosingRow(s, st, r, tuple(json.loads(a)), decided.get(s)) for s, st, r, a in rows]

    # -- decisions -----------------------------------------------------------

    def save_decisions(
        self, round_id: int, stage: Stage, decisions: Iterable[Decision], *, round_done: bool = False
    ) -> None:
        """Store a strategy's decisions (a shard's first one counts); `round_done`: also record that
        the round's `stage` is over, with or without decisions."""
        rows: list[tuple[object, ...]] = [
            (
                round_id,
                d.shard_id,
                stage,
                d.reply.message_id,
                d.reply.kind,
                d.reply.body,
                json.dumps(dict(d.agreement), sort_keys=True),
                d.labelled,
                d.abstained,
            )
            for d in decisions
        ]
        if round_done:
            rows.append((round_id, WHOLE_ROUND, stage, None, None, None, None, None, None))
        with self.transaction():
            self._db.executemany("INSERT OR IGNORE INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def decisions(self, round_id: int, stage: Stage) -> dict[int, Decision]:
        """Shard -> the decision stored for round `round_id` at `stage`."""
        rows = self._read(
            "SELECT shard_id, message_id, kind, body, agreement, labelled, abstained FROM decisions "
            "WHERE round_id = ? AND stage = ? AND shard_id != ? ORDER BY shard_id",
            (round_id, stage, WHOLE_ROUND),
        )
        return {
            shard_id: Decision(shard_id, Outgoing(message_id, bytes(body), kind), json.loads(ag), lb, ab)
            for shard_id, message_id, kind, body, ag, lb, ab in rows
        }

    def stage_done(self, round_id: int, stage: Stage) -> bool:
        """Whether round `round_id`'s `stage` was recorded as over (`save_decisions(round_done=True)`)."""
        query = "SELECT 1 FROM decisions WHERE round_id = ? AND stage = ? AND shard_id = ?"
        return bool(self._read(query, (round_id, stage, WHOLE_ROUND)))

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

    def _add_traffic(self, round_id: int, participant_id: str, direction: str, nbytes: int) -> None:
        self._db.execute(_ADD_TRAFFIC.format(_marks(1, 4)), (round_id, participant_id, direction, nbytes))

    def traffic(self, round_id: int, direction: str) -> dict[str, int]:
        rows = self._read(
            "SELECT participant_id, bytes FROM traffic WHERE round_id = ? AND direction = ? "
            "ORDER BY participant_id",
            (round_id, direction),
        )
        return {p: int(b) for p, b in rows}

    # -- reports -----------------------------------------------------------

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
