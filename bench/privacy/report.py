"""The audit's figures per method over seeds, as JSON and Markdown.

Intervals are the quality bench's two-level bootstrap (bench/quality/stats.py) over seeds and, within
a seed, over what varies there (the other members, the test prompts); quality is paired against
local-only on the same prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench.common import table
from bench.quality.stats import Interval, paired_differences, seed_bootstrap

Result = dict[str, Any]
BASELINE = "local"


def summarize(results: Sequence[Result], owner: str) -> dict[str, Any]:
    by_method: dict[str, list[Result]] = {}
    for result in sorted(results, key=lambda r: r["seed"]):
        if result.get("error") is None:
            by_method.setdefault(result["method"], []).append(result)
    methods = {}
    for method, runs in by_method.items():
        methods[method] = _method_summary(runs, owner, by_method.get(BASELINE, []))
    failed = [
        {"seed": r["seed"], "method": r["method"], "error": r["error"]} for r in results if r.get("error")
    ]
    return {"owner": owner, "methods": methods, "failed": failed}


def _method_summary(runs: list[Result], owner: str, baseline: list[Result]) -> dict[str, Any]:
    canaries = runs[0]["canaries"]
    exposure = {}
    for canary in canaries:
        cid = canary["canary_id"]
        exposure[f"x{canary['repeats']}"] = {
            "owner": _interval([[r["members"][owner]["canaries"][cid]["exposure"]] for r in runs]),
            "others": _interval([_others_exposure(r, owner, cid) for r in runs]),
        }

    def greedy_hits(who: Callable[[str], bool]) -> dict[str, int]:
        total = {"exact": 0, "partial": 0, "answers": 0}
        for r in runs:
            for pid, member in r["members"].items():
                if who(pid):
                    for row in member["canaries"].values():
                        total["exact"] += row["exact"]
                        total["partial"] += row["partial"]
                        total["answers"] += 1
        return total

    summary: dict[str, Any] = {
        "seeds": [r["seed"] for r in runs],
        "exposure": exposure,
        "greedy_hits": {
            "owner": greedy_hits(lambda pid: pid == owner),
            "others": greedy_hits(lambda pid: pid != owner),
        },
        "membership_auc": {
            "own_model": _interval(
                [[m["membership_auc"][pid] for pid, m in r["members"].items()] for r in runs]
            ),
            "others_models": _interval(
                [
                    [
                        auc
                        for pid, m in r["members"].items()
                        for other, auc in m["membership_auc"].items()
                        if other != pid
                    ]
                    for r in runs
                ]
            ),
            "lift": _interval([list(_membership_lift(r).values()) for r in runs]),
            "owner_lift": _interval([[_membership_lift(r)[owner]] for r in runs]),
        },
        "test_nll": _interval([_member_mean_nll(r) for r in runs]),
        "owner_test_nll": _interval([r["members"][owner]["test_nll"] for r in runs]),
        "bytes_per_run": float(np.mean([r["bytes_up"] + r["bytes_down"] for r in runs])),
    }
    paired = {r["seed"]: r for r in baseline}
    seeds = [r for r in runs if r["seed"] in paired]
    if seeds and runs[0]["method"] != BASELINE:
        differences = paired_differences(
            [_member_mean_nll(r) for r in seeds], [_member_mean_nll(paired[r["seed"]]) for r in seeds]
        )
        summary["test_nll_vs_local"] = seed_bootstrap(differences).as_dict()
    if seeds and runs[0]["method"] != BASELINE:
        # What the method adds over models that never saw the canary (local-only's other members), for
        # the same canary of the same seed: a secret's exposure by chance cancels out.
        summary["others_exposure_vs_local"] = {
            f"x{canary['repeats']}": _interval(
                [
                    [
                        float(np.mean(_others_exposure(r, owner, canary["canary_id"])))
                        - float(np.mean(_others_exposure(paired[r["seed"]], owner, canary["canary_id"])))
                    ]
                    for r in seeds
                ]
            )
            for canary in canaries
        }
    published = [r["published"] for r in runs if "published" in r]
    if published:
        summary["published"] = {
            key: {k: sum(p[key][k] for p in published) for k in ("exact", "partial")}
            for key in ("owner_answers", "labels")
        } | {
            "owner_canary_answers_blank": sum(p["owner_canary_answers_blank"] for p in published),
            "owner_canary_questions": len(published) * len(canaries),
            "labels_sent": sum(p["labels_sent"] for p in published),
        }
    return summary


def _others_exposure(result: Result, owner: str, canary_id: str) -> list[float]:
    """The canary's exposure under each member's model but its owner's."""
    return [m["canaries"][canary_id]["exposure"] for pid, m in result["members"].items() if pid != owner]


