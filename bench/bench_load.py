"""Load: N participant connections (each its own RabbitMQ user) publish concurrently to one node.

The coordinator runs as its own process (`chorus-coordinator run`), so its
resident memory is its own; the participants are light scripted clients in
this process, one robust AMQP connection each. Every round, all of them answer
every shard at once. Measured: generations confirmed per second, the time from
the last confirmed generation to the RoundClosed announcement (close latency),
round duration, and the coordinator's peak RSS. Checked: every participant got
every shard's pseudo-labels and every RoundClosed names all of them.

    python -m bench.bench_load [--participants 100] [--rounds 3]

writes bench/results/load.json and bench/results/load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import machine
from bench.fake_participant import ScriptedParticipant
from broker.amqp import AmqpTransport
from broker.cli import bring_up

RESULTS = Path(__file__).parent / "results"
FEDERATION = "load"
SHARDS = 4
PROMPTS_PER_ROUND = 8
PUBLISH_TIMEOUT = 60.0


def standard_answer(participant_id: str, prompt_id: str) -> str:
    """Every participant gives the same answer: consensus has nothing to weigh, the load is all there is."""
    return f"The answer to {prompt_id} is the standard one."


def load_participant(name: str, url: str) -> ScriptedParticipant:
    """A scripted participant with its own AMQP connection, publishing a round's shards all at once."""
    return ScriptedParticipant(
        name,
        AmqpTransport(url, connection_name=f"load {name}"),
        standard_answer,
        federation=FEDERATION,
        concurrent=True,
        model_id="load",
        prefetch=50,
        publish_timeout=PUBLISH_TIMEOUT,
    )


@dataclass
class LoadResult:
    participants: int
    rounds: int
    generations_confirmed: int
    generations_per_second: float  # per round: batches / (last confirm - round opened); mean over rounds
    round_seconds: list[float]  # RoundOpened.opened_unix -> RoundClosed.closed_unix
    close_latency_seconds: list[float]  # last confirmed generation -> RoundClosed received
    coordinator_peak_rss_mib: float
    lost_generations: int
    participants_missing_labels: int
    answered_per_round: list[int]
    seconds_total: float
    connect_seconds: float


def write_config(directory: Path, participants: int, rounds: int) -> Path:
    prompts = directory / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt_id": f"q{i}", "prompt": f"Question {i}?"}) for i in range(64)) + "\n"
    )
    config = directory / "coordinator.toml"
    config.write_text(
        f'federation = "{FEDERATION}"\nprompts_path = "prompts.jsonl"\nstate_path = "coordinator.sqlite3"\n'
        f"publish_timeout_seconds = {PUBLISH_TIMEOUT}\n"
        f"[round]\nrounds = {rounds}\nprompts_per_round = {PROMPTS_PER_ROUND}\nshards = {SHARDS}\n"
        f"quorum = {participants}\nmin_participants = {participants}\n"
        "deadline_seconds = 120.0\ngrace_seconds = 0.0\n"
        '[consensus]\nembedder = "hashing"\nmin_confidence = 0.3\n'
    )
    return config


