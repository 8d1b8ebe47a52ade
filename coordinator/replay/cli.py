"""`chorus-replay`: look into a coordinator's record log, re-run its consensus, or publish it again.

Exit status: 0 done; 1 done, but `--strict` found damage in the log (or frames skipped over the
frame limit) or `--check` found changed labels; 2 error (nothing usable, bad options, broker trouble).

Memory: the log is read a frame at a time (`coordinator.replay.log`); a replay's peak is about its
largest frame or two, plus a few hundred bytes per frame (bench/bench_replay_memory.py measures it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from broker.record_format import MAX_FRAME_BYTES
from common.logs import configure_logging
from coordinator.label_rules import LABEL_RULES
from coordinator.replay.consensus import ConsensusOverrides, replay_consensus, replay_settings
from coordinator.replay.label_sources import replay_label_quality
from coordinator.replay.log import RecordedLog, ReplayError, interpret, load_log
from coordinator.replay.publish import (
    DEFAULT_ROUND_TIMEOUT,
    amqp_connector,
    load_credentials,
    plan_republish,
    republish,
)
from coordinator.replay.references import load_references
from coordinator.replay.report import (
    consensus_text,
    damage_lines,
    inspect_text,
    label_quality_text,
    republish_text,
)
from schemas.errors import ChorusError
from schemas.ids import pseudo_labels_id

PROG = "chorus-replay"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect, re-run or re-publish a Chorus coordinator's record log."
    )
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="rounds, participants, late and rejected messages")
    _add_logs(inspect)

    consensus = commands.add_parser("consensus", help="re-run consensus offline and diff the labels")
    _add_logs(consensus)
    consensus.add_argument("--index", choices=["hnsw", "exact"])
    consensus.add_argument("--neighbours", type=int, metavar="K")
    consensus.add_argument("--min-confidence", type=float, metavar="X")
    consensus.add_argument("--min-answers", type=int, metavar="N")
    consensus.add_argument(
        "--quorum", type=_quorum, metavar="Q", help="a count (3) or fraction (0.6); re-decides answered sets"
    )
    consensus.add_argument("--embedder", metavar="minilm-onnx|minilm|hashing|DIR")
    consensus.add_argument(
        "--label-choice",
        choices=sorted(LABEL_RULES),
        help="the label rule to replay with (default: recorded)",
    )
    consensus.add_argument(
        "--write", type=Path, metavar="DIR", help="write recorded/ and replayed/ PseudoLabels bodies here"
    )
    consensus.add_argument("--check", action="store_true", help="exit 1 when any prompt's label changed")
    consensus.add_argument(
        "--references",
        type=Path,
        metavar="PATH",
        help="JSONL of {prompt_id, response} (a task's public_references.jsonl): adds a label-quality "
        "table per round, for the replayed and the recorded labels, with columns labelled, abstained, "
        "label (mean ROUGE-L F1 of the labels against the references), members' mean (of every "
        "member's answer: a random member's expected score), oracle (the best member's answer) and "
        "label > mean (labelled prompts whose label beat the members' mean); means over labelled prompts",
    )

    publish = commands.add_parser("publish", help="publish the participants' messages into a broker again")
    _add_logs(publish)
    publish.add_argument("--broker", required=True, help="amqp://HOST:PORT/VHOST, without a user")
    publish.add_argument(
        "--credentials",
        type=Path,
        help='JSON {"participant": "password"}: each message goes out as its sender\'s login',
    )
    publish.add_argument(
        "--speed", type=float, default=1.0, help="N times the recorded pace; 0 = as fast as possible"
    )
    publish.add_argument("--acked-only", action="store_true", help="skip messages the coordinator rejected")
    publish.add_argument(
        "--follow-rounds",
        action="store_true",
        help="hold each round's answers until the coordinator announces that round (reads one reply queue)",
    )
    publish.add_argument(
        "--round-timeout", type=float, default=DEFAULT_ROUND_TIMEOUT, help="seconds to wait for a round"
    )
    return parser


def _add_logs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logs", nargs="+", type=Path, metavar="LOG", help="record log files or folders")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when a log is truncated or corrupt, or frames were skipped",
    )
    parser.add_argument(
        "--max-frame-bytes",
        type=int,
        default=MAX_FRAME_BYTES,
        metavar="N",
        help=f"frames with a larger payload are checked and reported, not loaded (default {MAX_FRAME_BYTES})",
    )


def _quorum(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        log = load_log(args.logs, max_frame_bytes=args.max_frame_bytes)
        if args.command == "inspect":
            status = run_inspect(log)
        elif args.command == "consensus":
            status = run_consensus(log, args)
        else:
            status = run_publish(log, args)
    except ChorusError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if args.strict and (log.damage or log.skipped):
        print(
            f"{PROG}: {len(log.damage)} damaged files, {len(log.skipped)} skipped frames (--strict)",
            file=sys.stderr,
        )
        return 1
    return status


def run_inspect(log: RecordedLog) -> int:
    sys.stdout.write(inspect_text(log, interpret(log)))
    return 0


def _warn_damage(log: RecordedLog) -> None:
    for line in damage_lines(log):
        if line:
            print(f"{PROG}: {line.strip()}", file=sys.stderr)


def run_consensus(log: RecordedLog, args: argparse.Namespace) -> int:
    _warn_damage(log)
    if log.settings is None:
        raise ReplayError("the log's header has no settings this build can read; cannot replay consensus")
    overrides = ConsensusOverrides(
        index=args.index,
        neighbours=args.neighbours,
        min_confidence=args.min_confidence,
        min_answers=args.min_answers,
        embedder=args.embedder,
        quorum=args.quorum,
        label_choice=args.label_choice,
    )
    references = None if args.references is None else load_references(args.references)
    replay = replay_consensus(interpret(log), replay_settings(log.settings, overrides))
    sys.stdout.write(consensus_text(replay))
    if references is not None:
        sides = [("replayed labels", replay_label_quality(replay, references, "replayed"))]
        if any(shard.recorded is not None for shard in replay.shards):
            sides.append(("recorded labels", replay_label_quality(replay, references, "recorded")))
        sys.stdout.write(label_quality_text(sides))
    if args.write is not None:
        for side in ("recorded", "replayed"):
            (args.write / side).mkdir(parents=True, exist_ok=True)
        for shard in replay.shards:
            name = pseudo_labels_id(log.federation, shard.round_id, shard.shard_id) + ".msgpack"
            if shard.recorded is not None:
                (args.write / "recorded" / name).write_bytes(shard.recorded)
            if shard.replayed is not None:
                (args.write / "replayed" / name).write_bytes(shard.replayed)
    return 1 if args.check and replay.changes else 0


def run_publish(log: RecordedLog, args: argparse.Namespace) -> int:
    _warn_damage(log)
    plan = plan_republish(interpret(log), acked_only=args.acked_only)
    passwords = {} if args.credentials is None else load_credentials(args.credentials)
    connect = amqp_connector(args.broker, passwords, plan.users)
    report = asyncio.run(
        republish(
            plan,
            connect,
            speed=args.speed,
            follow_rounds=args.follow_rounds,
            round_timeout=args.round_timeout,
        )
    )
    sys.stdout.write(republish_text(plan, report))
    return 2 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
