"""What a participant must remember across a crash, in SQLite.

Labels are applied (trained on) at most once: a round counts as applied once
its checkpoint exists, and the checkpoint and the ledger row are written in
that order, so a crash between them re-applies nothing already checkpointed.

Everything here belongs to one federation run (the `run_id` a coordinator announces with each
round): round ids start again at 1 in a new run, so a ledger that meets another run is archived and
started afresh (`start_run`), never consulted for the new run's rounds.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import NamedTuple

SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (message_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS prompts (
    round_id INTEGER NOT NULL, prompt_id TEXT NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (round_id, prompt_id)
);
CREATE TABLE IF NOT EXISTS labels (
    round_id INTEGER NOT NULL, prompt_id TEXT NOT NULL, text TEXT NOT NULL, confidence REAL NOT NULL,
    PRIMARY KEY (round_id, prompt_id)
);
CREATE TABLE IF NOT EXISTS answers (
    round_id INTEGER NOT NULL, prompt_id TEXT NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (round_id, prompt_id)
);
CREATE TABLE IF NOT EXISTS revisions (
    round_id INTEGER NOT NULL, prompt_id TEXT NOT NULL, text TEXT NOT NULL, confidence REAL NOT NULL,
    applied_in INTEGER,  -- the round whose training takes it; NULL until one claims it
    PRIMARY KEY (round_id, prompt_id, text)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,  -- 'run_id': the federation run the rows below belong to
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY,
    answered INTEGER NOT NULL DEFAULT 0,
    applied INTEGER NOT NULL DEFAULT 0,
    metrics TEXT
);
"""


_RUN_TABLES = ("seen", "prompts", "labels", "answers", "revisions", "rounds")


class LabelledExample(NamedTuple):
    prompt: str  # the prompt's text
    label: str
    confidence: float
    own_answer: str | None  # what this participant answered, if it did


