"""What recording costs: recorder frames/s, and the coordinator's intake with and without a recorder.

Three measurements, each on realistic generation batches (`--answers` answers of `--chars`
characters, about 2 KB encoded by default):

1. `recorder`: `Recorder.record_received` alone, frames/s and MB/s, for each fsync policy.
2. `transport`: publish -> consume -> ack through the memory broker, plain vs `RecordingTransport`
   (the per-message path every coordinator delivery takes, with nothing else in it).
3. `coordinator`: the coordinator's intake of one round's batches on the memory transport (decode,
   identity checks, SQLite insert, ack), plain vs recording with the default settings
   (fsync "rotate"); consensus is excluded, it does not touch the recorder.

    .venv/bin/python -m bench.recorder_overhead [--messages N] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.memory import MemoryBroker
from broker.recorder import FsyncPolicy, Recorder, RecordingTransport
from broker.topology import (
    COORDINATOR_USER,
    UP_EXCHANGE,
    full_topology,
    generation_key,
    intake_queue,
    intake_topology,
)
from broker.transport import Delivery, Transport
from common.embedding import HashingEmbedder
from common.logs import configure_logging
from coordinator.prompts import PublicPrompt
from coordinator.replay.recording import recorded_settings
from coordinator.service import build_coordinator
from coordinator.settings import CoordinatorSettings, RoundSettings
from coordinator.store import CoordinatorStore
from schemas.codec import encode
from schemas.messages import Answer, GenerationBatch


def batch_body(participant: str, shard: int, round_id: int, answers: int, chars: int) -> bytes:
    batch = GenerationBatch(
        federation="bench",
        round_id=round_id,
        message_id=f"{participant}.{round_id}.{shard}",
        participant_id=participant,
        shard_id=shard,
        model_id="bench-model",
        answers=[
            Answer(prompt_id=f"p{shard}-{i}", text=("x" * chars), prompt_tokens=20, completion_tokens=40)
            for i in range(answers)
        ],
    )
    return encode(batch)


@dataclass(frozen=True)
class Timing:
    """Wall-clock and CPU seconds of one run. On a shared machine CPU time is the steadier figure."""

    wall: float
    cpu: float


class Stopwatch:
    def __init__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def stop(self) -> Timing:
        return Timing(time.perf_counter() - self._wall, time.process_time() - self._cpu)


def best_of(repeats: int, run: Callable[[], Timing]) -> Timing:
    runs = [run() for _ in range(repeats)]
    return Timing(min(r.wall for r in runs), min(r.cpu for r in runs))


def interleaved(
    repeats: int, plain: Callable[[], Timing], recorded: Callable[[], Timing]
) -> tuple[Timing, Timing]:
    """Best of `repeats` runs each, alternating, so that a busy moment hits both alike."""
    runs = [(plain(), recorded()) for _ in range(repeats)]
    return (
        Timing(min(p.wall for p, _ in runs), min(p.cpu for p, _ in runs)),
        Timing(min(r.wall for _, r in runs), min(r.cpu for _, r in runs)),
    )


# ---- 1. the recorder alone ------------------------------------------------------


def bench_recorder(messages: int, body: bytes, fsync: FsyncPolicy, repeats: int) -> dict[str, float]:
    delivery = Delivery(
        body=body,
        exchange=UP_EXCHANGE,
        routing_key="gen.0.alice",
        message_id="m",
        user_id="alice",
        redelivered=False,
        headers={},
    )
    count = messages if fsync != "always" else max(200, messages // 20)

    def run() -> Timing:
        with tempfile.TemporaryDirectory() as directory:
            recorder = Recorder(Path(directory), federation="bench", settings={}, fsync=fsync)
            with recorder:
                watch = Stopwatch()
                for _ in range(count):
                    recorder.record_received(delivery, received_unix=0.0, settle="ack")
                recorder.close()
                return watch.stop()

    timing = best_of(repeats, run)
    frame_bytes = (len(body) + 200) * count
    return {
        "frames_per_s": count / timing.wall,
        "us_per_frame": timing.wall / count * 1e6,
        "cpu_us_per_frame": timing.cpu / count * 1e6,
        "mb_per_s": frame_bytes / timing.wall / 1e6,
    }


# ---- 2. publish -> consume -> ack -------------------------------------------------


async def _pump(transport: Transport, publisher: Transport, bodies: list[bytes]) -> Timing:
    done = asyncio.Event()
    received = 0

    async def handler(delivery: Delivery) -> None:
        nonlocal received
        await delivery.ack()
        received += 1
        if received == len(bodies):
            done.set()

    subscription = await transport.consume(intake_queue("alice"), handler)
    watch = Stopwatch()
    for number, body in enumerate(bodies):
        await publisher.publish(UP_EXCHANGE, "gen.0.alice", body, message_id=str(number))
    await done.wait()
    timing = watch.stop()
    await subscription.cancel()
    return timing


def bench_transport(messages: int, body: bytes, record: bool) -> Timing:
    async def once() -> Timing:
        broker = MemoryBroker()
        broker.declare(full_topology(["alice"]).merged(intake_topology(["alice"])))
        with tempfile.TemporaryDirectory() as directory:
            inner = broker.connect(COORDINATOR_USER)
            transport: Transport = inner
            if record:
                transport = RecordingTransport(inner, Recorder(Path(directory), federation="b", settings={}))
            async with transport:
                return await _pump(transport, broker.connect("alice"), [body] * messages)

    return asyncio.run(once())


# ---- 3. coordinator intake ----------------------------------------------------------


def bench_coordinator(
    participants: int, shards: int, prompts: int, answers_chars: int, record: bool
) -> Timing:
    async def once() -> Timing:
        names = [f"p{i:03d}" for i in range(participants)]
        with tempfile.TemporaryDirectory() as directory:
            settings = CoordinatorSettings(
                federation="bench",
                prompts_path="unused",
                state_path=str(Path(directory) / "state.sqlite3"),
                round=RoundSettings(
                    rounds=1,
                    prompts_per_round=prompts,
                    shards=shards,
                    quorum=participants,
                    min_participants=participants,
                    deadline_seconds=600.0,
                ),
            )
            broker = MemoryBroker()
            broker.declare(full_topology(names))
            inner = broker.connect(COORDINATOR_USER)
            transport: Transport = inner
            if record:
                recorder = Recorder(
                    Path(directory) / "records", federation="bench", settings=recorded_settings(settings)
                )
                transport = RecordingTransport(inner, recorder)
            prompt_set = [PublicPrompt(f"q{i}", f"Question {i}?") for i in range(prompts)]
            async with transport:
                store = CoordinatorStore(settings.state_path)
                # Members before start(): it declares and consumes their intake queues.
                for name in names:
                    store.upsert_member(name, "m", True, time.time())
                coordinator = build_coordinator(
                    settings, transport, store=store, prompts=prompt_set, embedder=HashingEmbedder()
                )
                await coordinator.start()
                await coordinator._open_round()
                state = coordinator.round
                assert state is not None
                bodies = []
                for name in names:
                    for shard_id, shard in state.shards.items():
                        batch = GenerationBatch(
                            federation="bench",
                            round_id=state.round_id,
                            message_id=f"{name}.{shard_id}",
                            participant_id=name,
                            shard_id=shard_id,
                            model_id="m",
                            answers=[Answer(prompt_id=p, text="y" * answers_chars) for p in shard.prompt_ids],
                        )
                        bodies.append((name, shard_id, encode(batch)))
                publishers = {name: broker.connect(name) for name in names}
                watch = Stopwatch()
                for name, shard_id, body in bodies:
                    await publishers[name].publish(
                        UP_EXCHANGE, generation_key(shard_id, name), body, message_id=f"{name}.{shard_id}"
                    )
                while coordinator.counters.accepted < len(bodies):  # noqa: ASYNC110 - no event to await
                    await asyncio.sleep(0)
                timing = watch.stop()
                await coordinator.stop_intake()
                coordinator.store.close()
                return timing

    return asyncio.run(once())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--answers", type=int, default=8)
    parser.add_argument("--chars", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    configure_logging("warning")
    body = batch_body("alice", 0, 1, args.answers, args.chars)
    results: dict[str, Any] = {"body_bytes": len(body)}
    print(f"generation batch body: {len(body)} bytes")

    policies: tuple[FsyncPolicy, ...] = ("never", "rotate", "always")
    for fsync in policies:
        r = bench_recorder(args.messages, body, fsync, args.repeats)
        results[f"recorder_{fsync}"] = r
        print(
            f"recorder fsync={fsync:<6}: {r['frames_per_s']:>9.0f} frames/s  "
            f"{r['us_per_frame']:7.1f} us/frame (cpu {r['cpu_us_per_frame']:.1f} us)  "
            f"{r['mb_per_s']:6.1f} MB/s"
        )

    plain, recorded = interleaved(
        args.repeats,
        lambda: bench_transport(args.messages, body, False),
        lambda: bench_transport(args.messages, body, True),
    )
    results["transport"] = _overhead(args.messages, plain, recorded)
    _print("memory transport publish->ack", results["transport"])

    participants, shards, prompts = 50, 8, 64
    plain, recorded = interleaved(
        args.repeats,
        lambda: bench_coordinator(participants, shards, prompts, args.chars, False),
        lambda: bench_coordinator(participants, shards, prompts, args.chars, True),
    )
    results["coordinator"] = _overhead(participants * shards, plain, recorded)
    _print(f"coordinator intake ({participants} participants x {shards} shards)", results["coordinator"])
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _overhead(messages: int, plain: Timing, recorded: Timing) -> dict[str, float]:
    return {
        "plain_msgs_per_s": messages / plain.wall,
        "recorded_msgs_per_s": messages / recorded.wall,
        "wall_overhead_us_per_msg": (recorded.wall - plain.wall) / messages * 1e6,
        "wall_overhead_percent": (recorded.wall / plain.wall - 1) * 100,
        "plain_cpu_us_per_msg": plain.cpu / messages * 1e6,
        "recorded_cpu_us_per_msg": recorded.cpu / messages * 1e6,
        "cpu_overhead_percent": (recorded.cpu / plain.cpu - 1) * 100,
    }


def _print(name: str, r: dict[str, float]) -> None:
    print(
        f"{name}: plain {r['plain_msgs_per_s']:.0f} msg/s, recording {r['recorded_msgs_per_s']:.0f} msg/s "
        f"(wall {r['wall_overhead_us_per_msg']:+.1f} us/msg, {r['wall_overhead_percent']:+.1f}%); "
        f"cpu {r['plain_cpu_us_per_msg']:.1f} -> {r['recorded_cpu_us_per_msg']:.1f} us/msg "
        f"({r['cpu_overhead_percent']:+.1f}%)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
