"""The per-sender log budget: the first lines of each sender, then one count per window."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs
from support.coordinators import memory_coordinator, write_config
from support.waiting import eventually

from broker.memory import MemoryBroker
from broker.topology import UP_EXCHANGE, generation_key
from common.log_budget import OVERFLOW_SENDER, LogBudget
from participant.testing import publish_join
from schemas import new_message_id

log = structlog.get_logger("test")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def events(logs: Sequence[Mapping[str, Any]]) -> list[tuple[object, ...]]:
    return [
        (e["event"], e.get("participant", e.get("sender")), e.get("suppressed"))
        for e in logs
        if str(e["event"]).startswith("rejected")
    ]


def test_a_flood_from_one_sender_is_a_few_lines_and_a_count() -> None:
    clock = Clock()
    budget = LogBudget(log, per_window=3, window_seconds=60.0, clock=clock)
    with capture_logs() as logs:
        logged = [budget.warning("rejected", sender="mallory", participant="mallory") for _ in range(10_000)]
        budget.warning("rejected", sender="alice", participant="alice")  # another sender's own budget
        clock.now += 60.0  # mallory's window ends: its next line says how many were left out
        budget.warning("rejected", sender="mallory", participant="mallory")
    assert logged.count(True) == 3 and not any(logged[3:])
    assert events(logs) == [
        ("rejected", "mallory", None),
        ("rejected", "mallory", None),
        ("rejected", "mallory", None),
        ("rejected", "alice", None),
        ("rejected_suppressed", "mallory", 9_997),
        ("rejected", "mallory", None),
    ]
    (summary,) = [e for e in logs if e["event"] == "rejected_suppressed"]
    assert summary["log_level"] == "warning" and summary["logged"] == 3 and summary["window_seconds"] == 60.0


def test_a_sender_that_stops_is_summarised_by_the_next_sweep_then_forgotten() -> None:
    clock = Clock()
    budget = LogBudget(log, per_window=1, window_seconds=10.0, clock=clock)
    with capture_logs() as logs:
        for _ in range(5):
            budget.info("rejected", sender="mallory", participant="mallory")
        clock.now += 10.0
        budget.info("rejected", sender="alice", participant="alice")  # any line sweeps ended windows
        clock.now += 10.0
        budget.info("rejected", sender="alice", participant="alice")  # mallory's window is gone: no repeat
    assert events(logs) == [
        ("rejected", "mallory", None),
        ("rejected_suppressed", "mallory", 4),
        ("rejected", "alice", None),
        ("rejected", "alice", None),
    ]
    assert all(e["log_level"] == "info" for e in logs)


def test_flush_reports_what_is_left_out_so_far() -> None:
    budget = LogBudget(log, per_window=2, clock=Clock())
    with capture_logs() as logs:
        for _ in range(7):
            budget.warning("rejected", sender=None, participant=None)  # no login: a sender of its own
        budget.flush()
        budget.flush()  # nothing more to say
    assert events(logs)[-1] == ("rejected_suppressed", None, 5) and len(logs) == 3


def test_new_senders_past_the_limit_share_one_budget() -> None:
    """Keys cost memory: past `max_senders` at once, newcomers share one window until windows end."""
    clock = Clock()
    budget = LogBudget(log, per_window=2, max_senders=3, clock=clock)
    with capture_logs() as logs:
        for i in range(100):
            budget.warning("rejected", sender=f"forged-{i}", participant=f"forged-{i}")
        budget.flush()
    assert [e["event"] for e in logs].count("rejected") == 3 + 2  # three senders, then the shared two
    assert events(logs)[-1] == ("rejected_suppressed", OVERFLOW_SENDER, 95)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="per_window"):
        LogBudget(log, per_window=0)


async def test_a_coordinator_logs_a_flood_of_bad_messages_in_a_few_lines(tmp_path: Path) -> None:
    # 300 undecodable batches from one member's own login: every one is dead-lettered and counted, and
    # the log gets the budget's lines plus a count, not one line each.
    broker = MemoryBroker()
    coordinator = memory_coordinator(write_config(tmp_path, federation="flood"), broker)
    mallory = broker.connect("mallory")
    with capture_logs() as logs:
        await coordinator.start()
        await publish_join(mallory, "flood", "mallory", "scripted")
        await eventually(lambda: "mallory" in coordinator.active_members())
        for _ in range(300):
            await mallory.publish(
                UP_EXCHANGE, generation_key(0, "mallory"), b"\xc1", message_id=new_message_id()
            )
        await eventually(lambda: coordinator.counters.dead_lettered >= 300)
        await coordinator.stop_intake()
    rejected = [e for e in logs if e["event"] == "rejected"]
    assert coordinator.counters.dead_lettered == 300
    assert 1 <= len(rejected) <= 20, len(rejected)
