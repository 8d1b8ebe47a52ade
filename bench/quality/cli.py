"""The command line: run (or resume) the grid, then write quality.json, quality.md and a plot per task."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import machine
from bench.quality.execute import GridRunner
from bench.quality.grid import METHODS, GridError, load_grid
from bench.quality.markdown import render
from bench.quality.plots import plot_task
from bench.quality.report import junk_summary, members_beside_local, refusal_summary, summarise
from bench.quality.results import ResultStore
from bench.quality.scoring import Scorer
from common.settings import SettingsError
from coordinator.settings import ConsensusSettingsTable
from coordinator.wiring import build_embedder
from federation.launch import quiet_library_progress_bars

GRID = Path(__file__).parent.parent / "quality_grid.toml"
RESULTS = Path(__file__).parent.parent / "results"
WORK = Path("results") / "quality-grid"
NAME = "quality"


def _list(text: str | None) -> list[str] | None:
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    parser.add_argument(
        "grid",
        type=Path,
        nargs="?",
        default=GRID,
        help="the grid file (tasks, seeds, methods), or one chorus-run config (a grid of that task)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: one task, one seed, tiny sizes")
    parser.add_argument("--tasks", help="comma-separated task names (default: the grid's)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the grid's)")
    parser.add_argument("--methods", help=f"comma-separated from {','.join(METHODS)}")
    parser.add_argument(
        "--device", help='where the models run: "cpu" (the configs\' default), "cuda", "cuda:N" or "auto"'
    )
    parser.add_argument("--no-junk-member", action="store_true", help="leave out the junk-member run")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"where quality.json/.md/_<task>.png go (default {RESULTS}; --quick: WORK/quick)",
    )
    parser.add_argument("--work", type=Path, default=WORK, help="run directories and per-run results")
    parser.add_argument("--report-only", action="store_true", help="write the report from stored results")
    args = parser.parse_args(argv)
    seeds = _list(args.seeds)
    try:
        grid = load_grid(
            args.grid,
            quick=args.quick,
            tasks=_list(args.tasks),
            seeds=[int(s) for s in seeds] if seeds else None,
            methods=_list(args.methods),
            junk_member=not args.no_junk_member and not args.quick,
            device=args.device,
        )
    except (GridError, SettingsError) as e:  # RunConfigError is a SettingsError
        print(f"python -m bench.quality: error: {e}", file=sys.stderr)
        return 2
    work = args.work / "quick" if args.quick else args.work
    out: Path = args.out or (work if args.quick else RESULTS)  # a smoke run never replaces the real report
    store = ResultStore(work / "runs")
    quiet_library_progress_bars()
    started = time.perf_counter()
    host = machine()
    first = next(iter(grid.tasks.values()))
    if grid.shipped_problem:
        print(f"shipped recipe skipped: {grid.shipped_problem}", flush=True)
    if first.run.torch_threads:  # chorus-run sets it for its runs; the plain loops and scoring need it too
        import torch

        torch.set_num_threads(first.run.torch_threads)
    embedder = build_embedder(ConsensusSettingsTable(embedder=first.run.embedder))
    scorer = Scorer(embedder.embed, first.run.generation)
    runner = GridRunner(grid, work, store, scorer, say=lambda line: print(line, flush=True))
    if args.report_only:
        wanted = {(k.name, runner.fingerprint(k)) for k in grid.runs()}
        results = [r for r in store.all() if (f"{r.task}__seed{r.seed}__{r.method}", r.fingerprint) in wanted]
    else:
        results = runner.run_all()
    tasks = summarise(
        [r for r in results if r.method not in ("junk_member", "fedavg_refusal")], grid.bootstrap_resamples
    )
    report = {
        "grid": str(args.grid),
        "quick": grid.quick,
        "seeds": grid.seeds,
        "methods": grid.methods,
        "resamples": grid.bootstrap_resamples,
        "shipped": {"train": grid.shipped.train, "consensus": grid.shipped.consensus},
        "shipped_problem": grid.shipped_problem,
        "machine": host,
        "tasks": tasks,
        "junk_member": junk_summary(results),
        "members": members_beside_local(results) if grid.per_member else [],
        "fedavg_refusal": refusal_summary(results),
        "failed_runs": [f"{r.task}__seed{r.seed}__{r.method}: {r.error}" for r in store.all() if r.error],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{NAME}.md").write_text(render(report))
    for task, summary in tasks.items():
        if summary["differences"]:
            plot_task(task, summary, out / f"{NAME}_{task}.png")
    print((out / f"{NAME}.md").read_text(), flush=True)
    return 1 if report["failed_runs"] else 0
