"""`chorus-run`: run a whole federation in one process and report it.

    chorus-run CONFIG [--broker memory|local|amqp://...] [--results DIR] [--rounds N]
    chorus-run data --out DIR [--participants N] [--modules ...]   (the stdlib-docstring task)

Log lines go to `<results>/run.log`; the terminal shows progress and a table per round.
Ctrl-C stops cleanly (the step in flight finishes) and still writes the results
of the rounds that finished; a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from common.logs import configure_logging
from federation.config import RunConfigError, load_run_config
from federation.report import Reporter
from federation.runner import FederationRun, RunOptions, check_options
from schemas.errors import ChorusError

LOG_FILE = "run.log"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chorus-run",
        description="Run a Chorus federation (coordinator + participants) in one process. "
        "`chorus-run data --out DIR ...` writes the stdlib-docstring task instead.",
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
    parser.add_argument("--rounds", type=int, help="number of rounds (overrides the config)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["data"]:
        from federation.stdlib_task import cli as task_cli

        return task_cli.main(args_list[1:])
    args = build_parser().parse_args(args_list)
    results = args.results or Path("results") / args.config.stem
    options = RunOptions(results=results, broker=args.broker, rounds=args.rounds, broker_dir=args.broker_dir)
    try:
        check_options(options)
        config = load_run_config(args.config)
    except ChorusError as e:
        print(f"chorus-run: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    results.mkdir(parents=True, exist_ok=True)
    _quiet_library_progress_bars()
    with (results / LOG_FILE).open("w", encoding="utf-8", buffering=1) as log_file:
        configure_logging(args.log_level, json=True, file=log_file, capture_stdlib=True)
        reporter = Reporter(results.resolve(), [p.id for p in config.run.participants])
        run = FederationRun(config, options, reporter)
        error: str | None = None
        exit_code = EXIT_FAILED
        try:
            asyncio.run(_run_with_signals(run))
        except RunConfigError as e:  # found while preparing the run (data, brokers): the config's fault
            error, exit_code = str(e), EXIT_USAGE
        except ChorusError as e:
            error = str(e)
        except (KeyboardInterrupt, asyncio.CancelledError):
            run.interrupted = True
        finally:
            reporter.finish(
                rounds_wanted=run.rounds,
                interrupted=run.interrupted,
                error=error,
                extra={"federation": config.run.federation, "config": str(config.path), "log": LOG_FILE},
            )
    if error is not None:
        print(f"chorus-run: error: {error} (log: {results / LOG_FILE})", file=sys.stderr)
        return exit_code
    return EXIT_INTERRUPTED if run.interrupted else 0


async def _run_with_signals(run: FederationRun) -> None:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    presses = 0

    def on_signal() -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            run.request_stop()
        else:
            main_task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    try:
        await run.run()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _quiet_library_progress_bars() -> None:
    """transformers' and the hub's tqdm bars ("Loading weights") would tear through the table."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    transformers_logging.set_verbosity_error()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    sys.exit(main())
