"""`chorus-run`: a whole federation in one process, its results directory, Ctrl-C, and config errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker.local_node import LocalNode
from broker.memory import MemoryBroker
from broker.topology import UP_EXCHANGE, control_key, full_topology
from coordinator.replay import cli as replay_cli
from federation import cli
from federation.config import RunConfigError, load_run_config
from federation.observe import ObservedTransport
from federation.report import Reporter
from federation.runner import FederationRun, RunOptions
from schemas.codec import encode
from schemas.messages import Heartbeat, Message, ParticipantReport

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny.toml"
PLOTS = ("scores.png", "bytes.png", "agreement.png")


pytestmark = pytest.mark.usefixtures("restore_logging")


def read_rounds(results: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (results / "rounds.jsonl").read_text().splitlines() if line]


def assert_results(results: Path, rounds: int) -> dict[str, object]:
    lines = read_rounds(results)
    assert [line["round_id"] for line in lines] == list(range(1, rounds + 1))
    summary = json.loads((results / "summary.json").read_text())
    assert summary["rounds_completed"] == rounds
    for plot in PLOTS:
        assert (results / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (results / "run.log").stat().st_size > 0  # log lines went to the file, not the table
    return dict(summary)


def test_tiny_federation_runs_on_the_memory_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    assert cli.main([str(TINY), "--results", str(results)]) == 0
    summary = assert_results(results, rounds=2)
    assert summary["interrupted"] is False and summary["error"] is None
    participants = summary["participants"]
    assert isinstance(participants, dict) and set(participants) == {"llama", "gpt2"}
    first = read_rounds(results)[0]
    rows = first["participants"]
    assert isinstance(rows, list)
    for row in rows:
        assert row["status"] == "answered"
        assert row["rouge_l"] is not None and row["bytes_up"] > 0 and row["bytes_down"] > 0
    assert (results / "data" / "public_prompts.jsonl").is_file()  # the task was generated at start
    out = capsys.readouterr().out
    assert "all rounds" in out and str(results / "scores.png") in out
    assert '"event"' not in out  # structlog lines are in run.log
    # the coordinator recorded the federation, and the log replays to the published labels
    logs = sorted((results / "records").glob("*.chorus-log"))
    assert logs
    assert replay_cli.main(["consensus", *map(str, logs), "--check"]) == 0


def test_sigint_mid_run_leaves_the_finished_rounds(tmp_path: Path) -> None:
    results = tmp_path / "results"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, "-m", "federation.cli", str(TINY), "--results", str(results), "--rounds", "50"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not ((results / "rounds.jsonl").is_file() and read_rounds(results)):
            assert process.poll() is None, process.communicate()[0].decode()
            assert time.monotonic() < deadline, "no round finished in time"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, output.decode()
    done = len(read_rounds(results))
    assert 1 <= done < 50
    summary = assert_results(results, rounds=done)
    assert summary["interrupted"] is True
    assert b"interrupted" in output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('federation = "x"\n', "participants"),
        ('[[participants]]\nid = "a"\nmodle = "tiny-gpt2"\n', "modle"),
        ('[task]\nfamilies = ["nope"]\n[[participants]]\nid = "a"\n', "unknown families"),
        ('[task]\n[[participants]]\nid = "a"\n[[participants]]\nid = "a"\n', "unique"),
        ('[[participants]]\nid = "a"\n', "without a [task] table"),
        ('[task]\n[coordinator.round]\nshards = 0\n[[participants]]\nid = "a"\n', "[coordinator]"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_config_errors_are_clear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    assert cli.main([str(config), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chorus-run: error:") and message in err


def test_a_renamed_coordinator_setting_still_loads_with_a_warning(tmp_path: Path) -> None:
    config = tmp_path / "old.toml"
    config.write_text(
        '[task]\n[coordinator.round]\nbench_after_missed_rounds = 5\n[[participants]]\nid = "a"\n'
    )
    with capture_logs() as logs:
        load_run_config(config)  # validated like chorus-coordinator's file, not refused as unknown
    renamed = [line["now"] for line in logs if line["event"] == "setting_renamed"]
    assert renamed == ["round.sideline_after_missed_rounds"]


def test_missing_config_and_bad_broker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([str(tmp_path / "absent.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main([str(TINY), "--results", str(tmp_path / "r"), "--broker", "kafka://x"]) == 2
    assert "--broker must be memory, local or amqp://" in capsys.readouterr().err


@pytest.mark.amqp
def test_tiny_federation_runs_over_rabbitmq(rabbit_node: LocalNode, tmp_path: Path) -> None:
    results = tmp_path / "results"
    argv = [str(TINY), "--results", str(results), "--broker", rabbit_node.coordinator_url]
    argv += ["--broker-dir", str(rabbit_node.data_dir), "--rounds", "1"]
    assert cli.main(argv) == 0
    summary = assert_results(results, rounds=1)
    assert str(summary["broker"]).startswith("RabbitMQ at amqp://coordinator:***@")


def test_warm_start_naming_an_unknown_participant_is_refused(tmp_path: Path) -> None:
    loaded = load_run_config(TINY)
    results = tmp_path / "r"
    options = RunOptions(results=results, warm_start={"nobody": tmp_path})
    run = FederationRun(loaded, options, Reporter(results, [p.id for p in loaded.run.participants]))
    with pytest.raises(RunConfigError, match=r"warm_start names participants not in .*\['nobody'\]"):
        asyncio.run(run.run())


async def test_the_report_sees_the_confirmed_messages_it_shows_and_no_others() -> None:
    broker = MemoryBroker()
    broker.declare(full_topology(["p0"]))
    seen: list[Message] = []
    report = ParticipantReport(
        federation="f", round_id=1, participant_id="p0", message_id="p0.r1.report", metrics={"rouge_l": 0.5}
    )
    beat = Heartbeat(federation="f", round_id=1, participant_id="p0", message_id="p0.beat", sent_unix=1.0)
    async with ObservedTransport(broker.connect("p0"), seen.append) as transport:
        for message in (beat, report):
            await transport.publish(
                UP_EXCHANGE, control_key("p0"), encode(message), message_id=message.message_id
            )
    assert seen == [report]


def test_a_members_own_train_keys_override_the_shared_ones_and_the_rest_is_shared(tmp_path: Path) -> None:
    loaded = load_run_config(TINY.parent / "heterogeneous.toml")
    train = {p.id: p.train for p in loaded.run.participants}
    shared = loaded.run.train
    assert all(t is not None for t in train.values())
    p00, p01, p02, p03 = (train[f"p0{i}"] for i in range(4))
    assert p00 is not None and (p00.method, p00.rank, p00.alpha) == ("lora", 4, 8)
    assert p01 is not None and (p01.rank, p01.target_modules) == (16, "all-linear")
    assert p02 is not None and (p02.method, p02.last_layers, p02.learning_rate) == ("last_layers", 2, 1e-4)
    assert p03 is not None and p03.method == "none"
    for member in (p00, p01, p02, p03):  # what a member does not set is the run's, not a default
        assert member is not None and member.warmup_epochs == shared.warmup_epochs == 3
        assert member.private_examples_per_round == shared.private_examples_per_round
    assert load_run_config(TINY.parent / "junk_member.toml").run.federation == "junk-member"
