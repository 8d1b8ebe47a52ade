"""The intake group write (`add_batches`) answers and stores exactly what `add_batch` one by one would."""

from __future__ import annotations

import threading
from pathlib import Path

from coordinator.store import CoordinatorStore, NewBatch, Stored

STORED, DUPLICATE, CONFLICT = Stored.STORED, Stored.DUPLICATE, Stored.CONFLICT


def test_add_batches_matches_add_batch_one_by_one(tmp_path: Path) -> None:
    group = [
        NewBatch("m1", 1, 0, "a", 1.0, False, b"x" * 10),
        NewBatch("m1", 1, 0, "a", 1.5, False, b"x" * 10),  # the same message again in the group
        NewBatch("m2", 1, 0, "a", 2.0, False, b"y"),  # same slot, another message id
        NewBatch("m3", 1, 1, "a", 3.0, False, b"z" * 3),
        NewBatch("m4", 1, 0, "b", 2.5, True, b"w" * 7),
        NewBatch("m1", 1, 2, "b", 2.6, False, b"u"),  # another sender's id space: "m1" is b's own
        NewBatch("m3", 1, 2, "a", 2.7, False, b"t"),  # a's "m3" again, for another shard
        NewBatch("m0", 1, 2, "b", 0.5, False, b"v"),  # stored before the group
    ]
    one_by_one = CoordinatorStore(tmp_path / "one.sqlite3")
    grouped = CoordinatorStore(tmp_path / "group.sqlite3")
    for store in (one_by_one, grouped):
        store.upsert_member("a", "m", True, 0.0)
        store.upsert_member("b", "m", True, 0.0)
        assert store.add_batch(**group[-1]._asdict()) is STORED
    expected = []
    for batch in group:
        expected.append(one_by_one.add_batch(**batch._asdict()))
        one_by_one.touch_member(batch.participant_id, batch.received_unix)
    assert expected == [STORED, DUPLICATE, DUPLICATE, STORED, STORED, DUPLICATE, CONFLICT, DUPLICATE]
    assert grouped.add_batches(group) == expected
    for direction in ("in", "out"):
        assert grouped.traffic(1, direction) == one_by_one.traffic(1, direction)
    assert grouped.batches(1) == one_by_one.batches(1)
    assert grouped.received(1) == one_by_one.received(1)
    assert grouped.members() == one_by_one.members()


def test_add_batches_takes_more_rows_than_one_insert_holds(tmp_path: Path) -> None:
    store = CoordinatorStore(tmp_path / "s.sqlite3")
    group = [NewBatch(f"m{i}", 1, i % 7, f"p{i}", float(i), False, b"b") for i in range(1_234)]
    assert store.add_batches(group) == [STORED] * len(group)
    assert store.add_batches(group[:3]) == [DUPLICATE] * 3
    assert len(store.batches(1)) == len(group)


def test_a_transaction_in_another_thread_is_never_seen_half_done(tmp_path: Path) -> None:
    store = CoordinatorStore(tmp_path / "s.sqlite3")
    inside, release = threading.Event(), threading.Event()

    def writer() -> None:
        with store.transaction():
            store.add_batch(
                message_id="m1",
                round_id=1,
                shard_id=0,
                participant_id="a",
                received_unix=1.0,
                late=False,
                body=b"x",
            )
            inside.set()
            release.wait(5.0)

    thread = threading.Thread(target=writer)
    thread.start()
    assert inside.wait(5.0)
    seen: list[int] = []
    reader = threading.Thread(target=lambda: seen.append(len(store.batches(1))))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive() and not seen  # the read waits for the transaction to end
    release.set()
    thread.join(5.0)
    reader.join(5.0)
    assert seen == [1]
