"""`chorus-data`: check data files before a federation uses them.

    chorus-data check FILE... [--test FILE]... [--public FILE]... [--format F] [--model NAME]

FILE is private data (what a participant trains on), `--test` its test data, `--public` a public
prompt file. For each it prints the format found, a sample, counts, lengths (characters and words,
or tokens of `--model`), duplicates; then the prompts the files share. Exit 0 when every file reads
(warnings allowed unless --strict), 1 on an error, 2 on a bad command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

import msgspec
import structlog

from common.exits import EXIT_FAILED, EXIT_OK, run_command
from common.logs import configure_logging
from participant.data import DataFormat
from participant.settings import ParticipantSettings, TrainSettings

log = structlog.get_logger(__name__)


def _default_model() -> str:
    """The model a participant runs when its settings name none."""
    model = next(f for f in msgspec.structs.fields(ParticipantSettings) if f.name == "model")
    return str(model.default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chorus-data", description="Check a participant's data files before a federation uses them."
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check",
        help="format, sample, counts, lengths, duplicates, and overlap of private, test and public files",
    )
    check.add_argument("files", type=Path, nargs="+", metavar="FILE", help="private data files")
    check.add_argument("--test", type=Path, action="append", default=[], metavar="FILE", help="test data")
    check.add_argument(
        "--public", type=Path, action="append", default=[], metavar="FILE",
        help='public prompts (JSONL {"prompt_id", "prompt"}, as the coordinator reads them)',
    )  # fmt: skip
    check.add_argument(
        "--format", dest="data_format", default="auto", choices=get_args(DataFormat),
        help="the record format of FILE and --test files (default: found from each record's keys)",
    )  # fmt: skip
    check.add_argument(
        "--model",
        help="measure lengths in this model's tokens, chat template included: a participant `model` "
        f"(the built-in {_default_model()!r}, tiny-llama, tiny-gpt2, or a Hugging Face model directory); "
        "default: characters and words",
    )
    check.add_argument(
        "--max-length", type=int, default=TrainSettings().max_length,
        help="with --model: the [train] max_length to count cut examples against (default %(default)s)",
    )  # fmt: skip
    check.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    return run_command("chorus-data", lambda: _check(args))


def _check(args: argparse.Namespace) -> int:
    from federation.data_check import check

    lm = None
    if args.model:
        from participant.models import load_model

        log.info("loading_model", model=args.model)
        lm = load_model(args.model)
    report = check(
        args.files, args.test, args.public, data_format=args.data_format, lm=lm, max_length=args.max_length
    )
    for line in report.lines:
        print(line)
    print(f"errors: {report.errors}, warnings: {report.warnings}")
    if report.errors:
        print(
            f"chorus-data: error: {report.errors} problems make these files unusable (see above)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if args.strict and report.warnings:
        print(f"chorus-data: error: {report.warnings} warnings, and --strict", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
