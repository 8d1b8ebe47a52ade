"""Typed coordinator settings: a TOML file, then environment overrides, validated on load."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import structlog
from msgspec import Meta

from broker.addresses import check_broker_urls
from common.settings import MetricsTable, SettingsError, read_settings
from coordinator.consensus import ConsensusSettings
from schemas.messages import GenerationParams, Id

__all__ = ["CoordinatorSettings", "SettingsError", "load_coordinator_settings", "settings_from_table"]

log = structlog.get_logger(__name__)

PositiveSeconds = Annotated[float, Meta(gt=0.0)]


class _Table(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings tables reject unknown keys, so a typo is an error rather than a silent default."""


class RoundSettings(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    rounds: Annotated[int, Meta(ge=0)] = 3  # 0: keep opening rounds until stopped
    prompts_per_round: Annotated[int, Meta(ge=1, le=100_000)] = 32
    shards: Annotated[int, Meta(ge=1, le=1024)] = 4
    # int: a count; float in (0, 1]: a fraction of the active members that are not sidelined. A shard
    # labels once quorum answered and grace_seconds passed. The default, 1.0, waits for every one of
    # them: a round then lasts as long as its slowest member, up to the straggler bound below (one
    # member can make every round that long on purpose). A fraction such as 0.75 labels grace_seconds
    # after that share answered, so the slowest quarter costs a round grace_seconds at most.
    quorum: int | float = 1.0
    min_participants: Annotated[int, Meta(ge=1)] = 1  # a round opens once this many are active
    deadline_seconds: PositiveSeconds = 600.0
    grace_seconds: Annotated[float, Meta(ge=0.0)] = 5.0
    # The straggler bound: once more than half of the members a shard waits for answered it, the rest get
    # at most max(grace_seconds, straggler_factor x the time that majority took) more; then the shard is
    # labelled without them (their answers are late: late_policy). So with the default, 1.0, a round
    # lasts at most twice what its majority needed (or grace_seconds more), whatever a minority does,
    # and a minority that does not answer a shard cannot fail it. Raise it for members known to be
    # much slower than the others; 0: no bound (the quorum holds until the deadline).
    straggler_factor: Annotated[float, Meta(ge=0.0, le=1_000.0)] = 1.0
    late_policy: Literal["drop", "carry", "revise"] = "revise"
    staleness_weight: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.5
    member_timeout_seconds: PositiveSeconds = 300.0
    # A member that left a shard of the round unanswered (in time and late) in this many rounds in a row
    # is sidelined: still asked, not waited for and not counted in the quorum, until it answers every shard
    # of a round again. 0: never sideline.
    sideline_after_missed_rounds: Annotated[int, Meta(ge=0, le=1_000)] = 2
    # After the last round, how long `run()` waits for its members' reports before it stops.
    final_reports_seconds: Annotated[float, Meta(ge=0.0, le=3_600.0)] = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        # msgspec reports a ValueError raised here with the table's path (`$.round`).
        quorum = self.quorum
        if isinstance(quorum, int) and quorum < 1:
            raise ValueError(f"quorum must be a count of at least 1 or a fraction in (0, 1], got {quorum!r}")
        if isinstance(quorum, float) and not 0.0 < quorum <= 1.0:
            raise ValueError(f"quorum as a fraction must be in (0, 1], got {quorum!r}")


class ConsensusSettingsTable(ConsensusSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[consensus]`: the consensus knobs (coordinator.consensus.ConsensusSettings, where each default
    and limit is explained) plus the neighbour search, the embedder and how votes are weighed."""

    index: Literal["hnsw", "exact"] = "hnsw"
    # "minilm-onnx": all-MiniLM-L6-v2 on ONNX Runtime (exported once into $CHORUS_CACHE_DIR/onnx; it gave the
    # same labels as "minilm" in bench/bench_embedding.py, faster); "minilm": the same model on torch
    # (sentence-transformers); "hashing": n-gram hashing, for tests; or a local sentence-transformers
    # directory (torch).
    embedder: str = "minilm-onnx"
    embed_batch_size: Annotated[int, Meta(ge=1, le=4_096)] = 32  # the ONNX batches are sorted by length
    # ONNX Runtime intra-op threads for "minilm-onnx". 0 (default): every CPU, at most 4, since consensus
    # embeds while the event loop mostly waits and the threads do not spin (bench/results/embedding.md has
    # the measurements). Set 1 to leave the other cores to a broker on the same machine.
    embed_threads: Annotated[int, Meta(ge=0, le=256)] = 0
    cache_entries: Annotated[int, Meta(ge=0)] = 200_000
    # "reputation" (the default): weight each member's answers by its past agreement with the labels
    # (relative to the most agreeing member, at least `reputation_floor`): see coordinator/reputation.py.
    # A weight only orders the answers a majority agrees with; it never makes one (consensus.py).
    # "uniform": every answer counts the same.
    vote_weighting: Literal["uniform", "reputation"] = "reputation"
    reputation_floor: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.1


class RecordingSettings(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = True
    directory: str = "records"
    rotate_bytes: Annotated[int, Meta(ge=4096)] = 256 * 1024 * 1024
    fsync: Literal["never", "rotate", "always"] = "rotate"
    # Dead-lettered messages recorded per sender and session (each with its body cut to 4 KiB); a
    # flood beyond that is counted, not written, so that it cannot fill the disk.
    rejected_frames_per_sender: Annotated[int, Meta(ge=0)] = 1_000


class CoordinatorSettings(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    federation: Id = "chorus"
    # One URL, or several nodes of one cluster: a list, or ";"-separated (broker.addresses).
    broker_url: str | list[str] = "memory://"
    state_path: str = "coordinator.sqlite3"
    prompts_path: str
    roster: list[Id] = []  # participants known up front; others may join
    strategy: str = "semantic"  # a name in coordinator.strategies.STRATEGIES, checked when built
    publish_timeout_seconds: PositiveSeconds = 10.0
    # Deliveries in flight per intake queue (one per member, and the lobby): bounds what one member's
    # traffic holds in coordinator memory at a time.
    prefetch: Annotated[int, Meta(ge=1, le=65_535)] = 32
    round: RoundSettings = RoundSettings()
    generation: GenerationParams = GenerationParams()
    consensus: ConsensusSettingsTable = ConsensusSettingsTable()
    recording: RecordingSettings = RecordingSettings()
    metrics: MetricsTable = MetricsTable()  # Prometheus /metrics and /healthz; off by default

    def __post_init__(self) -> None:
        # The strategy name is checked where the strategy is built (coordinator.strategies), so that
        # loading settings imports none of them.
        check_broker_urls(self.broker_url)


# (table, key) an earlier release read -> the key's name now (docs/changes.md): still read, with a warning.
RENAMED = {("round", "bench_after_missed_rounds"): "sideline_after_missed_rounds"}


def settings_from_table(raw: Mapping[str, object]) -> CoordinatorSettings:
    """`raw` (a settings file, chorus-run's [coordinator] table, a recording's settings) as settings:
    the one conversion every reader uses. Raises msgspec.ValidationError; callers say where it came from."""
    tables = dict(raw)
    for (table, old), new in RENAMED.items():
        given = tables.get(table)
        if isinstance(given, Mapping) and old in given and new not in given:
            log.warning("setting_renamed", setting=f"{table}.{old}", now=f"{table}.{new}")
            tables[table] = {new if key == old else key: value for key, value in given.items()}
    return msgspec.convert(tables, CoordinatorSettings)


# Environment variable -> top-level key it overrides.
ENV_OVERRIDES = {
    "CHORUS_BROKER_URL": "broker_url",
    "CHORUS_STATE_PATH": "state_path",
    "CHORUS_FEDERATION": "federation",
}


def load_coordinator_settings(
    path: Path, env: Mapping[str, str] | None = None, **overrides: object
) -> CoordinatorSettings:
    """Read `path`, apply environment then keyword overrides, resolve paths against the file's folder."""
    raw = read_settings(path, ENV_OVERRIDES, ("prompts_path", "state_path"), env, overrides)
    recording = raw.get("recording")
    if isinstance(recording, dict) and isinstance(recording.get("directory"), str):
        recording["directory"] = str((path.parent / recording["directory"]).resolve())
    try:
        return settings_from_table(raw)
    except msgspec.ValidationError as e:
        raise SettingsError(f"{path}: {e}") from e
