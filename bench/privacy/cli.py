"""Run (or resume) the privacy audit, then write privacy.json and privacy.md.

Each (seed, method) is saved when it finishes, under its fingerprint; a rerun skips what is done.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import machine, machine_line, write_results
from bench.privacy.audit import SeedPlan, measure, method_of, plan_seed, train_method
from bench.privacy.report import markdown, summarize
from bench.privacy.settings import Audit, AuditError, dp_epsilon, load_audit
from bench.quality.execute import release_memory
from bench.quality.grid import fingerprint
from bench.quality.scoring import Scorer
from common.settings import SettingsError
from federation.launch import quiet_library_progress_bars

AUDIT = Path(__file__).parent.parent / "privacy.toml"
RESULTS = Path(__file__).parent.parent / "results"
WORK = Path("results") / "privacy-audit"
NAME = "privacy"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.privacy", description=__doc__)
    parser.add_argument(
        "audit", type=Path, nargs="?", default=AUDIT, help="the audit file (bench/privacy.toml)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: one seed, one round, tiny sizes")
    parser.add_argument("--methods", help="comma-separated, a subset of the file's methods")
    parser.add_argument(
        "--seeds", help="comma-separated seed indices to run (default all); processes may split them"
    )
    parser.add_argument(
        "--out", type=Path, help=f"where privacy.json/.md go (default {RESULTS}; --quick: WORK/quick)"
    )
    parser.add_argument("--work", type=Path, default=WORK, help="run directories and per-run results")
    parser.add_argument("--report-only", action="store_true", help="write the report from stored results")
    args = parser.parse_args(argv)
    try:
        audit = load_audit(args.audit, quick=args.quick)
    except (AuditError, SettingsError) as e:
        print(f"python -m bench.privacy: error: {e}", file=sys.stderr)
        return 2
    methods = audit.settings.methods
    if args.methods:
        methods = [m for m in args.methods.split(",") if m]
        unknown = sorted(set(methods) - set(audit.settings.methods))
        if unknown:
            print(
                f"python -m bench.privacy: error: {unknown} not among {audit.settings.methods}",
                file=sys.stderr,
            )
            return 2
    seeds = list(range(audit.settings.seeds))
    if args.seeds:
        try:
            seeds = sorted({int(s) for s in args.seeds.split(",") if s})
        except ValueError:
            seeds = [-1]
        if not set(seeds) <= set(range(audit.settings.seeds)):
            print(
                f"python -m bench.privacy: error: --seeds {args.seeds!r}: the audit has seeds "
                f"0..{audit.settings.seeds - 1}",
                file=sys.stderr,
            )
            return 2
    work: Path = args.work / "quick" if args.quick else args.work
    out: Path = args.out or (work if args.quick else RESULTS)
    quiet_library_progress_bars()
    started = time.perf_counter()
    results = run_audit(audit, methods, work, seeds, run=not args.report_only)
    host = machine()
    summary = summarize(results, audit.settings.owner)
    report = {
        "audit": str(args.audit),
        "quick": args.quick,
        "machine": host,
        "seconds": round(time.perf_counter() - started, 1),
        "settings": json.loads(json.dumps(audit.settings, default=_plain)),
        **summary,
        "runs": results,
    }
    header = [
        "# Privacy audit" + (" (quick: sizes for a smoke run, numbers mean nothing)" if args.quick else ""),
        "",
        f"`python -m bench.privacy{' --quick' if args.quick else ''}` on {machine_line(host).rstrip('.')}; "
        f"task {audit.settings.task}, seeds {sorted({r['seed'] for r in results})}, canaries inserted "
        f"{audit.settings.canary_repeats} times into {audit.settings.owner}'s private data, secrets of "
        f"{audit.settings.secret_digits} digits (every one of the {10**audit.settings.secret_digits:,} "
        f"candidates scored); the owner under DP-SGD (delta {audit.settings.dp_delta:g}) in "
        + ", ".join(f"{m} at epsilon {eps:g}" for m in methods if (eps := dp_epsilon(m, audit.settings)))
        + ". Models that never saw a canary (local-only, the others' columns) show what its exposure is by "
        "chance. What each column means: docs/privacy.md.",
    ]
    write_results(NAME, report, "\n".join(markdown(summary, header)) + "\n", out)
    print(f"wrote {out / (NAME + '.json')} and {out / (NAME + '.md')}", flush=True)
    return 0


def run_audit(
    audit: Audit, methods: Sequence[str], work: Path, seeds: Sequence[int], *, run: bool = True
) -> list[dict[str, Any]]:
    """Every (seed, method): the stored result when its fingerprint matches, else trained and measured.

    With `run` false, or for a seed outside `seeds`, only stored results are read: another process may be
    running those seeds, and the report covers whatever has finished."""
    settings = audit.settings
    if audit.task.run.torch_threads:
        import torch

        torch.set_num_threads(audit.task.run.torch_threads)
    scorer = Scorer(None, audit.task.run.generation)
    results = []
    store = work / "runs"
    store.mkdir(parents=True, exist_ok=True)
    # What a run's result depends on: not which other methods or how many seeds the audit runs.
    identity = {
        k: v
        for k, v in json.loads(json.dumps(settings, default=_plain)).items()
        if k not in ("methods", "seeds")
    }
    keys = [(seed, method) for seed in range(settings.seeds) for method in methods]
    run_keys = {(seed, method) for seed in seeds for method in methods} if run else set()
    plans: dict[int, SeedPlan] = {}  # one per seed: planning a seed generates its task
    for index, (seed, method) in enumerate(keys, start=1):
        path = store / f"seed{seed}__{method}.json"
        if (seed, method) not in run_keys and not path.is_file():
            continue
        if seed not in plans:
            plans[seed] = plan_seed(settings, audit.task, seed, work, write=run and seed in seeds)
        plan = plans[seed]
        digest = fingerprint(
            method_of(plan, method, settings),
            {"audit": identity, "method": method},
        )
        stored = json.loads(path.read_text()) if path.is_file() else None
        if stored is not None and stored.get("fingerprint") == digest:
            results.append(stored)
            continue
        if (seed, method) not in run_keys:
            continue
        print(f"[{index}/{len(keys)}] seed {seed} {method} ...", flush=True)
        began = time.perf_counter()
        trained = train_method(plan, method, settings, say=lambda line: print(line, flush=True))
        result = measure(plan, method, trained, settings, scorer)
        del trained
        release_memory()  # each run loads and frees several models: hand the heap back
        result["fingerprint"] = digest
        result["seconds"] = round(time.perf_counter() - began, 1)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"[{index}/{len(keys)}] seed {seed} {method} done in {result['seconds']:.0f} s", flush=True)
        results.append(result)
    return results


def _plain(value: object) -> object:
    import msgspec

    return msgspec.to_builtins(value)