def start_coordinator(config: Path, url: str, work_dir: Path) -> subprocess.Popen[bytes]:
    """`chorus-coordinator run` as its own process (its log in work_dir/coordinator.log)."""
    with open(work_dir / "coordinator.log", "wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "coordinator.cli",
                "--log-level",
                "warning",
                "run",
                "--config",
                str(config),
            ],
            env=os.environ | {"CHORUS_BROKER_URL": url},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def _rss_mib(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run_load(
    coordinator_url: str, participant_urls: dict[str, str], rounds: int, work_dir: Path
) -> LoadResult:
    """Run `rounds` rounds with a coordinator process and one connection per participant URL."""
    started = time.time()
    participants = [load_participant(name, url) for name, url in participant_urls.items()]
    config = write_config(work_dir, len(participants), rounds)
    coordinator = start_coordinator(config, coordinator_url, work_dir)
    peak = 0.0
    try:
        await asyncio.gather(*(p.transport.__aenter__() for p in participants))
        connect_seconds = time.time() - started
        await asyncio.sleep(2.0)  # the coordinator declares its queues and starts consuming
        await asyncio.gather(*(p.join() for p in participants))
        deadline = time.monotonic() + 120.0 * rounds
        while coordinator.poll() is None and time.monotonic() < deadline:
            peak = max(peak, _rss_mib(coordinator.pid))
            await asyncio.sleep(0.2)
        if coordinator.returncode != 0:
            raise RuntimeError(
                f"the coordinator exited with {coordinator.returncode}: "
                + (work_dir / "coordinator.log").read_text()[-2000:]
            )
        for _ in range(100):  # the last labels and announcements may still be in flight
            if all(len(p.closed_at) == rounds for p in participants):
                break
            await asyncio.sleep(0.1)
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
        coordinator.wait(10)
        await asyncio.gather(*(p.transport.close() for p in participants), return_exceptions=True)
    return _summarise(participants, rounds, peak, time.time() - started, connect_seconds)


def _summarise(
    participants: list[ScriptedParticipant], rounds: int, peak: float, total: float, connect: float
) -> LoadResult:
    per_second, round_seconds, latency, answered = [], [], [], []
    for round_id in range(1, rounds + 1):
        confirms = [t for p in participants for (r, _), t in p.confirmed_at.items() if r == round_id]
        closed_at = [p.closed_at[round_id] for p in participants if round_id in p.closed_at]
        summary = next((c for p in participants if (c := p.closing(round_id)) is not None), None)
        if not confirms or summary is None:
            continue
        per_second.append(len(confirms) / max(1e-6, max(confirms) - summary.opened_unix))
        round_seconds.append(summary.closed_unix - summary.opened_unix)
        latency.append(min(closed_at) - max(confirms))
        answered.append(len(summary.answered))
    confirmed = sum(len(p.confirmed_at) for p in participants)
    missing_labels = sum(
        1
        for p in participants
        for r in range(1, rounds + 1)
        if sum(1 for labelled_round, _ in p.labels if labelled_round == r) != SHARDS
    )
    return LoadResult(
        participants=len(participants),
        rounds=rounds,
        generations_confirmed=confirmed,
        generations_per_second=round(sum(per_second) / max(1, len(per_second)), 1),
        round_seconds=[round(s, 3) for s in round_seconds],
        close_latency_seconds=[round(s, 3) for s in latency],
        coordinator_peak_rss_mib=round(peak, 1),
        lost_generations=len(participants) * rounds * SHARDS - confirmed,
        participants_missing_labels=missing_labels,
        answered_per_round=answered,
        seconds_total=round(total, 1),
        connect_seconds=round(connect, 2),
    )


def render(result: LoadResult, host: dict[str, object]) -> str:
    lines = [
        "# Load: concurrent participant connections on one RabbitMQ node",
        "",
        f"Machine: {host['platform']}; {host['cpus']} × {host['cpu']}; {host['memory_mib']} MiB; "
        f"Python {host['python']}; RabbitMQ {host['rabbitmq']} (one local node).",
        "",
        f"{result.participants} participants, each its own user and AMQP connection, answer {SHARDS} shards "
        f"({PROMPTS_PER_ROUND} prompts) per round concurrently, {result.rounds} rounds; the coordinator runs "
        "as its own process (hashing embedder, HNSW consensus).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| generations confirmed | {result.generations_confirmed} (lost: {result.lost_generations}) |",
        f"| generations/s (publish + confirm, per round) | {result.generations_per_second} |",
        f"| round duration, open → close (s) | {', '.join(map(str, result.round_seconds))} |",
        f"| close latency, last confirm → RoundClosed (s) | "
        f"{', '.join(map(str, result.close_latency_seconds))} |",
        f"| coordinator peak RSS (MiB) | {result.coordinator_peak_rss_mib} |",
        f"| participants missing a shard's labels | {result.participants_missing_labels} |",
        f"| answered per round | {', '.join(map(str, result.answered_per_round))} |",
        f"| connecting {result.participants} clients (s) | {result.connect_seconds} |",
        "",
        "Regenerate: `python -m bench.bench_load` (about a minute).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--participants", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    names = [f"load{i:03d}" for i in range(args.participants)]
    with tempfile.TemporaryDirectory(prefix="chorus-load-") as tmp:
        node, _ = bring_up(Path(tmp) / "rabbitmq")
        try:
            urls = node.add_vhost("load", names)
            coordinator_url = urls.pop("coordinator")
            result = asyncio.run(run_load(coordinator_url, urls, args.rounds, Path(tmp)))
        finally:
            node.stop()
    host = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(
        json.dumps({"machine": host, "result": asdict(result)}, indent=2) + "\n"
    )
    (args.out / "load.md").write_text(render(result, host))
    print(render(result, host))
    ok = result.lost_generations == 0 and result.participants_missing_labels == 0
    return 0 if ok and result.answered_per_round == [args.participants] * args.rounds else 1


if __name__ == "__main__":
    raise SystemExit(main())
