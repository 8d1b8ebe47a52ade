"""What a run shows and leaves behind: a per-round table (rich), `rounds.jsonl`, `summary.json`, plots.

A round is reported once every participant that answered it has sent its
report for it (participants train and evaluate after the round closes), or when
the run ends, whichever comes first; scores then missing are shown as "-".
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.status import Status
from rich.table import Table

from schemas.codec import decode_reply
from schemas.messages import ParticipantReport, PseudoLabels, RoundClosed

if TYPE_CHECKING:
    from coordinator.service import Coordinator
    from federation.runner import Phases
    from participant.service import Participant

ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILES = {"scores": "scores.png", "bytes": "bytes.png", "agreement": "agreement.png"}


@dataclass
class ParticipantRound:
    participant_id: str
    status: str  # answered | late | missing
    rouge_l: float | None
    embedding_similarity: float | None
    agreement: float | None
    bytes_up: int
    bytes_down: int
    train_samples: int | None
    train_seconds: float | None


@dataclass
class RoundRecord:
    round_id: int
    opened_unix: float
    closed_unix: float
    round_seconds: float  # opened -> closed at the coordinator
    elapsed_seconds: float  # since the rounds started, when the round was reported
    consensus_seconds: float
    labelled: int
    abstained: int
    failed_shards: list[int]
    mean_confidence: float | None
    late: list[str]
    missing: list[str]
    participants: list[ParticipantRound]


def round_record(
    closed: RoundClosed,
    labels: Sequence[PseudoLabels],
    reports: dict[tuple[int, str], ParticipantReport],
    participant_ids: Sequence[str],
    elapsed: float,
) -> RoundRecord:
    confidences = [label.confidence for message in labels for label in message.labels]
    rows = []
    for pid in participant_ids:
        report = reports.get((closed.round_id, pid))
        metrics = {} if report is None else report.metrics
        status = "late" if pid in closed.late else "missing" if pid in closed.missing else "answered"
        if status == "answered" and pid not in closed.answered:
            status = "missing"
        rows.append(
            ParticipantRound(
                participant_id=pid,
                status=status,
                rouge_l=metrics.get("rouge_l"),
                embedding_similarity=metrics.get("embedding_similarity"),
                agreement=closed.agreement.get(pid),
                bytes_up=closed.bytes_received.get(pid, 0),
                bytes_down=closed.bytes_sent.get(pid, 0),
                train_samples=None if report is None else report.train_samples,
                train_seconds=None if report is None else round(report.train_seconds, 3),
            )
        )
    return RoundRecord(
        round_id=closed.round_id,
        opened_unix=closed.opened_unix,
        closed_unix=closed.closed_unix,
        round_seconds=round(closed.closed_unix - closed.opened_unix, 3),
        elapsed_seconds=round(elapsed, 3),
        consensus_seconds=round(closed.consensus_seconds, 3),
        labelled=sum(s.labelled for s in closed.shards),
        abstained=sum(s.abstained for s in closed.shards),
        failed_shards=[s.shard_id for s in closed.shards if s.status == "failed"],
        mean_confidence=round(sum(confidences) / len(confidences), 4) if confidences else None,
        late=list(closed.late),
        missing=list(closed.missing),
        participants=rows,
    )


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _bytes(value: int) -> str:
    for unit in ("B", "KB", "MB"):
        if value < 1024 or unit == "MB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024  # type: ignore[assignment]
    return str(value)


def rounds_table(records: Sequence[RoundRecord], title: str = "Chorus rounds") -> Table:
    table = Table(title=title, title_justify="left", show_lines=False)
    for name, justify in (
        ("round", "right"),
        ("participant", "left"),
        ("ROUGE-L", "right"),
        ("emb sim", "right"),
        ("agreement", "right"),
        ("status", "left"),
        ("up", "right"),
        ("down", "right"),
        ("conf", "right"),
        ("labelled", "right"),
        ("abstained", "right"),
        ("round time", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for record in records:
        for i, row in enumerate(record.participants):
            first = i == 0
            table.add_row(
                str(record.round_id) if first else "",
                row.participant_id,
                _num(row.rouge_l),
                _num(row.embedding_similarity),
                _num(row.agreement),
                row.status if row.status == "answered" else f"[bold red]{row.status}[/]",
                _bytes(row.bytes_up),
                _bytes(row.bytes_down),
                _num(record.mean_confidence, 2) if first else "",
                str(record.labelled) if first else "",
                str(record.abstained) if first else "",
                f"{record.round_seconds:.1f}s" if first else "",
                end_section=i == len(record.participants) - 1,
            )
    return table


def _console() -> Console:
    """The terminal's width on a terminal; wide enough for the table when piped to a file."""
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=130)


