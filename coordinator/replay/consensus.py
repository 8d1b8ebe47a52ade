"""Re-run consensus offline from a record log and compare with the pseudo-labels that were published.

Which batches count for a shard is what the live coordinator used: the answered set the round's
`RoundClosed` records for that shard (each participant's first accepted batch), plus, with
late_policy "carry", the previous round's late batches. With a `quorum` override, or for a round
the log has no summary of, the answered sets are worked out again by running the round engine
over the recorded arrival times. Candidates and the PseudoLabels bytes come from
`coordinator.labelling`, the code the service runs, so the same log and settings give
byte-identical labels.

A shard's batches are read from the log when its consensus runs, and let go after it: a replay holds
one shard's batches at a time (`ShardReplay.batches()` reads them again). The embedding cache is
kept to `REPLAY_CACHE_ENTRIES` (the recorded `cache_entries` if smaller): a replay meets each answer
once or twice, in its round and the next, so a cache the size of the live coordinator's (200,000 by
default) would only grow with the log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import msgspec

from common.embedding import Embedder
from coordinator.labelling import pseudo_labels_message, shard_candidates
from coordinator.replay.log import BatchKey, RecordedFrame, Recording, ReplayError, batch_of
from coordinator.reputation import weigh_votes
from coordinator.rounds import RoundState, resolve_quorum
from coordinator.settings import CoordinatorSettings
from coordinator.wiring import build_consensus
from schemas.codec import decode_reply, encode
from schemas.messages import GenerationBatch, Label, PseudoLabels, RoundOpened

ShardKey = tuple[int, int]  # (round, shard)
# The embedders `coordinator.wiring.build_embedder` knows by name; anything else is a local folder to load.
NAMED_EMBEDDERS = ("minilm-onnx", "minilm", "hashing")
REPLAY_CACHE_ENTRIES = 20_000  # embeddings a replay keeps: a large round's answers, and the next's


@dataclass(frozen=True)
class ConsensusOverrides:
    """Settings to replay with instead of the recorded ones; None keeps the recorded value."""

    index: Literal["hnsw", "exact"] | None = None
    neighbours: int | None = None
    min_confidence: float | None = None
    min_answers: int | None = None
    embedder: str | None = None
    quorum: int | float | None = None
    label_choice: str | None = None  # a rule of coordinator.label_rules, as a settings file names it


def replay_settings(recorded: CoordinatorSettings, overrides: ConsensusOverrides) -> CoordinatorSettings:
    """The recorded settings with the overrides applied, validated like a settings file.

    A record file does not choose what is loaded from this machine: when its settings name a local
    embedder folder (loading one can run code from it), the replay needs `overrides.embedder` given
    explicitly, that folder or another embedder.
    """
    embedder = recorded.consensus.embedder
    if overrides.embedder is None and embedder not in NAMED_EMBEDDERS:
        raise ReplayError(  # repr, cut short: the text is the record's, not ours to print raw
            f"the log's settings name the local embedder folder {embedder[:200]!r}; a record file does "
            "not choose what this machine loads: pass --embedder DIR to load that folder (if you trust "
            f"it) or another, or --embedder {'|'.join(NAMED_EMBEDDERS)}"
        )
    changes = {
        "index": overrides.index,
        "neighbours": overrides.neighbours,
        "min_confidence": overrides.min_confidence,
        "min_answers": overrides.min_answers,
        "embedder": overrides.embedder,
        "label_choice": overrides.label_choice,
    }
    table = msgspec.to_builtins(recorded.consensus) | {k: v for k, v in changes.items() if v is not None}
    rounds = msgspec.to_builtins(recorded.round)
    if overrides.quorum is not None:
        try:
            resolve_quorum(overrides.quorum, 1)
        except ValueError as e:
            raise ReplayError(f"invalid replay option: {e}") from e
        rounds["quorum"] = overrides.quorum
    try:
        return msgspec.structs.replace(
            recorded,
            consensus=msgspec.convert(table, type(recorded.consensus)),
            round=msgspec.convert(rounds, type(recorded.round)),
        )
    except msgspec.ValidationError as e:
        raise ReplayError(f"invalid replay option: {e}") from e


@dataclass(frozen=True)
class LabelChange:
    """A prompt whose label differs: another text, or labelled on one side and abstained on the other."""

    round_id: int
    shard_id: int
    prompt_id: str
    recorded: Label | None
    replayed: Label | None
    replayed_abstain_reason: str = ""  # why the replay abstained, when it did


@dataclass(frozen=True)
class ShardReplay:
    round_id: int
    shard_id: int
    status: Literal["labelled", "failed"]
    answered: tuple[str, ...]
    prompts: int
    recorded: bytes | None  # the PseudoLabels the coordinator published (None: none in the log)
    replayed: bytes | None  # None when the shard fails (below quorum)
    changes: tuple[LabelChange, ...]
    batch_frames: tuple[RecordedFrame, ...] = ()  # the answered set's batches: what consensus chose among

    @property
    def identical(self) -> bool:
        return self.recorded == self.replayed

    def batches(self) -> list[GenerationBatch]:
        """The answered set's batches, read again from the log."""
        return [batch_of(frame) for frame in self.batch_frames]