def _membership_lift(result: Result) -> dict[str, float]:
    """Per member whose data it is: the attack's AUC under its own model minus the mean under the
    others' models, on the same examples. The held-out examples need not match the private ones in
    difficulty, so models that never trained on them set the level, not 0.5."""
    members = result["members"]
    lifts = {}
    for pid, member in members.items():
        others = [m["membership_auc"][pid] for other, m in members.items() if other != pid]
        if others:
            lifts[pid] = member["membership_auc"][pid] - float(np.mean(others))
    return lifts


def _member_mean_nll(result: Result) -> list[float]:
    """Per test prompt, the members' mean NLL."""
    return [float(v) for v in np.mean([m["test_nll"] for m in result["members"].values()], axis=0)]


def _interval(per_seed: list[list[float]]) -> dict[str, float | int]:
    return seed_bootstrap(per_seed).as_dict()


def _shown(value: dict[str, float | int] | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    interval = Interval(
        float(value["mean"]), float(value["low"]), float(value["high"]), int(value["resamples"])
    )
    return f"{interval.mean:.{digits}f} [{interval.low:.{digits}f}, {interval.high:.{digits}f}]"


def markdown(summary: dict[str, Any], header: Sequence[str]) -> list[str]:
    methods = summary["methods"]
    owner = summary["owner"]
    lines = [*header, ""]
    if not methods:
        return [*lines, "No run finished."]
    repeats = list(next(iter(methods.values()))["exposure"])
    lines += [
        f"## Exposure (bits; the most is log2 of the candidates), {owner}'s canaries",
        "",
        f"Under {owner}'s own final model, and under the other members' (mean over them).",
        "",
    ]
    rows = []
    for method, m in methods.items():
        rows.append(
            [
                method,
                *(_shown(m["exposure"][r]["owner"]) for r in repeats),
                *(_shown(m["exposure"][r]["others"]) for r in repeats),
            ]
        )
    lines += table(["method", *(f"owner {r}" for r in repeats), *(f"others {r}" for r in repeats)], rows)
    paired = {
        method: m["others_exposure_vs_local"]
        for method, m in methods.items()
        if "others_exposure_vs_local" in m
    }
    if paired:
        lines += [
            "",
            "What each method passes to the other members: their exposure of the same canary minus "
            "local-only's (whose other members never saw it), per seed, then the interval over seeds.",
            "",
        ]
        lines += table(
            ["method", *(f"others {r}, over local-only" for r in repeats)],
            [[method, *(_shown(row[r]) for r in repeats)] for method, row in paired.items()],
        )
    lines += ["", "## Verbatim hits (exact / partial, over seeds and canaries)", ""]
    rows = []
    for method, m in methods.items():
        owner_greedy, others_greedy = m["greedy_hits"]["owner"], m["greedy_hits"]["others"]
        published = m.get("published")
        rows.append(
            [
                method,
                f"{owner_greedy['exact']} / {owner_greedy['partial']} of {owner_greedy['answers']}",
                f"{others_greedy['exact']} / {others_greedy['partial']} of {others_greedy['answers']}",
                "–"
                if published is None
                else f"{published['owner_answers']['exact']} / {published['owner_answers']['partial']}",
                "–"
                if published is None
                else f"{published['labels']['exact']} / {published['labels']['partial']} of "
                f"{published['labels_sent']}",
                "–"
                if published is None
                else f"{published['owner_canary_answers_blank']} of {published['owner_canary_questions']}",
            ]
        )
    lines += table(
        [
            "method",
            f"{owner}'s greedy answers",
            "others' greedy answers",
            f"{owner}'s published answers",
            "labels",
            "canary answers withheld",
        ],
        rows,
    )
    lines += ["", "## Membership inference (loss attack ROC AUC; 0.5 = nothing) and quality", ""]
    rows = []
    for method, m in methods.items():
        rows.append(
            [
                method,
                _shown(m["membership_auc"]["own_model"]),
                _shown(m["membership_auc"]["others_models"]),
                _shown(m["membership_auc"].get("lift")),
                _shown(m["membership_auc"].get("owner_lift")),
                _shown(m["test_nll"], 3),
                _shown(m.get("test_nll_vs_local"), 3),
                _shown(m["owner_test_nll"], 3),
                f"{m['bytes_per_run'] / 1e6:.2f}",
            ]
        )
    lines += table(
        [
            "method",
            "AUC, own model",
            "AUC, others' models",
            "own − others, same data",
            f"the same, {owner}'s data",
            "test NLL",
            "Δ NLL vs local",
            f"{owner}'s test NLL",
            "MB on the wire",
        ],
        rows,
    )
    if summary["failed"]:
        lines += [
            "",
            "Failed runs: "
            + "; ".join(f"seed {f['seed']} {f['method']}: {f['error']}" for f in summary["failed"]),
        ]
    return lines
