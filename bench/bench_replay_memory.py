"""What `chorus-replay` holds in memory: peak RSS of `inspect` and `consensus` on real record logs.

Each log is written by the real `Recorder`: rounds of a semantic federation (a RoundOpened, one
generation batch per member and shard, about 2 KB each, a RoundClosed and the PseudoLabels of
every shard) and, with `--big-mb`, one received adapter upload of that size in round 1, the
largest body a coordinator accepts being 128 MiB. Every figure is the peak resident set of one
fresh `python -m coordinator.replay.cli` process (`os.wait4` of that child), so the interpreter
and its imports are counted too: `baseline` is the peak of `chorus-replay --help`.

    .venv/bin/python -m bench.bench_replay_memory [--rounds 10,100,400] [--big-mb 120] [--label after]

Results merge into bench/results/replay_memory.json under `--label` (so a run of the code before
a change and one after sit side by side) and bench/results/replay_memory.md is written from it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from broker.record_format import MAX_FRAME_BYTES
from broker.recorder import Recorder
from broker.topology import ANNOUNCE_EXCHANGE, DIRECT_EXCHANGE, UP_EXCHANGE, control_key, generation_key
from broker.transport import Delivery
from common.embedding import HashingEmbedder
from coordinator.labelling import pseudo_labels_message, shard_candidates
from coordinator.settings import ConsensusSettingsTable
from coordinator.wiring import build_consensus
from schemas.codec import encode
from schemas.messages import (
    AdapterUpdate,
    Answer,
    GenerationBatch,
    Prompt,
    PromptShard,
    RoundClosed,
    RoundOpened,
    ShardOutcome,
    Tensor,
)

RESULTS = Path(__file__).parent / "results"
MEMBERS = ["alice", "bob", "carol", "dave", "erin"]
SHARDS = 4
PROMPTS = 16  # per shard
MiB = 1024 * 1024


def settings(federation: str) -> dict[str, Any]:
    return {
        "federation": federation,
        "prompts_path": "prompts.jsonl",
        "round": {"quorum": len(MEMBERS), "min_participants": len(MEMBERS)},
        "consensus": {"embedder": "hashing", "index": "exact"},
    }


def _received(
    recorder: Recorder, routing_key: str, body: bytes, user: str, message_id: str, t: float
) -> None:
    delivery = Delivery(
        body=body,
        exchange=UP_EXCHANGE,
        routing_key=routing_key,
        message_id=message_id,
        user_id=user,
        redelivered=False,
    )
    recorder.record_received(delivery, received_unix=t, settle="ack")


def _published(recorder: Recorder, exchange: str, body: bytes, message_id: str, t: float) -> None:
    recorder.record_published(
        exchange, "all", body, message_id=message_id, user_id="coordinator", headers=None, published_unix=t
    )


def write_record(directory: Path, *, rounds: int, big_bytes: int) -> int:
    """A record log of `rounds` rounds; returns its size in bytes."""
    federation = "bench"
    strategy = build_consensus(ConsensusSettingsTable(embedder="hashing", index="exact"), HashingEmbedder())
    t = 1_700_000_000.0
    with Recorder(
        directory, federation=federation, settings=settings(federation), rotate_bytes=1 << 40, fsync="never"
    ) as recorder:
        for round_id in range(1, rounds + 1):
            shards = [
                PromptShard(
                    shard_id=s,
                    prompts=[
                        Prompt(prompt_id=f"r{round_id}s{s}p{i}", text=f"Question {i}?")
                        for i in range(PROMPTS)
                    ],
                )
                for s in range(SHARDS)
            ]
            opened = RoundOpened(
                federation=federation,
                round_id=round_id,
                message_id=f"open.{round_id}",
                participant_id="coordinator",
                shards=shards,
                expected=MEMBERS,
                quorum=len(MEMBERS),
                deadline_unix=t + 60,
                opened_unix=t,
            )
            _published(recorder, ANNOUNCE_EXCHANGE, encode(opened), opened.message_id, t)
            batches: dict[int, list[GenerationBatch]] = {s.shard_id: [] for s in shards}
            for number, member in enumerate(MEMBERS):
                for shard in shards:
                    t += 0.001
                    batch = GenerationBatch(
                        federation=federation,
                        round_id=round_id,
                        message_id=f"{member}.{round_id}.{shard.shard_id}",
                        participant_id=member,
                        shard_id=shard.shard_id,
                        model_id="bench-model",
                        answers=[
                            Answer(
                                prompt_id=p.prompt_id,
                                text=f"The answer to {p.prompt_id} is {number % 2} and some words " * 2,
                            )
                            for p in shard.prompts
                        ],
                    )
                    batches[shard.shard_id].append(batch)
                    key = generation_key(shard.shard_id, member)
                    _received(recorder, key, encode(batch), member, batch.message_id, t)
                if round_id == 1 and number == 0 and big_bytes:
                    adapter = AdapterUpdate(
                        federation=federation,
                        round_id=round_id,
                        message_id=f"{member}.adapter",
                        participant_id=member,
                        tensors=[
                            Tensor(
                                name="lora.A", dtype="float32", shape=[big_bytes // 4], data=bytes(big_bytes)
                            )
                        ],
                        num_samples=1,
                    )
                    _received(recorder, control_key(member), encode(adapter), member, adapter.message_id, t)
                    recorder.flush()
            t += 0.01
            outcomes = []
            for shard in shards:
                prompt_ids = [p.prompt_id for p in shard.prompts]
                result = strategy.decide(shard_candidates(prompt_ids, batches[shard.shard_id], [], 1.0))
                labels = pseudo_labels_message(federation, round_id, shard.shard_id, result)
                _published(recorder, DIRECT_EXCHANGE, encode(labels), labels.message_id, t)
                outcomes.append(
                    ShardOutcome(
                        shard_id=shard.shard_id,
                        status="labelled",
                        answered=MEMBERS,
                        labelled=len(labels.labels),
                        abstained=len(labels.abstained),
                    )
                )
            closed = RoundClosed(
                federation=federation,
                round_id=round_id,
                message_id=f"close.{round_id}",
                participant_id="coordinator",
                shards=outcomes,
                answered=MEMBERS,
                opened_unix=t - 1,
                closed_unix=t,
            )
            _published(recorder, ANNOUNCE_EXCHANGE, encode(closed), closed.message_id, t)
            recorder.flush()
        files = list(recorder.files)
    return sum(path.stat().st_size for path in files)


# Runs the command and prints its peak RSS in KiB. A child's ru_maxrss starts from the high-water mark
# of the process it was forked from (Linux keeps it across exec), so the replay is started by this
# small launcher, not by the benchmark that has just written a large record.
LAUNCHER = """
import resource, subprocess, sys
status = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, status)
"""


def peak_rss(args: list[str]) -> tuple[int, float, int]:
    """(peak RSS in bytes, wall seconds, exit status) of `python -m coordinator.replay.cli ARGS`."""
    started = time.perf_counter()
    command = [sys.executable, "-c", LAUNCHER, sys.executable, "-m", "coordinator.replay.cli", *args]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    kib, status = (int(word) for word in done.stdout.split())
    if status not in (0, 1):
        raise SystemExit(f"chorus-replay {' '.join(args)} failed ({status}):\n{done.stderr[-2000:]}")
    return kib * 1024, time.perf_counter() - started, status


def measure(rounds_list: list[int], big_mb: int) -> dict[str, Any]:
    rows = []
    baseline, _, _ = peak_rss(["--help"])
    for rounds in rounds_list:
        for big in sorted({0, big_mb * MiB}):
            with tempfile.TemporaryDirectory() as tmp:
                directory = Path(tmp) / "records"
                size = write_record(directory, rounds=rounds, big_bytes=big)
                frames = rounds * (2 + SHARDS + len(MEMBERS) * SHARDS) + (1 if big else 0)
                row: dict[str, Any] = {
                    "rounds": rounds,
                    "frames": frames,
                    "big_bytes": big,
                    "file_bytes": size,
                }
                for verb, extra in (("inspect", []), ("consensus", ["--embedder", "hashing"])):
                    rss, seconds, status = peak_rss([verb, str(directory), *extra])
                    row[verb] = {"peak_rss_bytes": rss, "seconds": round(seconds, 2), "exit": status}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {"baseline_rss_bytes": baseline, "max_frame_bytes": MAX_FRAME_BYTES, "rows": rows}


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# chorus-replay peak memory",
        "",
        "Peak RSS (MiB) of one `python -m coordinator.replay.cli VERB records/` process, from",
        "`.venv/bin/python -m bench.bench_replay_memory`. Each log: rounds of 5 members x 4 shards",
        "(one ~2 KB generation batch each, plus RoundOpened, PseudoLabels and RoundClosed); `big`: one",
        "received adapter upload of that size in round 1. `--help` alone is the interpreter's baseline.",
        "",
    ]
    for label, run in results.items():
        lines += [
            f"## {label}",
            "",
            f"`chorus-replay --help`: {run['baseline_rss_bytes'] / MiB:.0f} MiB",
            "",
            "| rounds | frames | big frame (MiB) | file (MiB) | inspect (MiB) | inspect s "
            "| consensus (MiB) | consensus s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in run["rows"]:
            lines.append(
                f"| {row['rounds']} | {row['frames']} | {row['big_bytes'] / MiB:.0f} "
                f"| {row['file_bytes'] / MiB:.1f} "
                f"| {row['inspect']['peak_rss_bytes'] / MiB:.0f} | {row['inspect']['seconds']} "
                f"| {row['consensus']['peak_rss_bytes'] / MiB:.0f} | {row['consensus']['seconds']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", default="10,100,400", help="comma-separated round counts")
    parser.add_argument("--big-mb", type=int, default=120, help="size of the one large body (0: none)")
    parser.add_argument("--label", default="current", help="key of this run in the results file")
    parser.add_argument("--json", type=Path, default=RESULTS / "replay_memory.json")
    args = parser.parse_args()
    results: dict[str, Any] = json.loads(args.json.read_text()) if args.json.exists() else {}
    results[args.label] = measure([int(n) for n in args.rounds.split(",")], args.big_mb)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
