"""A round as the run reports it: a row per participant, from its RoundClosed, labels and reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.labelling import abstain_reason_counts
from schemas.messages import ParticipantReport, PseudoLabels, RoundClosed


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
    abstain_reasons: dict[str, int]  # cause -> prompts that abstained for it (coordinator.labelling)
    failed_shards: list[int]
    shards: int
    strategy: str  # "semantic" or "fedavg", as the round was announced
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
    strategy: str = "semantic",
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
        abstain_reasons=abstain_reason_counts(labels),
        failed_shards=[s.shard_id for s in closed.shards if s.status == "failed"],
        shards=len(closed.shards),
        strategy=strategy,
        mean_confidence=round(sum(confidences) / len(confidences), 4) if confidences else None,
        late=list(closed.late),
        missing=list(closed.missing),
        participants=rows,
    )


def produced(record: RoundRecord) -> bool:
    """Whether the round gave its members something to learn from: labels, or (FedAvg) an average."""
    if record.strategy == "fedavg":
        return record.shards > len(record.failed_shards)
    return record.labelled > 0


def abstentions_text(record: RoundRecord) -> str:
    """ "6 abstained: <cause> (4); <cause> (2)", or "" when nothing abstained."""
    if not record.abstained:
        return ""
    causes = "; ".join(
        cause if len(record.abstain_reasons) == 1 else f"{cause} ({count})"
        for cause, count in record.abstain_reasons.items()
    )
    return f"{record.abstained} abstained" + (f": {causes}" if causes else "")
