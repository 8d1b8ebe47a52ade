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

from federation.plots import write_plots
from federation.records import RoundRecord, abstentions_text, produced, round_record
from schemas.messages import Message, ParticipantReport, PseudoLabels, RoundClosed, RoundOpened

if TYPE_CHECKING:
    from federation.runner import Phases

ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.json"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _bytes(value: int) -> str:
    for unit in ("B", "KB", "MB"):
        if value < 1024 or unit == "MB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024  # type: ignore[assignment]
    return str(value)


Baseline = dict[str, dict[str, float]]  # participant -> its test scores after warm-up (round 0)


def rounds_table(
    records: Sequence[RoundRecord],
    title: str = "Chorus rounds",
    baseline: Baseline | None = None,
    participant_ids: Sequence[str] = (),
) -> Table:
    """A row per participant and round; with `baseline`, round 0 (after warm-up, before any label)
    first; under the table, why prompts abstained, per round."""
    causes = [f"round {r.round_id}: {abstentions_text(r)}" for r in records if r.abstained]
    table = Table(
        title=title,
        title_justify="left",
        show_lines=False,
        caption="\n".join(causes) or None,
        caption_justify="left",
    )
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
    if baseline is not None:
        ids = list(participant_ids) or sorted(baseline)
        for i, pid in enumerate(ids):
            scores = baseline.get(pid, {})
            table.add_row(
                "0" if i == 0 else "",
                pid,
                _num(scores.get("rouge_l")),
                _num(scores.get("embedding_similarity")),
                *([""] * 8),
                end_section=i == len(ids) - 1,
            )
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
    # What the services published (see federation/observe.py), in the order they published it.
    _open_round: int | None = None
    _closed: list[RoundClosed] = field(default_factory=list)
    _labels: dict[int, dict[str, PseudoLabels]] = field(default_factory=dict)  # round -> message id -> labels
    _reports: dict[tuple[int, str], ParticipantReport] = field(default_factory=dict)
    _strategies: dict[int, str] = field(default_factory=dict)  # round -> its announced strategy
    baseline: Baseline | None = None  # round 0, once the run has evaluated its warmed-up members
    compare: dict[str, dict[str, Any]] | None = None  # `--compare local`: per member, see `compare_local`

    # -- live -------------------------------------------------------------------------------------

    def note(self, message: str) -> None:
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {message}")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        labels = {
            "data": "generating the task data",
            "models": "loading models",
            "warm-up": "warming up and scoring round 0",
            "compare": "training local-only twins (--compare local)",
        }
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

    def observe(self, message: Message) -> None:
        """Take note of a message a service published."""
        if isinstance(message, RoundOpened):
            self._open_round = message.round_id
            self._strategies[message.round_id] = message.strategy
        elif isinstance(message, PseudoLabels):  # a body sent in several BCC publishes counts once
            self._labels.setdefault(message.round_id, {})[message.message_id] = message
        elif isinstance(message, RoundClosed):
            if message.round_id not in {closed.round_id for closed in self._closed}:
                self._closed.append(message)
            if self._open_round == message.round_id:
                self._open_round = None
        elif isinstance(message, ParticipantReport):
            self._reports[(message.round_id, message.participant_id)] = message

    def poll(self, phases: Phases) -> None:
        self.compute_seconds = {pid: dict(s) for pid, s in phases.seconds.items()}
        self.flush(final=False)
        if self._status is not None:
            where = f"round {self._open_round}" if self._open_round is not None else "between rounds"
            doing = ", ".join(f"{pid}: {phases.current.get(pid, 'idle')}" for pid in self.participant_ids)
            self._status.update(f"{where} · {doing}")

    def flush(self, *, final: bool) -> None:
        """Report closed rounds whose reports are in (all of them when `final`)."""
        for closed in self._closed[len(self.records) :]:
            waiting = [pid for pid in closed.answered if (closed.round_id, pid) not in self._reports]
            if waiting and not final:
                return
            labels = list(self._labels.get(closed.round_id, {}).values())
            elapsed = time.perf_counter() - (self.rounds_started or self.started)
            strategy = self._strategies.get(closed.round_id, "semantic")
            record = round_record(closed, labels, self._reports, self.participant_ids, elapsed, strategy)
            self.records.append(record)
            with (self.results / ROUNDS_FILE).open("a", encoding="utf-8") as out:
                out.write(json.dumps(asdict(record)) + "\n")
            self.console.print(rounds_table([record], title=f"round {record.round_id}"))

    def show_baseline(self, baseline: Baseline) -> None:
        """Round 0: each evaluated member's scores after warm-up, before any label."""
        self.baseline = baseline
        self.console.print(
            rounds_table(
                [], title="round 0 (after warm-up)", baseline=baseline, participant_ids=self.participant_ids
            )
        )

    def last_scores(self, pid: str) -> tuple[int, dict[str, float]] | None:
        """The last round `pid` was scored after, and its scores; None if it never was."""
        for record in reversed(self.records):
            row = next(r for r in record.participants if r.participant_id == pid)
            if row.rouge_l is not None and row.embedding_similarity is not None:
                return record.round_id, {
                    "rouge_l": row.rouge_l,
                    "embedding_similarity": row.embedding_similarity,
                }
        return None

    def unproductive(self) -> str | None:
        """Why the run taught its members nothing: no round produced labels or an average; else None."""
        if any(produced(r) for r in self.records):
            return None
        if not self.records:
            return "no round finished"
        fedavg = any(r.strategy == "fedavg" for r in self.records)
        what = "an average" if fedavg else "labels"
        why = "; ".join(
            f"round {r.round_id}: "
            + (
                f"shards {r.failed_shards} failed (missing: {', '.join(r.missing) or '-'})"
                if r.failed_shards
                else abstentions_text(r) or "nothing to label"
            )
            for r in self.records
        )
        return f"no round produced {what} ({why})"

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
        plots = write_plots(self.records, self.results, self.baseline)
        unproductive = None if interrupted or error else self.unproductive()
        summary = {
            "rounds_wanted": rounds_wanted,
            "rounds_completed": len(self.records),
            "interrupted": interrupted,
            "error": error,
            "unproductive": unproductive,  # why no round produced labels or an average (chorus-run exits 1)
            "rounds_productive": sum(produced(r) for r in self.records),
            "abstain_reasons": _total_reasons(self.records),
            "round_0": self.baseline,
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
            "compare_local": self.compare,
            "files": {"rounds": ROUNDS_FILE, **{k: v for k, v in plots.items()}},
            **extra,
        }
        path = self.results / SUMMARY_FILE
        path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if self.records or self.baseline:
            self.console.print(
                rounds_table(self.records, "all rounds", self.baseline, participant_ids=self.participant_ids)
            )
        if self.compare:
            self.console.print(compare_table(self.compare))
        state = "interrupted" if interrupted else "failed" if error or unproductive else "done"
        self.console.print(
            f"{state}: {len(self.records)}/{rounds_wanted} rounds in {wall:.1f}s "
            f"(" + ", ".join(f"{k} {v:.1f}s" for k, v in self.phase_seconds.items()) + ")"
        )
        if unproductive:
            self.console.print(f"[bold red]{unproductive}[/]")
        self.console.print(f"results: {self.results}")
        for name in (ROUNDS_FILE, SUMMARY_FILE, *plots.values()):
            self.console.print(f"  {self.results / name}")
        return path

    def _participant_summary(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for pid in self.participant_ids:
            rows = [r for rec in self.records for r in rec.participants if r.participant_id == pid]
            scored = [r for r in rows if r.rouge_l is not None]
            start = (self.baseline or {}).get(pid, {})
            last_rouge = scored[-1].rouge_l if scored else None
            last_similarity = scored[-1].embedding_similarity if scored else None
            out[pid] = {
                "rounds_answered": sum(r.status == "answered" for r in rows),
                "round_0_rouge_l": start.get("rouge_l"),
                "round_0_embedding_similarity": start.get("embedding_similarity"),
                "first_rouge_l": scored[0].rouge_l if scored else None,
                "last_rouge_l": last_rouge,
                "first_embedding_similarity": scored[0].embedding_similarity if scored else None,
                "last_embedding_similarity": last_similarity,
                # last round minus round 0: what the federation's rounds changed
                "rouge_l_change": _change(last_rouge, start.get("rouge_l")),
                "embedding_similarity_change": _change(last_similarity, start.get("embedding_similarity")),
                "mean_agreement": _mean([r.agreement for r in rows]),
                "bytes_up": sum(r.bytes_up for r in rows),
                "bytes_down": sum(r.bytes_down for r in rows),
            }
        return out


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 4) if present else None


