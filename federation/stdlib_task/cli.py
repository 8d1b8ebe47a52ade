"""`chorus-run data`: write the stdlib-docstring task into a folder and print its summary."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from federation.stdlib_task import TaskError
from federation.stdlib_task.files import format_summary, write_task
from federation.stdlib_task.split import build_task, parse_modules


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chorus-run data", description="Write the stdlib-docstring task into a folder."
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--participants", type=int, default=4)
    parser.add_argument("--modules", help="comma-separated modules, each optionally 'module:family'")
    parser.add_argument("--split", choices=["family", "dirichlet"], default="family")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--public-fraction", type=float, default=0.3)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--home-share", type=float, default=0.8)
    args = parser.parse_args(argv)
    modules, families = parse_modules(args.modules) if args.modules else (None, None)
    try:
        task = build_task(
            modules, families, args.participants, args.seed, args.public_fraction,
            args.test_fraction, args.split, args.alpha, args.home_share,
        )  # fmt: skip
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = write_task(task, args.out)
    print(format_summary(task))
    print(f"\nwrote {path.parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