@dataclass(frozen=True)
class ConsensusReplay:
    settings: CoordinatorSettings
    shards: tuple[ShardReplay, ...]
    notes: tuple[str, ...]

    @property
    def changes(self) -> tuple[LabelChange, ...]:
        return tuple(change for shard in self.shards for change in shard.changes)

    @property
    def prompts(self) -> int:
        return sum(shard.prompts for shard in self.shards)


@dataclass(frozen=True)
class _Closing:
    status: Literal["labelled", "failed"]
    answered: tuple[str, ...]


def replay_consensus(
    recording: Recording, settings: CoordinatorSettings, *, embedder: Embedder | None = None
) -> ConsensusReplay:
    """Consensus for every shard of every semantic round in the log, compared with what was published.

    `settings` are the ones to replay with (`replay_settings`); a `quorum` that differs from the
    recorded one makes the round engine decide the answered sets again from arrival times.
    `embedder` replaces the one `settings.consensus.embedder` names (tests pass a HashingEmbedder).
    """
    if settings.strategy != "semantic":
        raise ReplayError("this log is of a fedavg federation: there is no consensus to replay")
    table = settings.consensus
    if table.cache_entries > REPLAY_CACHE_ENTRIES:
        table = msgspec.structs.replace(table, cache_entries=REPLAY_CACHE_ENTRIES)
    strategy = build_consensus(table, embedder)
    recorded_quorum = None if recording.settings is None else recording.settings.round.quorum
    resimulate = settings.round.quorum != recorded_quorum
    accepted = recording.accepted_batches()
    closings, late, notes = _closings(recording, settings, accepted, resimulate)
    shards: list[ShardReplay] = []
    for round_id in sorted(recording.opened):
        opened = recording.opened[round_id]
        carried = []
        if settings.round.late_policy == "carry":
            carried = [batch_of(accepted[key]) for key in sorted(late) if key[0] == round_id - 1]
        for shard in opened.shards:
            key = (round_id, shard.shard_id)
            closing = closings.get(key)
            if closing is None:
                notes.append(f"round {round_id} shard {shard.shard_id}: never closed in the log; skipped")
                continue
            prompt_ids = [p.prompt_id for p in shard.prompts]
            replayed = None
            reasons: dict[str, str] = {}
            fresh_frames = tuple(accepted[(*key, p)] for p in closing.answered if (*key, p) in accepted)
            if closing.status == "labelled":
                fresh = [batch_of(frame) for frame in fresh_frames]
                if len(fresh) != len(closing.answered):
                    notes.append(
                        f"round {round_id} shard {shard.shard_id}: {len(closing.answered) - len(fresh)} "
                        "answered batches are not in the log"
                    )
                candidates = shard_candidates(prompt_ids, fresh, carried, settings.round.staleness_weight)
                history = [recording.closed[r].agreement for r in sorted(recording.closed) if r < round_id]
                result = strategy.decide(weigh_votes(candidates, history, settings.consensus))
                reasons = {d.prompt_id: d.abstain_reason for d in result.decisions if d.label is None}
                message = pseudo_labels_message(recording.federation, round_id, shard.shard_id, result)
                replayed = encode(message)
            recorded = recording.labels.get(key)
            changes = _changes(round_id, shard.shard_id, prompt_ids, recorded, replayed, reasons)
            if recorded is None and _recorded_status(recording, key) != "failed":
                notes.append(f"round {round_id} shard {shard.shard_id}: no published labels in the log")
                changes = ()
            shards.append(
                ShardReplay(
                    round_id=round_id,
                    shard_id=shard.shard_id,
                    status=closing.status,
                    answered=closing.answered,
                    prompts=len(prompt_ids),
                    recorded=recorded,
                    replayed=replayed,
                    changes=changes,
                    batch_frames=fresh_frames,
                )
            )
    return ConsensusReplay(settings=settings, shards=tuple(shards), notes=tuple(notes))


