"""Plain-text reports of `chorus-replay`: deterministic (same log, same text), one table per topic."""

from __future__ import annotations

import json
from collections.abc import Sequence

from coordinator.labelling import abstain_reason_counts
from coordinator.replay.consensus import ConsensusReplay, LabelChange, ShardReplay
from coordinator.replay.label_quality import LabelQuality, QualitySummary
from coordinator.replay.log import RecordedLog, Recording
from coordinator.replay.publish import RepublishPlan, RepublishReport
from schemas.codec import decode_reply
from schemas.errors import SchemaError
from schemas.messages import Label, PseudoLabels


def table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Left-aligned columns; the first row is the heading."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _since(start: float, t: float) -> str:
    return f"+{t - start:.3f}s"


def _quoted(text: str, limit: int = 0) -> str:
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return json.dumps(text, ensure_ascii=False)


# ---- inspect -----------------------------------------------------------------


def inspect_text(log: RecordedLog, recording: Recording) -> str:
    lines = [
        f"federation {log.federation!r}: {len(log.files)} files, {len(log.frames)} messages, "
        f"{sum(f.size for f in log.files)} bytes",
        "",
        "files",
        *_files_table(log),
        "",
        "rounds (round 0: before the first round opened)",
        *_rounds_table(recording),
        "",
        "abstentions (why prompts got no label)",
        *_abstention_lines(recording),
        "",
        "participants (messages the coordinator received from each login)",
        *_participants_table(recording),
    ]
    start = log.frames[0].t if log.frames else 0.0
    rejected = list(recording.rejected())
    lines += ["", f"rejected messages: {len(rejected)}"]
    if rejected:
        rows: list[tuple[str, ...]] = [("time", "round", "user_id", "routing key", "message id", "reason")]
        rows += [
            (
                _since(start, r.frame.t),
                str(r.round_id),
                r.frame.user_id or "(none)",
                r.frame.routing_key,
                r.frame.message_id or "(none)",
                r.frame.reason,
            )
            for r in rejected
        ]
        lines += table(rows)
    late = recording.late_batches()
    lines += ["", f"late batches (accepted after their shard closed): {len(late)}"]
    if late:
        accepted = recording.accepted_batches()
        late_rows: list[tuple[str, ...]] = [("round", "shard", "participant", "arrived")]
        for key in late:
            opened_at = recording.opened_at.get(key[0], start)
            arrived = _since(opened_at, accepted[key].t) + " after open"
            late_rows.append((str(key[0]), str(key[1]), key[2], arrived))
        lines += table(late_rows)
    lines += damage_lines(log)
    return "\n".join(lines) + "\n"


def damage_lines(log: RecordedLog) -> list[str]:
    lines = []
    if log.damage:
        lines += ["", f"damage: {len(log.damage)} files stop early (their frames before it are used)"]
        lines += [f"  {d}" for d in log.damage]
    if log.skipped:
        lines += ["", f"skipped: {len(log.skipped)} frames over the frame limit, checked but not loaded"]
        lines += [f"  {s}" for s in log.skipped]
    if log.notes:
        lines += ["", "notes", *[f"  {note}" for note in log.notes]]
    return lines


def _files_table(log: RecordedLog) -> list[str]:
    rows = [("file", "session", "index", "messages", "bytes", "damage")]
    for f in log.files:
        session = "-" if f.header is None else f.header.session
        index = "-" if f.header is None else str(f.header.file_index)
        damage = "" if f.damage is None else f"byte {f.damage.offset}: {f.damage.problem}"
        rows.append((f.path.name, session, index, str(f.frames), str(f.size), damage))
    return table(rows)


