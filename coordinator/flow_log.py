"""The asynchronous ledger's events in SQLite, so that a restarted coordinator rebuilds it exactly.

`PromptFlow` (coordinator/prompt_flow.py) is deterministic: the same calls in the same order give the
same offers, receipts and batches. So what must survive a crash is the calls, not the state: each one
is committed before its effect leaves the process (an offer sent, a delivery acked, a batch published),
and `LoggedFlow.open` replays the file's calls into a fresh ledger. A replay tool reads the same file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec

from coordinator.prompt_flow import Expiry, FlowSettings, PromptFlow, ReadyPrompt, Receipt

SCHEMA = """
CREATE TABLE IF NOT EXISTS flow_events (
    seq INTEGER PRIMARY KEY,
    event BLOB NOT NULL              -- msgpack of one `Event`
);
CREATE TABLE IF NOT EXISTS flow_meta (
    key TEXT PRIMARY KEY,            -- 'settings': the FlowSettings the events were made under
    value BLOB NOT NULL
);
"""


class AddPrompts(msgspec.Struct, frozen=True, tag="add_prompts"):
    prompt_ids: list[str]


class Join(msgspec.Struct, frozen=True, tag="join"):
    member: str


class Leave(msgspec.Struct, frozen=True, tag="leave"):
    member: str


class Offer(msgspec.Struct, frozen=True, tag="offer"):
    member: str
    now: float


class Receive(msgspec.Struct, frozen=True, tag="receive"):
    member: str
    prompt_id: str
    text: str
    version: int
    now: float


class Expire(msgspec.Struct, frozen=True, tag="expire"):
    now: float


class TakeBatch(msgspec.Struct, frozen=True, tag="take_batch"):
    flush: bool


Event = AddPrompts | Join | Leave | Offer | Receive | Expire | TakeBatch
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Event)


class FlowLogError(ValueError):
    """The file's events were made under other settings than the ones given."""


def apply(flow: PromptFlow, event: Event) -> object:
    """Run one event on the ledger and return what the call returned."""
    match event:
        case AddPrompts(prompt_ids):
            flow.add_prompts(prompt_ids)
            return None
        case Join(member):
            flow.join(member)
            return None
        case Leave(member):
            flow.leave(member)
            return None
        case Offer(member, now):
            return flow.offer(member, now)
        case Receive(member, prompt_id, text, version, now):
            return flow.receive(member, prompt_id, text, version, now)
        case Expire(now):
            return flow.expire(now)
        case TakeBatch(flush):
            return flow.take_batch(flush=flush)


class LoggedFlow:
    """A `PromptFlow` whose every call is committed to SQLite before it runs."""

    def __init__(self, path: Path, settings: FlowSettings | None = None) -> None:
        self.settings = settings or FlowSettings()
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        encoded = msgspec.json.encode(self.settings)
        row = self._db.execute("SELECT value FROM flow_meta WHERE key = 'settings'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO flow_meta VALUES ('settings', ?)", (encoded,))
        elif bytes(row[0]) != encoded:
            self._db.close()
            raise FlowLogError(
                f"{path}: its events were made under other flow settings ({bytes(row[0]).decode()}); "
                "use those, or a new state file"
            )
        self.flow = PromptFlow(self.settings)
        for event in self.events():
            apply(self.flow, event)

    def events(self) -> Iterator[Event]:
        for (blob,) in self._db.execute("SELECT event FROM flow_events ORDER BY seq"):
            yield _decoder.decode(blob)

    def close(self) -> None:
        self._db.close()

    def _run(self, event: Event) -> object:
        """Commit the event, then run it; a call the ledger refuses (it raises before changing
        anything) is rolled back, so a replay never meets it."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("INSERT INTO flow_events (event) VALUES (?)", (_encoder.encode(event),))
            result = apply(self.flow, event)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return result

    def add_prompts(self, prompt_ids: Iterable[str]) -> None:
        self._run(AddPrompts(list(prompt_ids)))

    def join(self, member: str) -> None:
        self._run(Join(member))

    def leave(self, member: str) -> None:
        self._run(Leave(member))

    def offer(self, member: str, now: float) -> list[str]:
        result = self._run(Offer(member, now))
        assert isinstance(result, list)
        return result

    def receive(self, member: str, prompt_id: str, text: str, version: int, now: float) -> Receipt:
        result = self._run(Receive(member, prompt_id, text, version, now))
        assert isinstance(result, Receipt)
        return result

    def expire(self, now: float) -> Expiry:
        result = self._run(Expire(now))
        assert isinstance(result, Expiry)
        return result

    def take_batch(self, *, flush: bool = False) -> list[ReadyPrompt]:
        result = self._run(TakeBatch(flush))
        assert isinstance(result, list)
        return result
