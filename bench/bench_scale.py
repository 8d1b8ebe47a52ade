"""Scale: 200 simulated participants × 2,000 prompts per round through one RabbitMQ node.

    .venv/bin/python -m bench.bench_scale [--quick] [--participants 200] [--prompts 2000] [--rounds 1]

The coordinator runs as its own process (`python -m coordinator.cli run`, product defaults apart from the
embedder: the `hashing` embedder behind the default `CachedEmbedder`, HNSW consensus, recording on), so its
peak RSS is its own. Each participant is its own RabbitMQ user (created in one batch with
`LocalNode.add_vhost`) with its own AMQP connection, publishing generated text (no model): every prompt
has five answer variants (a shared core sentence and differing detail, one off-topic), so consensus has
real choices. Measured per shard: time from quorum (the last batch of the shard confirmed by the broker,
and, separately, received by the coordinator as it stored it) to the shard's pseudo-labels arriving at
the participants; coordinator peak RSS (VmHWM); messages lost = batches confirmed to the publishers but
not stored by the coordinator (counted in its SQLite store after it exits) or not named in RoundClosed.
Writes bench/results/scale.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import machine, machine_line, table, write_results
from bench.fake_participant import run_with_coordinator_process
from broker.amqp import AmqpTransport
from broker.cli import bring_up
from common.logs import configure_logging
from participant.testing import ScriptedParticipant

FEDERATION = "scale"
PUBLISH_TIMEOUT = 300.0
VARIANTS = [
    "{core} It checks its arguments first.",
    "{core} Invalid input raises ValueError.",
    "{core}",
    "In short: {core_lower}",
    "It writes a log line and returns None for prompt {n}.",  # off-topic
]


def answer(prompt_id: str, participant: int) -> str:
    n = int(prompt_id[1:])
    core = f"It returns the value of item {n} computed from its {n % 7 + 2} inputs."
    variant = VARIANTS[(participant * 7 + n) % len(VARIANTS)]
    return variant.format(core=core, core_lower=core[0].lower() + core[1:], n=n)


def write_config(directory: Path, args: argparse.Namespace) -> Path:
    prompts = directory / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps({"prompt_id": f"q{i}", "prompt": f"What does item {i} return?"})
            for i in range(args.prompts * args.rounds)
        )
        + "\n"
    )
    config = directory / "coordinator.toml"
    config.write_text(
        f'federation = "{FEDERATION}"\nprompts_path = "prompts.jsonl"\nstate_path = "coordinator.sqlite3"\n'
        f"publish_timeout_seconds = {PUBLISH_TIMEOUT}\n"
        f"[round]\nrounds = {args.rounds}\nprompts_per_round = {args.prompts}\nshards = {args.shards}\n"
        f"quorum = {args.participants}\nmin_participants = {args.participants}\n"
        "deadline_seconds = 1200.0\ngrace_seconds = 0.0\n"
        '[consensus]\nembedder = "hashing"\nmin_confidence = 0.3\n'
        '[recording]\ndirectory = "records"\n'
    )
    return config


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def run(args: argparse.Namespace, urls: dict[str, str], work: Path) -> dict[str, Any]:
    coordinator_url = urls.pop("coordinator")
    numbers = {name: i for i, name in enumerate(sorted(urls))}

    def text(participant_id: str, prompt_id: str) -> str:
        return answer(prompt_id, numbers[participant_id])

    participants = [
        ScriptedParticipant(
            name,
            AmqpTransport(urls[name], connection_name=f"scale {name}"),
            text,
            federation=FEDERATION,
            concurrent=True,
            model_id="scale",
            prefetch=50,
            publish_timeout=PUBLISH_TIMEOUT,
        )
        for name in sorted(urls)
    ]
    config = write_config(work, args)
    run = await run_with_coordinator_process(
        config, coordinator_url, participants, args.rounds, work, timeout=1500.0
    )
    state = work / "coordinator.sqlite3"
    return summarise(args, participants, state, run.peak_rss_mib, run.seconds, run.connect_seconds)


def summarise(
    args: argparse.Namespace,
    participants: list[ScriptedParticipant],
    state: Path,
    peak: float,
    total: float,
    connected: float,
) -> dict[str, Any]:
    db = sqlite3.connect(state)
    stored = {
        (r, s, p): t
        for r, s, p, t in db.execute("SELECT round_id, shard_id, participant_id, received_unix FROM batches")
    }
    db.close()
    confirmed_keys = {key for p in participants for key in p.confirmed}
    published = sum(p.published for p in participants)
    lost = len(confirmed_keys - set(stored))
    from_confirm, from_receipt = [], []
    for round_id in range(1, args.rounds + 1):
        for shard_id in range(args.shards):
            quorum_confirm = max(p.confirmed_at.get((round_id, shard_id), float("nan")) for p in participants)
            receipts = [t for (r, s, _), t in stored.items() if r == round_id and s == shard_id]
            labelled = [
                p.labelled_at[(round_id, shard_id)]
                for p in participants
                if (round_id, shard_id) in p.labelled_at
            ]
            if not labelled or not receipts:
                continue
            from_confirm.append(min(labelled) - quorum_confirm)
            from_receipt.append(min(labelled) - max(receipts))
    closed = [p.closing(r) for p in participants for r in range(1, args.rounds + 1)]
    not_named = sum(
        1
        for p in participants
        for r in range(1, args.rounds + 1)
        if (c := p.closing(r)) is None or p.participant_id not in c.answered
    )
    missing_labels = sum(
        1
        for p in participants
        for r in range(1, args.rounds + 1)
        for s in range(args.shards)
        if (r, s) not in p.labelled_at
    )
    summaries = [c for c in closed if c is not None]
    round_seconds = sorted({round(c.closed_unix - c.opened_unix, 2) for c in summaries})
    return {
        "participants": len(participants),
        "prompts_per_round": args.prompts,
        "shards": args.shards,
        "rounds": args.rounds,
        "batches_published": published,
        "batches_confirmed": len(confirmed_keys),
        "batches_stored": len(stored),
        "answers_stored": len(stored) * (args.prompts // args.shards),
        "messages_lost": lost + (published - len(confirmed_keys)),
        "publish_errors": sum(len(p.errors) for p in participants),
        "participants_not_named_in_round_closed": not_named,
        "shard_labels_missing_at_participants": missing_labels,
        "quorum_to_labels_seconds": {
            "from_broker_confirm": {
                "p50": round(statistics.median(from_confirm), 3),
                "p99": round(percentile(from_confirm, 99), 3),
                "max": round(max(from_confirm), 3),
            },
            "from_coordinator_receipt": {
                "p50": round(statistics.median(from_receipt), 3),
                "p99": round(percentile(from_receipt, 99), 3),
                "max": round(max(from_receipt), 3),
            },
        },
        "round_seconds": round_seconds,
        "consensus_seconds": [round(c.consensus_seconds, 2) for c in summaries[:: len(participants)]],
        "coordinator_peak_rss_mib": round(peak, 1),
        "connect_seconds": round(connected, 1),
        "total_seconds": round(total, 1),
    }


def render(result: dict[str, Any], host: dict[str, Any]) -> str:
    latency = result["quorum_to_labels_seconds"]
    rss_ok = result["coordinator_peak_rss_mib"] <= 1536
    lost_ok = result["messages_lost"] == 0 and result["participants_not_named_in_round_closed"] == 0
    rows = [
        ["participants (one user + connection each)", result["participants"]],
        ["prompts per round / shards", f"{result['prompts_per_round']} / {result['shards']}"],
        ["batches published / confirmed / stored", f"{result['batches_published']} / "
         f"{result['batches_confirmed']} / {result['batches_stored']}"],
        ["answers stored", result["answers_stored"]],
        ["quorum (last batch confirmed) → labels, p50 / p99 (s)",
         f"{latency['from_broker_confirm']['p50']} / {latency['from_broker_confirm']['p99']}"],
        ["quorum (last batch stored by coordinator) → labels, p50 / p99 (s)",
         f"{latency['from_coordinator_receipt']['p50']} / {latency['from_coordinator_receipt']['p99']}"],
        ["round open → closed (s)", ", ".join(map(str, result["round_seconds"]))],
        ["consensus seconds per round", ", ".join(map(str, result["consensus_seconds"]))],
        ["coordinator peak RSS (MiB), target ≤ 1536", f"{result['coordinator_peak_rss_mib']} "
         f"({'met' if rss_ok else 'not met'})"],
        ["messages lost, target 0", f"{result['messages_lost']} ({'met' if lost_ok else 'not met'})"],
        ["participants missing a shard's labels", result["shard_labels_missing_at_participants"]],
        ["connecting all clients (s) / whole run (s)",
         f"{result['connect_seconds']} / {result['total_seconds']}"],
    ]  # fmt: skip
    lines = [
        "# Scale: simulated participants × prompts per round on one RabbitMQ node",
        "",
        machine_line(host),
        "",
        "Coordinator as its own process (hashing embedder behind the default cache, HNSW consensus, "
        "recording on, SQLite synchronous=FULL); participants publish generated text, five variants per "
        "prompt.",
        "",
        *table(["measure", "value"], rows),
        "",
        "Regenerate: `.venv/bin/python -m bench.bench_scale` (`--quick` for a smoke run).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--participants", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.participants, args.prompts, args.shards = 20, 200, 4
    configure_logging("warning")
    host = machine()
    names = [f"sc{i:03d}" for i in range(args.participants)]
    with tempfile.TemporaryDirectory(prefix="chorus-scale-") as tmp:
        node, _ = bring_up(Path(tmp) / "rabbitmq")
        try:
            urls = node.add_vhost("scale", names)
            result = asyncio.run(run(args, urls, Path(tmp)))
        finally:
            node.stop()
    markdown = render(result, host)
    print(markdown)
    if not args.no_write:
        write_results("scale", {"machine": host, "config": vars(args), "result": result}, markdown)
    ok = result["messages_lost"] == 0 and result["participants_not_named_in_round_closed"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
