"""Coordinator ingest through a real RabbitMQ node, side by side with a bare decode-and-ack consumer.

    .venv/bin/python -m bench.bench_ingest [--quick] [--profile]

Each repetition pre-fills the intake queues with the same kind of GenerationBatch messages (P participants,
each its own RabbitMQ user and intake queue, one batch per shard), then drains them with either
- the bare consumer: `AmqpTransport.consume` with a handler that only decodes
  (`schemas.codec.decode_generation`) and acks — the floor of the transport; or
- the coordinator: `Coordinator.start()` + `drive()` with HNSW consensus on (SQLite store with
  synchronous=FULL, identity checks, round engine), timed to the last ack (intake) and to the last
  shard's pseudo-labels published (end to end).
The two alternate (bare, coordinator, coordinator, bare, ...) so both see the same machine load. The
coordinator's embedder is its default, MiniLM on ONNX Runtime (`minilm-onnx`), behind a `CachedEmbedder`
warmed with the answer texts ("embeddings cached"); the embedding-bound repetitions start from a cold
cache, so they time MiniLM too.
Writes bench/results/ingest.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import machine, machine_line, table, write_results
from broker.amqp import AmqpSubscription, AmqpTransport
from broker.cli import bring_up
from broker.topology import UP_EXCHANGE, core_topology, generation_key, intake_queue, intake_topology
from broker.transport import DEFAULT_PREFETCH, Delivery, Handler
from common.embedding import CachedEmbedder, Embedder, HashingEmbedder
from common.embedding_onnx import OnnxEmbedder
from common.logs import configure_logging
from coordinator.consensus import ConsensusSettings, HnswConsensus
from coordinator.prompts import PublicPrompt
from coordinator.runtime import SWITCH_INTERVAL_SECONDS, prepare_service_process
from coordinator.service import Coordinator
from coordinator.settings import ConsensusSettingsTable, CoordinatorSettings, RoundSettings
from coordinator.store import CoordinatorStore
from coordinator.strategies import StrategyContext
from coordinator.strategies.semantic import SemanticStrategy
from schemas import Answer, GenerationBatch, decode_generation, encode, new_message_id

FEDERATION = "ingest"
VHOST = "ingest"
STANCES = [
    "The function returns {x} after checking its arguments and raises ValueError otherwise.",
    "It computes {x} and returns it; invalid input raises a ValueError.",
    "Returns {x}. Arguments are validated first, so bad input is rejected with an exception.",
    "This gives back {x}, but only for valid arguments; otherwise it fails.",
]


@dataclass
class Rep:
    """One drain. Times run from the first delivery handled; `setup_seconds` is what came before it
    (subscribing, and for the coordinator declaring the topology and restoring the round)."""

    kind: str  # bare | coordinator | coordinator-cold
    batches: int
    generations: int
    intake_seconds: float  # first delivery -> last ack
    end_to_end_seconds: float  # first delivery -> last shard's pseudo-labels published
    cpu_seconds: float  # this process (consumer + consensus threads), from the first delivery to the end
    setup_seconds: float  # start of the drain -> first delivery
    ack_frames: int = 0  # basic.ack frames the consumer wrote
    acked: int = 0  # deliveries they acked
    gc_pause_ms: float = 0.0  # the cyclic garbage collector's pauses, first delivery -> end

    @property
    def batches_per_second(self) -> float:
        return self.batches / self.intake_seconds


def answer_text(prompt_id: str, participant: int) -> str:
    index = int(prompt_id[1:])
    stance = STANCES[(participant + index) % 3 if participant % 5 else 3]
    return stance.format(x=f"the value of item {index}")


def build_batches(
    shards: Mapping[int, Sequence[str]], participants: Sequence[str], round_id: int
) -> list[tuple[str, int, bytes, str]]:
    """(participant, shard, body, message id) for every participant and shard."""
    out = []
    for number, name in enumerate(participants):
        for shard_id, prompt_ids in shards.items():
            batch = GenerationBatch(
                federation=FEDERATION,
                round_id=round_id,
                message_id=new_message_id(),
                participant_id=name,
                shard_id=shard_id,
                model_id="bench",
                answers=[Answer(prompt_id=p, text=answer_text(p, number)) for p in prompt_ids],
            )
            out.append((name, shard_id, encode(batch), batch.message_id))
    return out


async def prefill(
    publishers: dict[str, AmqpTransport], batches: Sequence[tuple[str, int, bytes, str]]
) -> None:
    gate = asyncio.Semaphore(64)

    async def one(name: str, shard_id: int, body: bytes, message_id: str) -> None:
        async with gate:
            await publishers[name].publish(
                UP_EXCHANGE, generation_key(shard_id, name), body, message_id=message_id, timeout=60.0
            )

    await asyncio.gather(*(one(*b) for b in batches))


async def wait_until_queued(transport: AmqpTransport, participants: Sequence[str], count: int) -> None:
    for _ in range(200):
        depth = 0
        for name in participants:
            depth += await transport.queue_depth(intake_queue(name))
        if depth >= count:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"only {depth} of {count} messages reached the intake queues")


def settings_for(args: argparse.Namespace, state_path: Path) -> CoordinatorSettings:
    return CoordinatorSettings(
        federation=FEDERATION,
        state_path=str(state_path),
        prompts_path="unused",
        prefetch=args.prefetch,
        round=RoundSettings(
            rounds=1,
            prompts_per_round=args.prompts,
            shards=args.shards,
            quorum=args.participants,
            min_participants=args.participants,
            deadline_seconds=600.0,
            grace_seconds=0.0,
        ),
        consensus=ConsensusSettingsTable(min_confidence=0.3),
    )


class Bench:
    def __init__(self, args: argparse.Namespace, urls: dict[str, str], work: Path) -> None:
        self.args = args
        self.coordinator_url = urls.pop("coordinator")
        self.participant_urls = urls
        self.names = sorted(urls)
        self.work = work
        self.prompts = [PublicPrompt(f"q{i}", f"What does item {i} return?") for i in range(args.prompts)]
        # MiniLM: the coordinator's default embedder, minilm-onnx.
        self.inner: Embedder = HashingEmbedder() if args.hashing else OnnxEmbedder()
        self.warm = CachedEmbedder(self.inner)
        self.publishers: dict[str, AmqpTransport] = {}
        self.reps: list[Rep] = []
        self.profile = cProfile.Profile() if args.profile else None
        self.count = 0

    async def __aenter__(self) -> Bench:
        self.publishers = {
            n: AmqpTransport(u, connection_name=f"bench {n}") for n, u in self.participant_urls.items()
        }
        await asyncio.gather(*(p.connect() for p in self.publishers.values()))
        # Intake queues are the coordinator's to declare (it does for its members as it starts); the bare
        # consumer needs them from its first repetition on.
        async with AmqpTransport(self.coordinator_url, connection_name="bench setup") as setup:
            await setup.declare(core_topology().merged(intake_topology(self.names)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(p.close() for p in self.publishers.values()), return_exceptions=True)

    def _new_coordinator(self, transport: AmqpTransport, embedder: Embedder) -> Coordinator:
        self.count += 1
        state = self.work / f"state{self.count}.sqlite3"
        store = CoordinatorStore(state)
        now = time.time()
        for name in self.names:
            store.upsert_member(name, "bench", True, now)
        settings = settings_for(self.args, state)
        strategy = SemanticStrategy(
            StrategyContext(settings, store, self.prompts),
            HnswConsensus(embedder, ConsensusSettings(min_confidence=0.3)),
        )
        return Coordinator(settings, transport, store, strategy)

    async def warm_cache(self) -> None:
        texts = sorted({answer_text(p.prompt_id, n) for p in self.prompts for n in range(len(self.names))})
        await asyncio.to_thread(self.warm.embed, texts)

    async def coordinator_rep(self, cold: bool) -> Rep:
        first = FirstDelivery()
        transport = FirstNotingTransport(
            self.coordinator_url,
            first,
            connection_name="bench coordinator",
            coalesce_acks=not self.args.ack_each,
        )
        await transport.connect()
        embedder = CachedEmbedder(self.inner) if cold else self.warm
        # Its members' queues exist already (reply queues from the vhost, intake queues from __aenter__);
        # start() takes their intake, below, once the round is pre-filled.
        coordinator = self._new_coordinator(transport, embedder)
        assert await coordinator._open_round()
        assert coordinator.round is not None
        shards = {s: t.prompt_ids for s, t in coordinator.round.shards.items()}
        batches = build_batches(shards, self.names, coordinator.round.round_id)
        await prefill(self.publishers, batches)
        await wait_until_queued(transport, self.names, len(batches))
        coordinator.round = None
        generations = sum(len(s) for s in shards.values()) * len(self.names)
        if self.profile is not None:
            self.profile.enable()
        started = time.perf_counter()
        await coordinator.start()  # restores the open round from the store, then consumes
        driver = asyncio.create_task(coordinator.drive())
        while coordinator.counters.accepted < len(batches) and not driver.done():  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        intake = time.perf_counter() - first.at
        await asyncio.wait_for(driver, 300.0)
        end = time.perf_counter() - first.at
        cpu = time.process_time() - first.cpu
        if self.profile is not None:
            self.profile.disable()
        await coordinator.stop_intake()
        stored = len(coordinator.store.batches(1))
        closed = coordinator.closed_rounds[-1]
        labelled = sum(o.labelled for o in closed.shards)
        coordinator.store.close()
        await transport.close()
        if stored != len(batches) or coordinator.counters.dead_lettered:
            raise RuntimeError(f"stored {stored} of {len(batches)}; counters {coordinator.counters}")
        if labelled == 0:
            raise RuntimeError("consensus labelled nothing")
        kind = "coordinator-cold" if cold else "coordinator"
        return Rep(
            kind,
            len(batches),
            generations,
            intake,
            end,
            cpu,
            first.at - started,
            transport.ack_frames,
            transport.acked,
            first.gc_ms_since(),
        )

    async def bare_rep(self) -> Rep:
        transport = AmqpTransport(
            self.coordinator_url, connection_name="bench bare", coalesce_acks=not self.args.ack_each
        )
        await transport.connect()
        shards = {
            s: [p.prompt_id for p in self.prompts[s :: self.args.shards]] for s in range(self.args.shards)
        }
        batches = build_batches(shards, self.names, 1)
        await prefill(self.publishers, batches)
        await wait_until_queued(transport, self.names, len(batches))
        done = asyncio.Event()
        seen = 0

        async def handler(delivery: Delivery) -> None:
            nonlocal seen
            decode_generation(delivery.body)
            await delivery.ack()
            seen += 1
            if seen == len(batches):
                done.set()

        first = FirstDelivery()
        started = time.perf_counter()
        # One consumer per participant's intake queue, subscribed concurrently, as Coordinator.start() does.
        subscriptions = await asyncio.gather(
            *(
                transport.consume(intake_queue(n), first.wrap(handler), prefetch=self.args.prefetch)
                for n in self.names
            )
        )
        await asyncio.wait_for(done.wait(), 300.0)
        elapsed = time.perf_counter() - first.at
        cpu = time.process_time() - first.cpu
        for subscription in subscriptions:
            await subscription.cancel()
        await transport.close()
        generations = sum(len(s) for s in shards.values()) * len(self.names)
        return Rep(
            "bare",
            len(batches),
            generations,
            elapsed,
            elapsed,
            cpu,
            first.at - started,
            transport.ack_frames,
            transport.acked,
            first.gc_ms_since(),
        )


class FirstNotingTransport(AmqpTransport):
    """An `AmqpTransport` whose consumers note the first delivery: times the coordinator from its first
    delivery without reaching into it."""

    def __init__(self, url: str, first: FirstDelivery, **options: Any) -> None:
        super().__init__(url, **options)
        self.first = first

    async def consume(
        self, queue: str, handler: Handler, *, prefetch: int = DEFAULT_PREFETCH
    ) -> AmqpSubscription:
        return await super().consume(queue, self.first.wrap(handler), prefetch=prefetch)


class GcPauses:
    """Adds up how long Python's cyclic garbage collector has paused the process (every generation)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0
        gc.callbacks.append(self._note)

    def _note(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started


PAUSES = GcPauses()


class FirstDelivery:
    """When (wall and CPU clock, collector pauses so far) the first delivery reached a wrapped handler."""

    def __init__(self) -> None:
        self.at = 0.0
        self.cpu = 0.0
        self.gc = 0.0

    def gc_ms_since(self) -> float:
        return round(1000 * (PAUSES.seconds - self.gc), 1)

    def wrap(self, handler: Callable[[Delivery], Awaitable[None]]) -> Callable[[Delivery], Awaitable[None]]:
        async def first_noted(delivery: Delivery) -> None:
            if not self.at:
                self.at, self.cpu, self.gc = time.perf_counter(), time.process_time(), PAUSES.seconds
            await handler(delivery)

        return first_noted


def report_rep(rep: Rep) -> None:
    print(
        f"{rep.kind:18s} {rep.batches_per_second:8.1f} batches/s, to labels {rep.end_to_end_seconds:.3f}s, "
        f"setup {rep.setup_seconds:.3f}s, CPU {rep.cpu_seconds:.3f}s, {rep.ack_frames} ack frames "
        f"for {rep.acked} deliveries, GC pauses {rep.gc_pause_ms:.0f} ms"
    )


async def run(args: argparse.Namespace, urls: dict[str, str], work: Path) -> list[Rep]:
    async with Bench(args, urls, work) as bench:
        await bench.warm_cache()
        # As chorus-coordinator does once it has started: the long-lived heap (torch, the model, aio-pika)
        # leaves the collector's reach, and a worker thread waits at most 0.5 ms for the GIL.
        frozen = prepare_service_process()
        print(f"froze {frozen} start-up objects; GIL switch interval {sys.getswitchinterval()} s")
        await bench.bare_rep()  # warm-up: connections, code paths, the broker's queues
        reps: list[Rep] = []
        for index in range(args.reps):
            order = ("bare", "coordinator") if index % 2 == 0 else ("coordinator", "bare")
            for kind in order:
                rep = await (bench.bare_rep() if kind == "bare" else bench.coordinator_rep(cold=False))
                report_rep(rep)
                reps.append(rep)
        for _ in range(args.cold_reps):
            for kind in ("bare", "cold"):
                rep = await (bench.bare_rep() if kind == "bare" else bench.coordinator_rep(cold=True))
                report_rep(rep)
                reps.append(rep)
        if bench.profile is not None:
            buffer = io.StringIO()
            for self_sort in ("cumulative", "tottime"):
                pstats.Stats(bench.profile, stream=buffer).sort_stats(self_sort).print_stats(40)
            (work.parent / "ingest_profile.txt").write_text(buffer.getvalue())
            print(buffer.getvalue()[:12000])
        return reps


def summarise(reps: Sequence[Rep]) -> dict[str, Any]:
    def median(kind: str, field: str) -> float:
        values = [
            getattr(r, field) if field != "bps" else r.batches_per_second for r in reps if r.kind == kind
        ]
        return statistics.median(values) if values else float("nan")

    out: dict[str, Any] = {}
    for kind in ("bare", "coordinator", "coordinator-cold"):
        matching = [r for r in reps if r.kind == kind]
        if not matching:
            continue
        batches, generations = matching[0].batches, matching[0].generations
        out[kind] = {
            "batches_per_second_intake": round(batches / median(kind, "intake_seconds"), 1),
            "generations_per_second_intake": round(generations / median(kind, "intake_seconds"), 1),
            "batches_per_second_end_to_end": round(batches / median(kind, "end_to_end_seconds"), 1),
            "generations_per_second_end_to_end": round(generations / median(kind, "end_to_end_seconds"), 1),
            "cpu_ms_per_batch": round(1000 * median(kind, "cpu_seconds") / batches, 3),
            "setup_ms": round(1000 * median(kind, "setup_seconds"), 1),
            "ack_frames": median(kind, "ack_frames"),
            "deliveries_per_ack_frame": round(
                median(kind, "acked") / max(1.0, median(kind, "ack_frames")), 1
            ),
            "gc_pause_ms": median(kind, "gc_pause_ms"),
        }
    # Ratios per adjacent pair (same load), then the median of those.
    pairs: list[tuple[Rep, Rep]] = []
    bare = [r for r in reps if r.kind == "bare"]
    warm = [r for r in reps if r.kind == "coordinator"]
    pairs = list(zip(bare, warm, strict=False))
    intake = [b.intake_seconds / c.intake_seconds for b, c in pairs]
    end = [b.intake_seconds / c.end_to_end_seconds for b, c in pairs]
    out["ratio_intake_vs_bare"] = round(statistics.median(intake), 3) if intake else None
    out["ratio_end_to_end_vs_bare"] = round(statistics.median(end), 3) if end else None
    out["ratio_intake_per_pair"] = [round(x, 3) for x in intake]
    out["ratio_end_to_end_per_pair"] = [round(x, 3) for x in end]
    cold = [r for r in reps if r.kind == "coordinator-cold"]
    cold_bare = bare[len(warm) :]
    if cold and cold_bare:
        out["ratio_cold_end_to_end_vs_bare"] = round(
            statistics.median(
                b.intake_seconds / c.end_to_end_seconds for b, c in zip(cold_bare, cold, strict=False)
            ),
            3,
        )
    return out


def render(summary: dict[str, Any], host: dict[str, Any], args: argparse.Namespace, embedder: str) -> str:
    rows = []
    for kind, label in (
        ("bare", "bare consumer (decode + ack)"),
        ("coordinator", "coordinator, embeddings cached"),
        ("coordinator-cold", f"coordinator, cold cache ({embedder}: embedding-bound)"),
    ):
        s = summary.get(kind)
        if s is None:
            continue
        rows.append(
            [
                label,
                s["batches_per_second_intake"],
                s["generations_per_second_intake"],
                s["batches_per_second_end_to_end"],
                s["generations_per_second_end_to_end"],
                s["cpu_ms_per_batch"],
                s["setup_ms"],
                s["ack_frames"],
                s["deliveries_per_ack_frame"],
                s["gc_pause_ms"],
            ]
        )
    met = (summary.get("ratio_end_to_end_vs_bare") or 0) >= 0.8
    lines = [
        "# Coordinator ingest vs a bare consumer (one RabbitMQ node)",
        "",
        machine_line(host),
        "",
        f"{args.participants} participants (each its own user) × {args.shards} shards = "
        f"{args.participants * args.shards} batches of {args.prompts // args.shards} answers per repetition, "
        f"pre-filled into quorum queues and drained with prefetch {args.prefetch}; {args.reps} alternating "
        "repetitions each, medians. End to end = to the last shard's pseudo-labels published "
        "(HNSW consensus) and the round closed.",
        "",
        "Before the first repetition the process is set up as `chorus-coordinator` sets itself up once it "
        "has started (`coordinator/runtime.py`): the start-up heap (the embedding runtime and model, "
        "aio-pika and their imports: about 190,000 objects here, 470,000 with torch) is frozen out of the "
        "garbage collector's reach, whose full "
        "collections had paused a drain for 0.1-0.3 s each, and the GIL switch interval is "
        f"{SWITCH_INTERVAL_SECONDS * 1000:g} ms instead of 5, so the intake commit's worker thread, which "
        "hands the GIL back at every SQLite call, no longer waits up to 5 ms each time to get it back "
        "(a commit of 50 batches took 140-220 ms). The GC pause column is what the collector still "
        "paused a drain (median).",
        "",
        f"Both consumers subscribe to the {args.participants} participants' intake queues concurrently "
        "(one consumer each), and both are timed from their "
        "first delivery: what comes before it (subscribing; for the coordinator also declaring the "
        "topology and restoring the open round from its store) is start-up, shown as setup and left out "
        "of both rates. Earlier versions of this bench subscribed the bare consumer one queue after "
        "another and timed both from before subscribing, so broker round trips, not ingest, were most "
        "of the bare consumer's time.",
        "",
        (
            "Acks: one `basic.ack` frame per delivery (`--ack-each`, as before acks were coalesced)."
            if args.ack_each
            else "Acks are coalesced by `AmqpTransport` for both consumers: the acks its handlers ask for in "
            "one event-loop turn go out as one `basic.ack(multiple=True)` up to the first unsettled tag of "
            "the channel (the coordinator acks a whole intake group at once, after its commit)."
        ),
        "",
        *table(
            [
                "consumer",
                "batches/s (intake)",
                "generations/s (intake)",
                "batches/s (to labels)",
                "generations/s (to labels)",
                "CPU ms/batch",
                "setup ms (excluded)",
                "ack frames",
                "deliveries/ack frame",
                "GC pause ms",
            ],
            rows,
        ),
        "",
        f"Ratio coordinator/bare, intake (last ack): **{summary['ratio_intake_vs_bare']}×** "
        f"(per pair {summary['ratio_intake_per_pair']}).",
        f"Ratio coordinator/bare, to pseudo-labels published: **{summary['ratio_end_to_end_vs_bare']}×** "
        f"(per pair {summary['ratio_end_to_end_per_pair']}); target ≥ 0.8×: {'met' if met else 'not met'}.",
    ]
    if "ratio_cold_end_to_end_vs_bare" in summary:
        lines.append(
            f"Cold cache (embedding-bound) ratio to labels: {summary['ratio_cold_end_to_end_vs_bare']}×."
        )
    lines += ["", "Regenerate: `.venv/bin/python -m bench.bench_ingest` (`--quick` for a smoke run)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--participants", type=int, default=40)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--prefetch", type=int, default=200)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--cold-reps", type=int, default=1)
    parser.add_argument("--hashing", action="store_true", help="HashingEmbedder instead of MiniLM")
    parser.add_argument("--profile", action="store_true", help="cProfile the coordinator repetitions")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--ack-each", action="store_true", help="one ack frame per delivery (acks not coalesced), to compare"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.participants, args.shards, args.prompts, args.reps = 10, 8, 80, 2
    configure_logging("warning")
    host = machine()
    names = [f"in{i:03d}" for i in range(args.participants)]
    with tempfile.TemporaryDirectory(prefix="chorus-ingest-") as tmp:
        node, _ = bring_up(Path(tmp) / "rabbitmq")
        try:
            urls = node.add_vhost(VHOST, names)
            work = Path(tmp) / "work"
            work.mkdir()
            reps = asyncio.run(run(args, urls, work))
            if args.profile:
                (Path("/tmp") / "ingest_profile.txt").write_text(
                    (Path(tmp) / "ingest_profile.txt").read_text()
                )
        finally:
            node.stop()
    embedder = "hashing" if args.hashing else "minilm-onnx, all-MiniLM-L6-v2 on ONNX Runtime"
    summary = summarise(reps)
    report = {
        "machine": host,
        "config": vars(args) | {"embedder": embedder},
        "summary": summary,
        "repetitions": [asdict(r) for r in reps],
    }
    markdown = render(summary, host, args, embedder)
    print(markdown)
    if not args.no_write:
        write_results("ingest", report, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