@dataclass
class Reporter:
    """Live status while running; a table per round as it completes; files at the end."""

    results: Path
    participant_ids: list[str]
    console: Console = field(default_factory=lambda: _console())
    records: list[RoundRecord] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    compute_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    rounds_started: float | None = None
    broker: str = ""
    _status: Status | None = None

    # -- live -------------------------------------------------------------------------------------

    def note(self, message: str) -> None:
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {message}")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        labels = {"data": "generating the task data", "models": "loading models"}
        with self.console.status(labels.get(name, name)):
            try:
                yield
            finally:
                self.phase_seconds[name] = round(time.perf_counter() - started, 2)
        self.note(f"{labels.get(name, name)}: {self.phase_seconds[name]:.1f}s")

    def start_rounds(self, broker: str) -> None:
        self.broker = broker
        self.rounds_started = time.perf_counter()
        self.note(f"federating over {broker}")
        self._status = self.console.status("waiting for the first round")
        self._status.start()

    def poll(self, coordinator: Coordinator, participants: Sequence[Participant], phases: Phases) -> None:
        self.compute_seconds = {pid: dict(s) for pid, s in phases.seconds.items()}
        self.flush(coordinator, participants, final=False)
        if self._status is not None:
            open_round = coordinator.round.round_id if coordinator.round is not None else None
            where = f"round {open_round}" if open_round is not None else "between rounds"
            doing = ", ".join(f"{pid}: {phases.current.get(pid, 'idle')}" for pid in self.participant_ids)
            self._status.update(f"{where} · {doing}")

    def flush(
        self, coordinator: Coordinator | None, participants: Sequence[Participant], *, final: bool
    ) -> None:
        """Report closed rounds whose reports are in (all of them when `final`)."""
        if coordinator is None:
            return
        reports = {(r.round_id, p.pid): r for p in participants for r in p.reports}
        for closed in coordinator.closed_rounds[len(self.records) :]:
            waiting = [pid for pid in closed.answered if (closed.round_id, pid) not in reports]
            if waiting and not final:
                return
            labels = self._labels(coordinator, closed.round_id)
            elapsed = time.perf_counter() - (self.rounds_started or self.started)
            record = round_record(closed, labels, reports, self.participant_ids, elapsed)
            self.records.append(record)
            with (self.results / ROUNDS_FILE).open("a", encoding="utf-8") as out:
                out.write(json.dumps(asdict(record)) + "\n")
            self.console.print(rounds_table([record], title=f"round {record.round_id}"))

    @staticmethod
    def _labels(coordinator: Coordinator, round_id: int) -> list[PseudoLabels]:
        labels = []
        for closing in coordinator.store.closings(round_id):
            if closing.labels is not None:
                message = decode_reply(closing.labels)
                if isinstance(message, PseudoLabels):
                    labels.append(message)
        return labels

    def stop_status(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    # -- the end ----------------------------------------------------------------------------------

    def finish(
        self, *, rounds_wanted: int, interrupted: bool, error: str | None, extra: dict[str, Any]
    ) -> Path:
        self.stop_status()
        wall = time.perf_counter() - self.started
        if self.rounds_started is not None:
            self.phase_seconds["rounds"] = round(time.perf_counter() - self.rounds_started, 2)
        plots = write_plots(self.records, self.results)
        summary = {
            "rounds_wanted": rounds_wanted,
            "rounds_completed": len(self.records),
            "interrupted": interrupted,
            "error": error,
            "broker": self.broker,
            "wall_seconds": round(wall, 2),
            "phase_seconds": self.phase_seconds,
            "compute_seconds": {
                pid: {k: round(v, 2) for k, v in s.items()} for pid, s in sorted(self.compute_seconds.items())
            },
            "participants": self._participant_summary(),
            "bytes_total": {
                "up": sum(r.bytes_up for rec in self.records for r in rec.participants),
                "down": sum(r.bytes_down for rec in self.records for r in rec.participants),
            },
            "files": {"rounds": ROUNDS_FILE, **{k: v for k, v in plots.items()}},
            **extra,
        }
        path = self.results / SUMMARY_FILE
        path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if self.records:
            self.console.print(rounds_table(self.records, title="all rounds"))
        state = "interrupted" if interrupted else "failed" if error else "done"
        self.console.print(
            f"{state}: {len(self.records)}/{rounds_wanted} rounds in {wall:.1f}s "
            f"(" + ", ".join(f"{k} {v:.1f}s" for k, v in self.phase_seconds.items()) + ")"
        )
        self.console.print(f"results: {self.results}")
        for name in (ROUNDS_FILE, SUMMARY_FILE, *plots.values()):
            self.console.print(f"  {self.results / name}")
        return path

    def _participant_summary(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for pid in self.participant_ids:
            rows = [r for rec in self.records for r in rec.participants if r.participant_id == pid]
            scored = [r for r in rows if r.rouge_l is not None]
            out[pid] = {
                "rounds_answered": sum(r.status == "answered" for r in rows),
                "first_rouge_l": scored[0].rouge_l if scored else None,
                "last_rouge_l": scored[-1].rouge_l if scored else None,
                "first_embedding_similarity": scored[0].embedding_similarity if scored else None,
                "last_embedding_similarity": scored[-1].embedding_similarity if scored else None,
                "mean_agreement": _mean([r.agreement for r in rows]),
                "bytes_up": sum(r.bytes_up for r in rows),
                "bytes_down": sum(r.bytes_down for r in rows),
            }
        return out


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 4) if present else None


def write_plots(records: Sequence[RoundRecord], results: Path) -> dict[str, str]:
    """Three PNGs (matplotlib, Agg); with no finished round they say so instead of being blank."""
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

    def empty(ax: Any) -> None:
        ax.text(0.5, 0.5, "no round finished", ha="center", va="center", transform=ax.transAxes)

    written = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, attr, label in zip(
        axes, ("rouge_l", "embedding_similarity"), ("ROUGE-L", "embedding similarity"), strict=True
    ):
        for pid in ids:
            ax.plot(rounds, series(attr, pid), marker="o", label=pid)
        ax.set(title=f"test {label} per round", xlabel="round", ylabel=label)
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
        if ids:
            ax.legend()
        else:
            empty(ax)
    fig.savefig(results / PLOT_FILES["scores"], dpi=110)
    written["scores"] = PLOT_FILES["scores"]
    plt.close(fig)

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
    ax.set(title="bytes per round per participant", xlabel="round", ylabel="KiB")
    ax.set_xticks(rounds)
    ax.grid(axis="y", alpha=0.3)
    if ids:  # below the axes: bars reach the top
        ax.legend(ncols=max(1, len(ids)), fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15))
    else:
        empty(ax)
    fig.savefig(results / PLOT_FILES["bytes"], dpi=110)
    written["bytes"] = PLOT_FILES["bytes"]
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    for pid in ids:
        ax.plot(rounds, series("agreement", pid), marker="o", label=pid)
    confidence = [float("nan") if r.mean_confidence is None else r.mean_confidence for r in records]
    if records:
        ax.plot(rounds, confidence, linestyle="--", color="grey", label="mean label confidence")
    ax.set(title="agreement with the consensus per round", xlabel="round", ylabel="cosine similarity")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    if ids:
        ax.legend()
    else:
        empty(ax)
    fig.savefig(results / PLOT_FILES["agreement"], dpi=110)
    written["agreement"] = PLOT_FILES["agreement"]
    plt.close(fig)
    return written