class ParticipantLedger:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- the run -----------------------------------------------------------

    def run_id(self) -> str | None:
        """The federation run this ledger holds, or None if none was announced to it yet."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'run_id'").fetchone()
        return None if row is None else str(row[0])

    def adopt_run(self, run_id: str) -> None:
        """Record that what this ledger holds is run `run_id`'s (the first run announced to it)."""
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('run_id', ?)", (run_id,))

    def is_empty(self) -> bool:
        """Nothing of any round recorded yet."""
        return all(
            self._db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is None for table in _RUN_TABLES
        )

    def knows_round(self, round_id: int, message_key: str) -> bool:
        """Whether round `round_id` (or the message of dedup key `message_key`) left a trace here."""
        return self.was_handled(message_key) or (
            self._db.execute("SELECT 1 FROM rounds WHERE round_id = ?", (round_id,)).fetchone() is not None
        )

    def start_run(self, run_id: str, archive: Path) -> None:
        """Copy the ledger to `archive` (a fresh SQLite file), then forget every round and hold `run_id`.

        The forgetting is one transaction: a crash leaves either the old run's rows or none. A copy left
        half-written by a crash is replaced by the next attempt.
        """
        archive.parent.mkdir(parents=True, exist_ok=True)
        archive.unlink(missing_ok=True)
        self._db.execute("VACUUM INTO ?", (str(archive),))
        self._db.execute("BEGIN IMMEDIATE")
        for table in _RUN_TABLES:
            self._db.execute(f"DELETE FROM {table}")
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('run_id', ?)", (run_id,))
        self._db.execute("COMMIT")

    def was_handled(self, message_id: str) -> bool:
        return (
            self._db.execute("SELECT 1 FROM seen WHERE message_id = ?", (message_id,)).fetchone() is not None
        )

    def mark_handled(self, message_id: str) -> None:
        """Record a message whose effect is persisted; a redelivery of it is then acked and skipped."""
        self._db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (message_id,))

    def save_prompts(self, round_id: int, prompts: list[tuple[str, str]]) -> None:
        self._db.execute("BEGIN")
        self._db.executemany(
            "INSERT OR IGNORE INTO prompts VALUES (?, ?, ?)", [(round_id, pid, text) for pid, text in prompts]
        )
        self._db.execute("INSERT OR IGNORE INTO rounds (round_id) VALUES (?)", (round_id,))
        self._db.execute("COMMIT")

    def save_labels(self, round_id: int, labels: list[tuple[str, str, float]]) -> None:
        self._db.executemany(
            "INSERT OR IGNORE INTO labels VALUES (?, ?, ?, ?)", [(round_id, p, t, c) for p, t, c in labels]
        )

    def save_answers(self, round_id: int, answers: list[tuple[str, str]]) -> None:
        """This participant's own answers (prompt id, text), to weigh the labels against."""
        self._db.executemany(
            "INSERT OR IGNORE INTO answers VALUES (?, ?, ?)", [(round_id, p, t) for p, t in answers]
        )

    def save_revisions(self, round_id: int, labels: list[tuple[str, str, float]]) -> None:
        """Revised labels of an earlier round, to train on once, with the next round's labels."""
        self._db.executemany(
            "INSERT OR IGNORE INTO revisions (round_id, prompt_id, text, confidence) VALUES (?, ?, ?, ?)",
            [(round_id, p, t, c) for p, t, c in labels],
        )

    def revised_examples(self, applying_round: int) -> list[LabelledExample]:
        """Every revision not yet taken by another round's training, claimed for `applying_round` (so a
        retry of that round's training takes them again, and no later round does)."""
        self._db.execute("UPDATE revisions SET applied_in = ? WHERE applied_in IS NULL", (applying_round,))
        return self._labelled(
            "revisions", "l.applied_in = ? ORDER BY l.round_id, l.prompt_id", applying_round
        )

    def labelled_examples(self, round_id: int) -> list[LabelledExample]:
        """Every label of the round whose prompt we know, with our own answer to it if we gave one."""
        return self._labelled("labels", "l.round_id = ? ORDER BY l.prompt_id", round_id)

    def _labelled(self, table: str, where: str, value: int) -> list[LabelledExample]:
        rows = self._db.execute(
            f"SELECT p.text, l.text, l.confidence, a.text FROM {table} l JOIN prompts p "
            "ON p.round_id = l.round_id AND p.prompt_id = l.prompt_id LEFT JOIN answers a "
            f"ON a.round_id = l.round_id AND a.prompt_id = l.prompt_id WHERE {where}",
            (value,),
        )
        return [LabelledExample(p, t, float(c), own) for p, t, c, own in rows]

    def mark_answered(self, round_id: int) -> None:
        self._db.execute(
            "INSERT INTO rounds (round_id, answered) VALUES (?, 1) "
            "ON CONFLICT (round_id) DO UPDATE SET answered = 1",
            (round_id,),
        )

    def was_answered(self, round_id: int) -> bool:
        row = self._db.execute("SELECT answered FROM rounds WHERE round_id = ?", (round_id,)).fetchone()
        return bool(row and row[0])

    def mark_applied(self, round_id: int, metrics: dict[str, float]) -> None:
        self._db.execute(
            "INSERT INTO rounds (round_id, applied, metrics) VALUES (?, 1, ?) "
            "ON CONFLICT (round_id) DO UPDATE SET applied = 1, metrics = excluded.metrics",
            (round_id, json.dumps(metrics, sort_keys=True)),
        )

    def was_applied(self, round_id: int) -> bool:
        row = self._db.execute("SELECT applied FROM rounds WHERE round_id = ?", (round_id,)).fetchone()
        return bool(row and row[0])

    def last_applied_round(self) -> int:
        (value,) = self._db.execute(
            "SELECT coalesce(max(round_id), 0) FROM rounds WHERE applied = 1"
        ).fetchone()
        return int(value)
