"""The run's plots: scores, bytes and agreement per round and participant (matplotlib, Agg).

Scores start at round 0 (after warm-up, before any label) when the run evaluated it; a plot with
nothing to show (no round finished, nothing labelled) says so instead of showing empty axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from federation.records import RoundRecord, abstentions_text

PLOT_FILES = {"scores": "scores.png", "bytes": "bytes.png", "agreement": "agreement.png"}


def write_plots(
    records: Sequence[RoundRecord], results: Path, baseline: dict[str, dict[str, float]] | None = None
) -> dict[str, str]:
    """Three PNGs; with no finished round they say so instead of being blank. `baseline`: participant
    -> its round-0 scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = [r.participant_id for r in records[0].participants] if records else []
    rounds = [r.round_id for r in records]

    def series(attr: str, pid: str) -> list[float]:
        values = []
        for record in records:
            row = next(r for r in record.participants if r.participant_id == pid)
            value = getattr(row, attr)
            values.append(float("nan") if value is None else float(value))
        return values

    def lines_per_participant(ax: Any, attr: str, from_baseline: bool = False) -> None:
        for pid in ids:
            start = (baseline or {}).get(pid, {}).get(attr) if from_baseline else None
            if start is None:
                ax.plot(rounds, series(attr, pid), marker="o", label=pid)
            else:
                ax.plot([0, *rounds], [float(start), *series(attr, pid)], marker="o", label=pid)

    def say(ax: Any, text: str) -> None:
        ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)

    def finish(
        ax: Any,
        title: str,
        ylabel: str,
        grid: str = "both",
        legend: dict[str, Any] | None = None,
        ticks: Sequence[int] = rounds,
    ) -> None:
        ax.set(title=title, xlabel="round", ylabel=ylabel)
        ax.set_xticks(list(ticks))
        ax.grid(axis=grid, alpha=0.3)
        if ids:
            ax.legend(**(legend or {}))
        else:
            say(ax, "no round finished")

    def save(fig: Any, name: str) -> None:
        fig.savefig(results / PLOT_FILES[name], dpi=110)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, attr, label in zip(
        axes, ("rouge_l", "embedding_similarity"), ("ROUGE-L", "embedding similarity"), strict=True
    ):
        lines_per_participant(ax, attr, from_baseline=True)
        finish(
            ax,
            f"test {label} per round (0: after warm-up)",
            label,
            ticks=[0, *rounds] if baseline else rounds,
        )
    save(fig, "scores")

    fig, ax = plt.subplots(figsize=(8, 4.8), constrained_layout=True)
    width = 0.8 / max(1, 2 * len(ids))
    for i, pid in enumerate(ids):
        up = [v / 1024 for v in series("bytes_up", pid)]
        down = [v / 1024 for v in series("bytes_down", pid)]
        ax.bar([r + (2 * i) * width - 0.4 for r in rounds], up, width, label=f"{pid} up", align="edge")
        ax.bar(
            [r + (2 * i + 1) * width - 0.4 for r in rounds],
            down,
            width,
            label=f"{pid} down",
            align="edge",
            hatch="//",
        )
    # The legend goes below the axes: bars reach the top.
    below: dict[str, Any] = {
        "ncols": max(1, len(ids)),
        "fontsize": "small",
        "loc": "upper center",
        "bbox_to_anchor": (0.5, -0.15),
    }
    finish(ax, "bytes per round per participant", "KiB", grid="y", legend=below)
    save(fig, "bytes")

    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    title = "agreement with the consensus per round"
    if records and not any(r.labelled for r in records):
        # Agreement is with labels: there is nothing to draw, so the plot says why.
        ax.set(title=title, xlabel="round", ylabel="cosine similarity")
        ax.set_xticks(rounds)
        say(ax, _nothing_labelled(records))
    else:
        lines_per_participant(ax, "agreement")
        confidence = [float("nan") if r.mean_confidence is None else r.mean_confidence for r in records]
        if records:
            ax.plot(rounds, confidence, linestyle="--", color="grey", label="mean label confidence")
        finish(ax, title, "cosine similarity")
    save(fig, "agreement")
    return dict(PLOT_FILES)


def _nothing_labelled(records: Sequence[RoundRecord]) -> str:
    if all(r.strategy == "fedavg" for r in records):
        return "FedAvg run: no labels, so no agreement with them"
    lines = [f"round {r.round_id}: {abstentions_text(r) or 'no shard was labelled'}" for r in records]
    return "nothing was labelled\n" + "\n".join(_wrapped(line) for line in lines)


def _wrapped(line: str, width: int = 90) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(line, width)) or line
