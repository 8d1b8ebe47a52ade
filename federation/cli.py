"""`chorus-run`: run a whole federation in one process and report it.

    chorus-run CONFIG [--broker memory|local|amqp://...] [--results DIR] [--rounds N] [--compare local]
    chorus-run data --out DIR [--participants N] [--modules ...]   (the stdlib-docstring task)
    chorus-run init DIR [--sites N] [--model SPEC] [--embedder NAME]  (a federation to start from)

Log lines go to `<results>/run.log`; the terminal shows progress and a table per round.
Ctrl-C stops cleanly (the step in flight finishes) and still writes the results
of the rounds that finished; a second Ctrl-C aborts at once. A run in which no round produced labels
or an average exits 1 and says why.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from common.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, count_argument
from federation.config import load_run_config
from federation.launch import LOG_FILE, quiet_library_progress_bars, run_to_end
from federation.runner import RunOptions, check_options
from schemas.errors import ChorusError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chorus-run",
        description="Run a Chorus federation (coordinator + participants) in one process. "
        "`chorus-run data --out DIR ...` writes the stdlib-docstring task instead; `chorus-run init DIR` "
        "a federation to start from (settings for N sites, sample data, the commands to run it).",
    )
    parser.add_argument("config", type=Path, help="run config TOML (see examples/demo.toml)")
    parser.add_argument(
        "--broker",
        default="memory",
        help="memory (embedded, default), local (start a RabbitMQ node in RESULTS/rabbitmq), "
        "or the coordinator's amqp://USER:PASSWORD@HOST:PORT/VHOST",
    )
    parser.add_argument(
        "--broker-dir",
        type=Path,
        help="with --broker amqp://: the chorus-broker node dir to create participant users in",
    )
    parser.add_argument("--results", type=Path, help="results directory (default results/<config name>)")
    parser.add_argument("--rounds", type=count_argument, help="number of rounds (overrides the config)")
    parser.add_argument(
        "--compare",
        choices=["local"],
        help="local: after the run, train each trainable member's local-only twin (same warm-up, same "
        "private data) and report its scores beside the member's",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["data"]:
        from federation.stdlib_task import cli as task_cli

        return task_cli.main(args_list[1:])
    if args_list[:1] == ["init"]:
        from federation import scaffold

        return scaffold.main(args_list[1:])
    args = build_parser().parse_args(args_list)
    results = args.results or Path("results") / args.config.stem
    options = RunOptions(
        results=results,
        broker=args.broker,
        rounds=args.rounds,
        broker_dir=args.broker_dir,
        compare=args.compare,
    )
    try:
        check_options(options)
        config = load_run_config(args.config)
    except ChorusError as e:
        print(f"chorus-run: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    quiet_library_progress_bars()
    finished = run_to_end(config, options, log_level=args.log_level)
    if finished.error is not None:
        print(f"chorus-run: error: {finished.error} (log: {results / LOG_FILE})", file=sys.stderr)
        return EXIT_USAGE if finished.config_fault else EXIT_FAILED
    unproductive = None if finished.run.interrupted else finished.reporter.unproductive()
    if unproductive is not None:
        print(f"chorus-run: error: {unproductive} (log: {results / LOG_FILE})", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_INTERRUPTED if finished.run.interrupted else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