def _rounds_table(recording: Recording) -> list[str]:
    rows = [
        (
            "round",
            "expected",
            "answered",
            "late",
            "missing",
            "shards ok/failed",
            "labelled",
            "msgs in",
            "bytes in",
            "msgs out",
            "bytes out",
            "rejected",
        )
    ]
    rounds = sorted({0, *recording.opened, *(r.round_id for r in recording.received)})
    out_by_round: dict[int, list[int]] = {}
    for frame in recording.published:
        if frame.content.kind:
            out_by_round.setdefault(frame.content.round_id, []).append(frame.body_size)
    for round_id in rounds:
        received = [r for r in recording.received if r.round_id == round_id]
        opened, closed = recording.opened.get(round_id), recording.closed.get(round_id)
        out = out_by_round.get(round_id, [])
        shards, labelled = "-", "-"
        if closed is not None:
            ok = sum(1 for o in closed.shards if o.status == "labelled")
            shards = f"{ok}/{len(closed.shards) - ok}"
            decided = sum(o.labelled + o.abstained for o in closed.shards)
            labelled = f"{sum(o.labelled for o in closed.shards)}/{decided}"
        rows.append(
            (
                str(round_id),
                "-" if opened is None else str(len(opened.expected)),
                "-" if closed is None else str(len(closed.answered)),
                "-" if closed is None else str(len(closed.late)),
                "-" if closed is None else str(len(closed.missing)),
                shards,
                labelled,
                str(len(received)),
                str(sum(r.frame.body_size for r in received)),
                str(len(out)),
                str(sum(out)),
                str(sum(1 for r in received if r.frame.settle == "dead_letter")),
            )
        )
    return table(rows)


def _abstention_lines(recording: Recording) -> list[str]:
    """Per round with abstentions: "6 abstained: <cause> (4); <cause> (2)", from the published labels."""
    by_round: dict[int, list[PseudoLabels]] = {}
    for (round_id, _), body in sorted(recording.labels.items()):
        try:
            message = decode_reply(body)
        except SchemaError:
            continue
        if isinstance(message, PseudoLabels):
            by_round.setdefault(round_id, []).append(message)
    lines = []
    for round_id, messages in sorted(by_round.items()):
        counts = abstain_reason_counts(messages)
        if counts:
            causes = "; ".join(f"{cause} ({n})" for cause, n in counts.items())
            lines.append(f"  round {round_id}: {sum(counts.values())} abstained: {causes}")
    return lines or ["  none"]


def _participants_table(recording: Recording) -> list[str]:
    late = {(r, s, p) for r, s, p in recording.late_batches()}
    accepted = recording.accepted_batches()
    users = sorted({r.frame.user_id or "(none)" for r in recording.received})
    rows = [("user_id", "msgs", "bytes", "batches", "late", "rejected", "requeued", "abandoned")]
    for user in users:
        mine = [r for r in recording.received if (r.frame.user_id or "(none)") == user]
        rows.append(
            (
                user,
                str(len(mine)),
                str(sum(r.frame.body_size for r in mine)),
                str(sum(1 for key in accepted if key[2] == user and key not in late)),
                str(sum(1 for key in late if key[2] == user)),
                str(sum(1 for r in mine if r.frame.settle == "dead_letter")),
                str(sum(1 for r in mine if r.frame.settle == "requeue")),
                str(sum(1 for r in mine if r.frame.settle == "abandoned")),
            )
        )
    return table(rows)


# ---- consensus ---------------------------------------------------------------


def consensus_text(replay: ConsensusReplay) -> str:
    settings = replay.settings
    table_ = settings.consensus
    lines = [
        f"consensus replay with index={table_.index} neighbours={table_.neighbours} "
        f"min_confidence={table_.min_confidence:g} min_answers={table_.min_answers} "
        f"embedder={table_.embedder} quorum={settings.round.quorum} late_policy={settings.round.late_policy}",
        "",
    ]
    rows: list[tuple[str, ...]] = [
        ("round", "shard", "status", "answered", "prompts", "recorded", "replayed", "changed", "bytes")
    ]
    rows += [_shard_row(shard) for shard in replay.shards]
    lines += table(rows)
    changes = replay.changes
    lines += ["", f"prompts changed: {len(changes)} of {replay.prompts}"]
    for change in changes:
        lines += _change_lines(change)
    if replay.notes:
        lines += ["", "notes", *[f"  {note}" for note in replay.notes]]
    return "\n".join(lines) + "\n"


