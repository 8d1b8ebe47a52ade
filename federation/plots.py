"""The run's plots: scores, bytes and agreement per round and participant (matplotlib, Agg).

Scores start at round 0 (after warm-up, before any label) when the run evaluated it; a plot with
nothing to show (no round finished, nothing labelled) says so instead of showing empty axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.records import RoundRecord, abstentions_text

PLOT_FILES = {"scores": "scores.png", "bytes": "bytes.png", "agreement": "agreement.png"}


@dataclass(frozen=True)
class _Rounds:
    """The finished rounds as the figures read them: participants in the first round's order."""

    records: Sequence[RoundRecord]

    @property
    def ids(self) -> list[str]:
        return [r.participant_id for r in self.records[0].participants] if self.records else []

    @property
    def rounds(self) -> list[int]:
        return [r.round_id for r in self.records]

    def series(self, attr: str, pid: str) -> list[float]:
        """`attr` of participant `pid`, one value per round (NaN where it has none)."""
        values = []
        for record in self.records:
            row = next(r for r in record.participants if r.participant_id == pid)
            value = getattr(row, attr)
            values.append(float("nan") if value is None else float(value))
        return values


def write_plots(
    records: Sequence[RoundRecord], results: Path, baseline: dict[str, dict[str, float]] | None = None
) -> dict[str, str]:
    """Three PNGs; with no finished round they say so instead of being blank. `baseline`: participant
    -> its round-0 scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    view = _Rounds(records)
    for name, figure in (
        ("scores", _scores_figure(plt, view, baseline)),
        ("bytes", _bytes_figure(plt, view)),
        ("agreement", _agreement_figure(plt, view)),
    ):
        figure.savefig(results / PLOT_FILES[name], dpi=110)
        plt.close(figure)
    return dict(PLOT_FILES)


def _scores_figure(plt: Any, view: _Rounds, baseline: dict[str, dict[str, float]] | None) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, attr, label in zip(
        axes, ("rouge_l", "embedding_similarity"), ("ROUGE-L", "embedding similarity"), strict=True
    ):
        _lines_per_participant(ax, view, attr, baseline)
        ticks = [0, *view.rounds] if baseline else view.rounds
        _finish(ax, view, f"test {label} per round (0: after warm-up)", label, ticks=ticks)
    return fig


def _bytes_figure(plt: Any, view: _Rounds) -> Any:
    fig, ax = plt.subplots(figsize=(8, 4.8), constrained_layout=True)
    ids, rounds = view.ids, view.rounds
    width = 0.8 / max(1, 2 * len(ids))
    for i, pid in enumerate(ids):
        up = [v / 1024 for v in view.series("bytes_up", pid)]
        down = [v / 1024 for v in view.series("bytes_down", pid)]
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
    _finish(ax, view, "bytes per round per participant", "KiB", grid="y", legend=below)
    return fig


def _agreement_figure(plt: Any, view: _Rounds) -> Any:
    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    title = "agreement with the consensus per round"
    records = view.records
    if records and not any(r.labelled for r in records):
        # Agreement is with labels: there is nothing to draw, so the plot says why.
        ax.set(title=title, xlabel="round", ylabel="cosine similarity")
        ax.set_xticks(view.rounds)
        _say(ax, _nothing_labelled(records))
        return fig
    _lines_per_participant(ax, view, "agreement")
    confidence = [float("nan") if r.mean_confidence is None else r.mean_confidence for r in records]
    if records:
        ax.plot(view.rounds, confidence, linestyle="--", color="grey", label="mean label confidence")
    _finish(ax, view, title, "cosine similarity")
    return fig


def _lines_per_participant(
    ax: Any, view: _Rounds, attr: str, baseline: dict[str, dict[str, float]] | None = None
) -> None:
    """One line per participant; from its round-0 score when `baseline` has one."""
    for pid in view.ids:
        start = (baseline or {}).get(pid, {}).get(attr)
        if start is None:
            ax.plot(view.rounds, view.series(attr, pid), marker="o", label=pid)
        else:
            ax.plot([0, *view.rounds], [float(start), *view.series(attr, pid)], marker="o", label=pid)


def _say(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)


def _finish(
    ax: Any,
    view: _Rounds,
    title: str,
    ylabel: str,
    grid: str = "both",
    legend: dict[str, Any] | None = None,
    ticks: Sequence[int] | None = None,
) -> None:
    ax.set(title=title, xlabel="round", ylabel=ylabel)
    ax.set_xticks(list(view.rounds if ticks is None else ticks))
    ax.grid(axis=grid, alpha=0.3)
    if view.ids:
        ax.legend(**(legend or {}))
    else:
        _say(ax, "no round finished")


def _nothing_labelled(records: Sequence[RoundRecord]) -> str:
    if all(r.strategy == "fedavg" for r in records):
        return "FedAvg run: no labels, so no agreement with them"
    lines = [f"round {r.round_id}: {abstentions_text(r) or 'no shard was labelled'}" for r in records]
    return "nothing was labelled\n" + "\n".join(_wrapped(line) for line in lines)


def _wrapped(line: str, width: int = 90) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(line, width)) or line
