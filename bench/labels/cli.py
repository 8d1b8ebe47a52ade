"""`python -m bench.labels record|score`: record a label corpus once, then score label rules on it."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.labels.corpus import CORPUS_DIR

GRID = Path(__file__).parent.parent / "quality_grid.toml"
RESULTS = Path(__file__).parent.parent / "results" / "labels"
WORK = Path("results") / "labels"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.labels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    record = commands.add_parser("record", help="members answer the public set; every signal saved")
    record.add_argument("--grid", type=Path, default=GRID, help="a bench/quality grid file")
    record.add_argument("--task", default="stdlib-a")
    record.add_argument("--seed", type=int, default=0)
    record.add_argument("--stages", nargs="+", default=["warmup", "round1"], choices=["warmup", "round1"])
    record.add_argument("--work", type=Path, default=WORK, help="checkpoints and finished steps (resumes)")
    score = commands.add_parser("score", help="replay label rules on recorded corpora")
    score.add_argument("corpora", nargs="*", type=Path, help=f"corpus files (default: all in {CORPUS_DIR})")
    score.add_argument("--rules", nargs="+", help="rule names (default: every shipped and candidate rule)")
    score.add_argument("--out", type=Path, default=RESULTS, help="where labels.json and labels.md go")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "record":
        from bench.labels.record import Recorder  # torch and the models: only to record

        corpus = CORPUS_DIR / f"{args.task}-{args.seed}.jsonl"
        work = args.work / f"{args.task}-{args.seed}"
        recorder = Recorder(args.grid, args.task, args.seed, work, corpus, say=lambda s: print(s, flush=True))
        recorder.run(tuple(args.stages))
        return 0
    from bench.labels.score import run_score

    return run_score(args.corpora or sorted(CORPUS_DIR.glob("*.jsonl")), args.rules, args.out)