def _counts(body: bytes | None) -> str:
    if body is None:
        return "-"
    message = decode_reply(body)
    assert isinstance(message, PseudoLabels)
    return f"{len(message.labels)}/{len(message.abstained)}"


def _shard_row(shard: ShardReplay) -> tuple[str, ...]:
    if shard.recorded is None and shard.replayed is None:
        same = "-"
    else:
        same = "identical" if shard.identical else "differ"
    return (
        str(shard.round_id),
        str(shard.shard_id),
        shard.status,
        str(len(shard.answered)),
        str(shard.prompts),
        _counts(shard.recorded),
        _counts(shard.replayed),
        str(len(shard.changes)),
        same,
    )


def _label_text(label: Label | None, abstain_reason: str = "") -> str:
    if label is None:
        return "abstained" + (f" ({abstain_reason})" if abstain_reason else "")
    return (
        f"{_quoted(label.text)} (source {label.source}, confidence {label.confidence:.3f}, "
        f"support {label.support})"
    )


def _change_lines(change: LabelChange) -> list[str]:
    return [
        f"  round {change.round_id} shard {change.shard_id} prompt {change.prompt_id}",
        f"    recorded: {_label_text(change.recorded)}",
        f"    replayed: {_label_text(change.replayed, change.replayed_abstain_reason)}",
    ]


# ---- label quality -------------------------------------------------------------

QUALITY_COLUMNS = ("round", "labelled", "abstained", "label", "members' mean", "oracle", "label > mean")


def label_quality_text(qualities: Sequence[tuple[str, LabelQuality]]) -> str:
    """One table per side (e.g. "replayed labels"): a row per round and one for the whole run."""
    lines = [
        "",
        "label quality: ROUGE-L F1 against the references, means over the labelled prompts",
        "  members' mean: of every member's answer (a random member's expected score); "
        "oracle: of the best member's answer",
    ]
    for title, quality in qualities:
        rows: list[tuple[str, ...]] = [QUALITY_COLUMNS]
        rows += [_quality_row(str(r), summary) for r, summary in quality.rounds.items()]
        rows.append(_quality_row("all", quality.overall))
        lines += ["", title, *table(rows)]
        if quality.unscored:
            lines.append(f"  not scored (no reference, or nobody answered): {len(quality.unscored)} prompts")
    return "\n".join(lines) + "\n"


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _quality_row(name: str, summary: QualitySummary) -> tuple[str, ...]:
    return (
        name,
        str(summary.labelled),
        str(summary.abstained),
        _score(summary.label),
        _score(summary.members_mean),
        _score(summary.oracle),
        f"{summary.beat_mean}/{summary.labelled}",
    )


# ---- publish -----------------------------------------------------------------


def republish_text(plan: RepublishPlan, report: RepublishReport) -> str:
    kinds: dict[str, int] = {}
    for message in plan.messages:
        kind = "generation_batch" if message.routing_key.startswith("gen.") else "control"
        kinds[kind] = kinds.get(kind, 0) + 1
    lines = [
        f"published {report.published} of {len(plan.messages)} messages in {report.seconds:.2f}s "
        f"as {len(plan.users)} users ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))})"
    ]
    if plan.skipped:
        lines.append("skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(plan.skipped.items())))
    if report.failed:
        lines.append("failed: " + ", ".join(f"{n} {why}" for why, n in sorted(report.failed.items())))
    if report.waited_for_rounds:
        lines.append(f"waited {report.waited_for_rounds:.2f}s for the coordinator to open rounds")
    if report.rounds_not_opened:
        lines.append("rounds never announced in time: " + ", ".join(map(str, report.rounds_not_opened)))
    rows = [("user_id", "published")] + [(u, str(n)) for u, n in sorted(report.by_user.items())]
    lines += table(rows)
    return "\n".join(lines) + "\n"
