"""SQLite state survives reopening and stays idempotent; prompt sampling is deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.decisions import Decision, Outgoing
from coordinator.prompts import PromptSampler, PromptSetError, PublicPrompt, load_prompts, split_into_shards
from coordinator.store import CoordinatorStore, StateVersionError, Stored
from schemas.codec import encode
from schemas.messages import Label, PseudoLabels


def test_batches_are_idempotent_by_message_id_and_by_slot(tmp_path: Path) -> None:
    store = CoordinatorStore(tmp_path / "s.sqlite3")
    kwargs = {"round_id": 1, "shard_id": 0, "participant_id": "a", "received_unix": 1.0, "late": False}
    assert store.add_batch(message_id="m1", body=b"x" * 10, **kwargs) is Stored.STORED  # type: ignore[arg-type]
    assert store.add_batch(message_id="m1", body=b"x" * 10, **kwargs) is Stored.DUPLICATE  # type: ignore[arg-type]
    assert store.add_batch(message_id="m2", body=b"y", **kwargs) is Stored.DUPLICATE  # type: ignore[arg-type]
    assert store.traffic(1, "in") == {"a": 10}
    store.close()
    reopened = CoordinatorStore(tmp_path / "s.sqlite3")
    assert [b.body for b in reopened.batches(1, 0)] == [b"x" * 10]


def test_round_lifecycle_persists(tmp_path: Path) -> None:
    store = CoordinatorStore(tmp_path / "s.sqlite3")
    store.insert_round(
        round_id=1, opened_unix=1.0, deadline_unix=9.0, quorum=2, expected=["b", "a"], announcement=b"ann"
    )
    store.save_closing(1, 0, "labelled", "all answered", ["b", "a"])
    store.save_closing(1, 0, "failed", "ignored: first verdict wins", [])
    store.save_decisions(1, "decided", [Decision(0, Outgoing("l", b"labels", "pseudo_labels"), {"a": 0.5})])
    store.close()
    store = CoordinatorStore(tmp_path / "s.sqlite3")
    row = store.open_round()
    assert row is not None and row.expected == ("a", "b") and not row.announced
    (closing,) = store.closings(1)
    assert (closing.status, closing.answered, closing.labels, closing.agreement) == (
        "labelled",
        ("a", "b"),
        b"labels",
        {"a": 0.5},
    )
    store.close_round(1, 10.0, b"summary")
    assert store.open_round() is None and store.last_round_id() == 1


def test_publications_count_bytes_once(tmp_path: Path) -> None:
    store = CoordinatorStore(tmp_path / "s.sqlite3")
    store.record_publication("l-1", 1, ["a", "b"], "pseudo_labels", 100)
    store.record_publication("l-1", 1, ["a", "b"], "pseudo_labels", 100)
    assert store.was_published("l-1") and not store.was_published("l-2")
    assert store.traffic(1, "out") == {"a": 100, "b": 100}


def test_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    store = CoordinatorStore(tmp_path / "s.sqlite3")
    with pytest.raises(RuntimeError), store.transaction():
        store.upsert_member("a", "m", True, 1.0)
        raise RuntimeError("crash before commit")
    assert store.members() == []


def write_prompts(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_load_prompts_and_errors(tmp_path: Path) -> None:
    good = write_prompts(
        tmp_path / "p.jsonl", [{"prompt_id": "a", "prompt": "A?"}, {"prompt_id": "b", "text": "B?"}]
    )
    assert load_prompts(good) == [PublicPrompt("a", "A?"), PublicPrompt("b", "B?")]
    with pytest.raises(PromptSetError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_id": "a", "prompt": "A?"}\nnot json\n', encoding="utf-8")
    with pytest.raises(PromptSetError, match=r"bad.jsonl:2"):
        load_prompts(bad)
    dup = write_prompts(
        tmp_path / "d.jsonl", [{"prompt_id": "a", "prompt": "x"}, {"prompt_id": "a", "prompt": "y"}]
    )
    with pytest.raises(PromptSetError, match="twice"):
        load_prompts(dup)


def test_sampler_is_deterministic_and_covers_the_set() -> None:
    prompts = [PublicPrompt(f"p{i}", f"t{i}") for i in range(10)]
    first = PromptSampler(prompts, seed=3)
    again = PromptSampler(prompts, seed=3)
    rounds = [first.sample(r, 4) for r in range(1, 4)]
    assert rounds == [again.sample(r, 4) for r in range(1, 4)]
    assert all(len({p.prompt_id for p in r}) == 4 for r in rounds)
    # the first two rounds are disjoint slices of one permutation
    assert not {p.prompt_id for p in rounds[0]} & {p.prompt_id for p in rounds[1]}
    carried = first.sample(2, 4, first=["p9", "p9", "unknown"])
    assert carried[0].prompt_id == "p9" and len({p.prompt_id for p in carried}) == 4


def test_split_into_shards_deals_round_robin() -> None:
    prompts = [PublicPrompt(f"p{i}", "t") for i in range(5)]
    shards = split_into_shards(prompts, 3)
    assert [[p.prompt_id for p in s.prompts] for s in shards] == [["p0", "p3"], ["p1", "p4"], ["p2"]]
    assert [s.shard_id for s in split_into_shards(prompts[:2], 4)] == [0, 1]


def test_message_ids_are_each_senders_own_and_a_reused_id_is_a_conflict(tmp_path: Path) -> None:
    store = CoordinatorStore(tmp_path / "s.sqlite3")
    common = {"shard_id": 0, "received_unix": 1.0, "late": False, "body": b"x"}
    # mallory takes alice's deterministic id first: it is mallory's own id, alice's batch still stores.
    assert store.add_batch(message_id="alice.r1.s0.gen", round_id=1, participant_id="mallory", **common)  # type: ignore[arg-type]
    assert store.add_batch(message_id="alice.r1.s0.gen", round_id=1, participant_id="alice", **common) is (  # type: ignore[arg-type]
        Stored.STORED
    )
    assert store.batch_slot("alice", "alice.r1.s0.gen") == (1, 0)
    # The same id from the same sender for another round is a conflict, not a duplicate.
    assert store.add_batch(message_id="alice.r1.s0.gen", round_id=2, participant_id="alice", **common) is (  # type: ignore[arg-type]
        Stored.CONFLICT
    )
    assert store.add_report("alice.r1.report", 1, "mallory", {"x": 1.0})
    assert store.add_report("alice.r1.report", 1, "alice", {"x": 2.0})
    assert not store.add_report("alice.r1.report", 1, "alice", {"x": 2.0})
    assert [(p, m) for _, p, m in store.reports(1)] == [("alice", {"x": 2.0}), ("mallory", {"x": 1.0})]


def test_a_version_0_store_is_rekeyed_by_sender_on_open(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE batches (message_id TEXT PRIMARY KEY, round_id INTEGER NOT NULL,"
        " shard_id INTEGER NOT NULL, participant_id TEXT NOT NULL, received_unix REAL NOT NULL,"
        " late INTEGER NOT NULL, body BLOB NOT NULL, UNIQUE (round_id, shard_id, participant_id));"
        "INSERT INTO batches VALUES ('m1', 1, 0, 'alice', 1.0, 0, x'00');"
    )
    db.commit()
    db.close()
    store = CoordinatorStore(path)
    assert [b.participant_id for b in store.batches(1)] == ["alice"]
    common = {"round_id": 1, "shard_id": 0, "received_unix": 2.0, "late": False, "body": b"y"}
    assert store.add_batch(message_id="m1", participant_id="bob", **common) is Stored.STORED  # type: ignore[arg-type]


def version_1_store(path: Path, labels: bytes) -> None:
    """A state file as version 1 wrote it: labels in shard_closings, a revisions table, adapters apart."""
    import sqlite3

    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE rounds (round_id INTEGER PRIMARY KEY, status TEXT NOT NULL, opened_unix REAL NOT NULL,"
        " deadline_unix REAL NOT NULL, quorum INTEGER NOT NULL, expected TEXT NOT NULL,"
        " announcement BLOB NOT NULL, announced INTEGER NOT NULL DEFAULT 0, closed_unix REAL, summary BLOB);"
        "CREATE TABLE shard_closings (round_id INTEGER NOT NULL, shard_id INTEGER NOT NULL,"
        " status TEXT NOT NULL, reason TEXT NOT NULL, answered TEXT NOT NULL, labels BLOB, agreement TEXT,"
        " PRIMARY KEY (round_id, shard_id));"
        "CREATE TABLE revisions (round_id INTEGER NOT NULL, shard_id INTEGER NOT NULL, body BLOB,"
        " PRIMARY KEY (round_id, shard_id));"
        "CREATE TABLE adapters (message_id TEXT NOT NULL, round_id INTEGER NOT NULL,"
        " participant_id TEXT NOT NULL, body BLOB NOT NULL, PRIMARY KEY (participant_id, message_id),"
        " UNIQUE (round_id, participant_id));"
        "INSERT INTO rounds VALUES (1, 'open', 5.0, 9.0, 2, '[\"a\", \"b\"]', x'00', 1, NULL, NULL);"
        "INSERT INTO adapters VALUES ('a.r1.adapter', 1, 'a', x'01');"
        "INSERT INTO revisions VALUES (1, -1, NULL);"
        "PRAGMA user_version = 1;"
    )
    db.execute(
        "INSERT INTO shard_closings VALUES (1, 0, 'labelled', 'all answered', '[\"a\", \"b\"]', ?, ?)",
        (labels, '{"a": 0.5}'),
    )
    db.execute("INSERT INTO revisions VALUES (1, 0, ?)", (labels,))
    db.commit()
    db.close()


def test_a_version_1_store_moves_its_labels_revisions_and_adapters_on_open(tmp_path: Path) -> None:
    message = PseudoLabels(
        federation="f",
        round_id=1,
        message_id="f.r1.s0.labels",
        participant_id="coordinator",
        shard_id=0,
        labels=[Label(prompt_id="q0", text="zero", confidence=0.9, support=2, source="a")],
        abstained=["q1", "q2"],
    )
    path = tmp_path / "v1.sqlite3"
    version_1_store(path, encode(message))
    store = CoordinatorStore(path)
    (closing,) = store.closings(1)
    assert closing.labels == encode(message) and closing.agreement == {"a": 0.5}
    assert closing.decision is not None
    assert (closing.decision.reply.message_id, closing.decision.labelled, closing.decision.abstained) == (
        "f.r1.s0.labels",
        1,
        2,
    )
    assert store.stage_done(1, "revised")
    assert store.decisions(1, "revised")[0].reply.body == encode(message)
    assert [(b.shard_id, b.participant_id, b.late, b.body) for b in store.batches(1)] == [
        (0, "a", False, b"\x01")
    ]
    assert store.received(1) == [(0, "a", 5.0, False)]  # arrived, for a restart, as its round opened
    store.close()
    assert CoordinatorStore(path).closings(1)[0].labels == encode(message)  # migrated once


def test_a_version_1_store_whose_labels_do_not_decode_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    version_1_store(path, b"not msgpack labels")
    with pytest.raises(StateVersionError, match=r"round 1 shard 0 .*cannot be migrated; start with a new"):
        CoordinatorStore(path)


def test_a_store_from_a_newer_build_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    CoordinatorStore(path).close()
    import sqlite3

    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StateVersionError, match="schema version 99, newer than this build's 2"):
        CoordinatorStore(path)
