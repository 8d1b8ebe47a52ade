"""One figure per task: each method's difference to local-only and to FedAvg, with 95% intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.quality.grid import LABELS

PANELS = (("rouge_l", 100.0, "ΔROUGE-L (points)"), ("nll", 1.0, "ΔNLL (nats/token; lower is better)"))


def plot_task(task: str, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    rows = [(m, b, item) for m, against in summary["differences"].items() for b, item in against.items()]
    labels = [f"{LABELS[m]}\nvs {LABELS[b]}" for m, b, _ in rows]
    for axis, (metric, scale, title) in zip(axes, PANELS, strict=True):
        for y, (_, baseline, item) in enumerate(rows):
            ci = item[metric]
            mean, low, high = ci["mean"] * scale, ci["low"] * scale, ci["high"] * scale
            color = "tab:blue" if baseline == "local" else "tab:orange"
            axis.errorbar(mean, y, xerr=[[mean - low], [high - mean]], fmt="o", color=color, capsize=4)
        axis.axvline(0.0, color="gray", linewidth=1)
        axis.set_yticks(range(len(rows)), labels if axis is axes[0] else [""] * len(rows), fontsize="small")
        axis.invert_yaxis()
        axis.set(title=title, xlabel="method − baseline, 95% interval")
        axis.grid(axis="x", alpha=0.3)
    fig.suptitle(f"task {task}: differences to local-only (blue) and FedAvg (orange)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
