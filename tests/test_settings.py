"""Settings are validated on load: every bound of every key, just outside it, is refused with a message
that names the key and the allowed range (and just inside it, loads)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from structlog.testing import capture_logs

from coordinator.settings import CoordinatorSettings, SettingsError, load_coordinator_settings
from participant.settings import ParticipantSettings, load_participant_settings

REQUIRED: dict[type, dict[str, str]] = {
    CoordinatorSettings: {"prompts_path": "p.jsonl"},
    ParticipantSettings: {"participant_id": "alice"},
}


def numeric_bounds(kind: type) -> Iterator[tuple[tuple[str, ...], Any, Any, str]]:
    """(key path, a value outside the bound, one inside it, the bound as msgspec words it) per bound."""

    def walk(info: mi.StructType, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any, Any, str]]:
        for field in info.fields:
            key = (*path, field.name)
            t = field.type
            if isinstance(t, mi.StructType):
                yield from walk(t, key)
            elif isinstance(t, mi.IntType | mi.FloatType):
                step: Any = 1 if isinstance(t, mi.IntType) else 1e-3
                if t.ge is not None:
                    yield key, t.ge - step, t.ge, f">= {t.ge}"
                if t.gt is not None:
                    yield key, t.gt, t.gt + step, f"> {t.gt}"
                if t.le is not None:
                    yield key, t.le + step, t.le, f"<= {t.le}"
                if t.lt is not None:
                    yield key, t.lt, t.lt - step, f"< {t.lt}"

    info = mi.type_info(kind)
    assert isinstance(info, mi.StructType)
    yield from walk(info, ())


def toml(values: dict[str, Any]) -> str:
    top = {k: v for k, v in values.items() if not isinstance(v, dict)}
    lines = [f"{k} = {json.dumps(v)}" for k, v in top.items()]
    for table, entries in values.items():
        if isinstance(entries, dict):
            lines.append(f"[{table}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in entries.items()]
    return "\n".join(lines) + "\n"


def settings_file(tmp_path: Path, kind: type, key: tuple[str, ...], value: Any) -> Path:
    values: dict[str, Any] = dict(REQUIRED[kind])
    target = values
    for part in key[:-1]:
        target = target.setdefault(part, {})
    target[key[-1]] = value
    path = tmp_path / "settings.toml"
    path.write_text(toml(values))
    return path


def load(kind: type, path: Path) -> Any:
    if kind is CoordinatorSettings:
        return load_coordinator_settings(path, env={})
    return load_participant_settings(path, env={})


CASES = [
    (kind, *bound) for kind in (CoordinatorSettings, ParticipantSettings) for bound in numeric_bounds(kind)
]


@pytest.mark.parametrize(
    ("kind", "key", "outside", "inside", "bound"),
    CASES,
    ids=[f"{c[0].__name__}.{'.'.join(c[1])}" for c in CASES],
)
def test_each_bound_is_enforced_with_a_message_naming_key_and_range(
    tmp_path: Path, kind: type, key: tuple[str, ...], outside: Any, inside: Any, bound: str
) -> None:
    with pytest.raises(SettingsError) as refused:
        load(kind, settings_file(tmp_path, kind, key, outside))
    message = str(refused.value)
    assert f"$.{'.'.join(key)}" in message and bound in message
    load(kind, settings_file(tmp_path, kind, key, inside))


@pytest.mark.parametrize("quorum", [0, -1, 2.5, 0.0, -0.5])
def test_a_quorum_that_could_never_be_met_is_refused_on_load(tmp_path: Path, quorum: object) -> None:
    with pytest.raises(SettingsError, match=r"quorum .*(at least 1|\(0, 1\]).* - at `\$\.round`"):
        load(CoordinatorSettings, settings_file(tmp_path, CoordinatorSettings, ("round", "quorum"), quorum))


@pytest.mark.parametrize("quorum", [1, 7, 0.01, 1.0])
def test_a_quorum_count_or_fraction_loads(tmp_path: Path, quorum: object) -> None:
    settings = load(
        CoordinatorSettings, settings_file(tmp_path, CoordinatorSettings, ("round", "quorum"), quorum)
    )
    assert isinstance(settings, CoordinatorSettings) and settings.round.quorum == quorum


def test_an_unknown_key_is_an_error_that_names_it(tmp_path: Path) -> None:
    path = tmp_path / "settings.toml"
    path.write_text('prompts_path = "p.jsonl"\n[round]\nquorom = 2\n')
    with pytest.raises(SettingsError, match="quorom"):
        load(CoordinatorSettings, path)


NODES = ["amqp://u:pw@node-a:5672/chorus", "amqp://u:pw@node-b:5672/chorus"]


@pytest.mark.parametrize("kind", [CoordinatorSettings, ParticipantSettings])
def test_several_broker_addresses_load_as_a_list_or_from_the_environment(tmp_path: Path, kind: type) -> None:
    settings = load(kind, settings_file(tmp_path, kind, ("broker_url",), NODES))
    assert settings.broker_url == NODES
    path = settings_file(tmp_path, kind, ("federation",), "f")
    env = {"CHORUS_BROKER_URL": ";".join(NODES)}
    loaded = (
        load_coordinator_settings(path, env=env)
        if kind is CoordinatorSettings
        else load_participant_settings(path, env=env)
    )
    assert loaded.broker_url == ";".join(NODES)  # split where it is used (broker.addresses)


@pytest.mark.parametrize("kind", [CoordinatorSettings, ParticipantSettings])
def test_addresses_of_different_logins_are_refused_on_load(tmp_path: Path, kind: type) -> None:
    other = [NODES[0], "amqp://v:pw@node-b:5672/chorus"]
    with pytest.raises(SettingsError, match="differ in user") as refused:
        load(kind, settings_file(tmp_path, kind, ("broker_url",), other))
    assert "pw@" not in str(refused.value)


@pytest.mark.parametrize(
    ("choice", "why"),
    [("surest", "was removed: a member's reported log-probability"), ("best", "must be one of")],
)
def test_a_label_rule_that_does_not_exist_is_refused_with_the_reason(
    tmp_path: Path, choice: str, why: str
) -> None:
    path = settings_file(tmp_path, CoordinatorSettings, ("consensus", "label_choice"), choice)
    with pytest.raises(SettingsError, match=why):
        load(CoordinatorSettings, path)


@pytest.mark.parametrize("share", [-0.1, 1.0])
def test_a_majority_share_outside_0_1_is_refused(tmp_path: Path, share: float) -> None:
    with pytest.raises(SettingsError, match="min_support_share"):
        load(
            CoordinatorSettings,
            settings_file(tmp_path, CoordinatorSettings, ("consensus", "min_support_share"), share),
        )


def test_the_consensus_table_is_the_consensus_settings_with_one_set_of_defaults(tmp_path: Path) -> None:
    from coordinator.consensus import ConsensusError, ConsensusSettings
    from coordinator.settings import ConsensusSettingsTable

    assert issubclass(ConsensusSettingsTable, ConsensusSettings)
    table, plain = ConsensusSettingsTable(), ConsensusSettings()
    assert {f: getattr(table, f) for f in plain.__struct_fields__} == msgspec.structs.asdict(plain)
    # One set of bounds, checked on load (with the key's path) and on construction in code alike.
    path = settings_file(tmp_path, CoordinatorSettings, ("consensus", "neighbours"), 0)
    with pytest.raises(SettingsError, match=r">= 1 - at `\$\.consensus\.neighbours`"):
        load(CoordinatorSettings, path)
    with pytest.raises(ConsensusError, match="neighbours must be >= 1, got 0"):
        ConsensusSettingsTable(neighbours=0)


def test_a_key_renamed_since_an_earlier_release_still_reads_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text('prompts_path = "p.jsonl"\n[round]\nbench_after_missed_rounds = 5\n')
    with capture_logs() as logs:
        settings = load_coordinator_settings(path)
    assert settings.round.sideline_after_missed_rounds == 5
    (warning,) = [entry for entry in logs if entry["event"] == "setting_renamed"]
    assert warning["now"] == "round.sideline_after_missed_rounds" and warning["log_level"] == "warning"
    # Both names at once is a mistake, not a rename: the old one is an unknown key.
    path.write_text(path.read_text() + "sideline_after_missed_rounds = 1\n")
    with pytest.raises(SettingsError, match="bench_after_missed_rounds"):
        load_coordinator_settings(path)
