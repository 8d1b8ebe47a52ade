"""The asynchronous ledger's event log (coordinator/flow_log.py): a restart rebuilds the same ledger."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.flow_log import FlowLogError, LoggedFlow
from coordinator.prompt_flow import FlowSettings, ReadyPrompt

SETTINGS = FlowSettings(credit=2, answers_per_label=2, min_answers=1, label_batch=2, offer_seconds=3.0)


def drive(flow: LoggedFlow, steps: range) -> list[ReadyPrompt]:
    """Members a, b and c answer what they are offered; c answers nothing after step 2."""
    batches: list[ReadyPrompt] = []
    for step in steps:
        now = float(step)
        flow.expire(now)
        for member in "abc":
            for prompt in flow.offer(member, now):
                if member != "c" or step < 2:
                    flow.receive(member, prompt, f"{member} on {prompt}", flow.flow.batches, now)
        batches += flow.take_batch()
    return batches


def start(path: Path) -> LoggedFlow:
    flow = LoggedFlow(path, SETTINGS)
    flow.add_prompts(f"q{i}" for i in range(10))
    for member in "abc":
        flow.join(member)
    return flow


def test_a_ledger_reopened_mid_stream_goes_on_as_if_never_stopped(tmp_path: Path) -> None:
    straight = start(tmp_path / "straight.sqlite3")
    expected = drive(straight, range(12))
    straight.close()

    crashed = start(tmp_path / "crashed.sqlite3")
    first = drive(crashed, range(5))
    del crashed  # no close: the process died
    reopened = LoggedFlow(tmp_path / "crashed.sqlite3", SETTINGS)
    assert first + drive(reopened, range(5, 12)) == expected
    assert len(expected) >= 8  # the run labelled most prompts, so the comparison says something
    assert reopened.flow.credit("c") == 1  # c's unanswered offers cost it its credit, before and after


def test_a_refused_call_is_not_logged(tmp_path: Path) -> None:
    flow = start(tmp_path / "state.sqlite3")
    with pytest.raises(ValueError, match="added before"):
        flow.add_prompts(["q1", "new"])
    with pytest.raises(KeyError):
        flow.offer("stranger", 0.0)
    flow.close()
    reopened = LoggedFlow(tmp_path / "state.sqlite3", SETTINGS)
    assert reopened.flow.pending() == [f"q{i}" for i in range(10)]


def test_other_settings_are_refused_on_reopening(tmp_path: Path) -> None:
    start(tmp_path / "state.sqlite3").close()
    with pytest.raises(FlowLogError, match="other flow settings"):
        LoggedFlow(tmp_path / "state.sqlite3", FlowSettings())