def _change(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else round(after - before, 4)


def _total_reasons(records: Sequence[RoundRecord]) -> dict[str, int]:
    total: dict[str, int] = {}
    for record in records:
        for cause, count in record.abstain_reasons.items():
            total[cause] = total.get(cause, 0) + count
    return dict(sorted(total.items(), key=lambda item: -item[1]))


def compare_table(compare: dict[str, dict[str, Any]]) -> Table:
    """`--compare local`: each trainable member's last federated scores beside its local-only twin's."""
    table = Table(title="federated vs local-only (same warm-up, same data)", title_justify="left")
    for name in (
        "participant",
        "rounds",
        "ROUGE-L fed",
        "ROUGE-L local",
        "diff",
        "emb sim fed",
        "emb sim local",
        "diff",
    ):
        table.add_column(name, justify="left" if name == "participant" else "right")
    for pid, row in compare.items():
        table.add_row(
            pid,
            str(row["rounds"]),
            _num(row["federated"].get("rouge_l")),
            _num(row["local"].get("rouge_l")),
            _signed(row["difference"].get("rouge_l")),
            _num(row["federated"].get("embedding_similarity")),
            _num(row["local"].get("embedding_similarity")),
            _signed(row["difference"].get("embedding_similarity")),
        )
    return table


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"
