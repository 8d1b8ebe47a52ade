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
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import machine, machine_line, table, write_results
from bench.fake_participant import run_with_coordinator_process
from broker.amqp import AmqpTransport
from broker.cli import bring_up
from participant.testing import ScriptedParticipant

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
        '[recording]\ndirectory = "records"\n'  # beside this file, not in the caller's folder
    )
    return config


async def run_load(
    coordinator_url: str, participant_urls: dict[str, str], rounds: int, work_dir: Path
) -> LoadResult:
    """Run `rounds` rounds with a coordinator process and one connection per participant URL."""
    participants = [load_participant(name, url) for name, url in participant_urls.items()]
    config = write_config(work_dir, len(participants), rounds)
    run = await run_with_coordinator_process(
        config, coordinator_url, participants, rounds, work_dir, timeout=120.0 * rounds, startup_seconds=2.0
    )
    return _summarise(participants, rounds, run.peak_rss_mib, run.seconds, run.connect_seconds)


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


def render(result: LoadResult, host: Mapping[str, Any]) -> str:
    rows: list[list[object]] = [
        ["generations confirmed", f"{result.generations_confirmed} (lost: {result.lost_generations})"],
        ["generations/s (publish + confirm, per round)", result.generations_per_second],
        ["round duration, open → close (s)", ", ".join(map(str, result.round_seconds))],
        ["close latency, last confirm → RoundClosed (s)", ", ".join(map(str, result.close_latency_seconds))],
        ["coordinator peak RSS (MiB)", result.coordinator_peak_rss_mib],
        ["participants missing a shard's labels", result.participants_missing_labels],
        ["answered per round", ", ".join(map(str, result.answered_per_round))],
        [f"connecting {result.participants} clients (s)", result.connect_seconds],
    ]
    lines = [
        "# Load: concurrent participant connections on one RabbitMQ node",
        "",
        machine_line(host),
        "",
        f"{result.participants} participants, each its own user and AMQP connection, answer {SHARDS} shards "
        f"({PROMPTS_PER_ROUND} prompts) per round concurrently, {result.rounds} rounds, through one local "
        "RabbitMQ node; the coordinator runs as its own process (hashing embedder, HNSW consensus).",
        "",
        *table(["measure", "value"], rows),
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
    host = machine()
    names = [f"load{i:03d}" for i in range(args.participants)]
    with tempfile.TemporaryDirectory(prefix="chorus-load-") as tmp:
        node, _ = bring_up(Path(tmp) / "rabbitmq")
        try:
            urls = node.add_vhost("load", names)
            coordinator_url = urls.pop("coordinator")
            result = asyncio.run(run_load(coordinator_url, urls, args.rounds, Path(tmp)))
        finally:
            node.stop()
    markdown = render(result, host)
    print(markdown)
    write_results("load", {"machine": host, "result": asdict(result)}, markdown, args.out)
    ok = result.lost_generations == 0 and result.participants_missing_labels == 0
    return 0 if ok and result.answered_per_round == [args.participants] * args.rounds else 1


if __name__ == "__main__":
    raise SystemExit(main())