def _closings(
    recording: Recording,
    settings: CoordinatorSettings,
    accepted: Mapping[BatchKey, RecordedFrame],
    resimulate: bool,
) -> tuple[dict[ShardKey, _Closing], set[tuple[int, int, str]], list[str]]:
    """Per shard how it closed, the late (round, shard, participant) batches, and notes."""
    closings: dict[ShardKey, _Closing] = {}
    late: set[tuple[int, int, str]] = set()
    notes: list[str] = []
    for round_id, opened in sorted(recording.opened.items()):
        summary = recording.closed.get(round_id)
        if summary is not None and not resimulate:
            for outcome in summary.shards:
                closings[(round_id, outcome.shard_id)] = _Closing(outcome.status, tuple(outcome.answered))
            answered = {(round_id, o.shard_id, p) for o in summary.shards for p in o.answered}
            late |= {key for key in accepted if key[0] == round_id and key not in answered}
            continue
        if summary is None:
            notes.append(f"round {round_id}: no RoundClosed in the log; answered sets re-decided")
        simulated, simulated_late = _simulate_round(opened, settings, accepted)
        closings |= {(round_id, shard_id): c for shard_id, c in simulated.items()}
        late |= simulated_late
    return closings, late, notes


def _simulate_round(
    opened: RoundOpened,
    settings: CoordinatorSettings,
    accepted: Mapping[BatchKey, RecordedFrame],
) -> tuple[dict[int, _Closing], set[tuple[int, int, str]]]:
    """Run the round engine over the recorded arrival times, as the live driver would have."""
    state = RoundState(
        round_id=opened.round_id,
        shards={s.shard_id: [p.prompt_id for p in s.prompts] for s in opened.shards},
        expected=opened.expected,
        quorum=resolve_quorum(settings.round.quorum, len(opened.expected)),
        opened_at=opened.opened_unix,
        deadline_at=opened.deadline_unix,
        grace_seconds=settings.round.grace_seconds,
        straggler_factor=settings.round.straggler_factor,
    )
    closings: dict[int, _Closing] = {}

    def close_due(now: float) -> None:
        for closing in state.due(now):
            closings[closing.shard_id] = _Closing(closing.status, closing.answered)
            state.finish(closing.shard_id, closing.status)

    arrivals = sorted(
        (frame.t, key) for key, frame in accepted.items() if key[0] == opened.round_id
    )  # time order; ties by key
    for t, (_, shard_id, participant) in arrivals:
        while (wakeup := state.next_wakeup()) is not None and wakeup <= t:
            close_due(wakeup)
        state.record(shard_id, participant, t)
        close_due(t)
    while (wakeup := state.next_wakeup()) is not None:
        close_due(wakeup)
    late = {(opened.round_id, s, p) for p, shards in state.late.items() for s in shards}
    return closings, late


def _recorded_status(recording: Recording, key: ShardKey) -> str | None:
    summary = recording.closed.get(key[0])
    if summary is None:
        return None
    return next((o.status for o in summary.shards if o.shard_id == key[1]), None)


def _labels_of(body: bytes | None) -> dict[str, Label]:
    if body is None:
        return {}
    message = decode_reply(body)
    if not isinstance(message, PseudoLabels):
        raise ReplayError(f"expected PseudoLabels, found {type(message).__name__}")
    return {label.prompt_id: label for label in message.labels}


def _changes(
    round_id: int,
    shard_id: int,
    prompt_ids: list[str],
    recorded: bytes | None,
    replayed: bytes | None,
    abstain_reasons: Mapping[str, str],
) -> tuple[LabelChange, ...]:
    before, after = _labels_of(recorded), _labels_of(replayed)
    changes = []
    for prompt_id in sorted(prompt_ids):
        old, new = before.get(prompt_id), after.get(prompt_id)
        old_text = None if old is None else old.text
        new_text = None if new is None else new.text
        if old_text != new_text:
            reason = abstain_reasons.get(prompt_id, "shard failed" if replayed is None else "")
            changes.append(LabelChange(round_id, shard_id, prompt_id, old, new, reason))
    return tuple(changes)
