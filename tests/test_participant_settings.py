"""Participant settings: typed, validated, one file serving several participants."""

from __future__ import annotations

from pathlib import Path

import pytest

from participant.cli import apply_torch_threads
from participant.settings import SettingsError, load_participant_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "participant.toml"
    path.write_text(text)
    return path


def test_participant_id_in_paths_gives_each_participant_its_own(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        'participant_id = "alice"\nstate_dir = "state/{participant_id}"\n'
        'private_data = "data/{participant_id}.jsonl"\n',
    )
    alice = load_participant_settings(config, env={})
    bob = load_participant_settings(config, env={}, participant_id="bob")
    assert alice.state_dir == str(tmp_path / "state" / "alice")
    assert bob.state_dir == str(tmp_path / "state" / "bob")
    assert bob.private_data == str(tmp_path / "data" / "bob.jsonl")


def test_environment_and_errors(tmp_path: Path) -> None:
    config = write(tmp_path, 'participant_id = "alice"\n')
    settings = load_participant_settings(config, env={"CHORUS_BROKER_URL": "amqp://alice:pw@h:1/v"})
    assert settings.broker_url == "amqp://alice:pw@h:1/v"
    with pytest.raises(SettingsError, match="participant_id"):
        load_participant_settings(write(tmp_path, 'participant_id = "a.b"\n'), env={})
    with pytest.raises(SettingsError, match="unknown field"):
        load_participant_settings(write(tmp_path, 'participant_id = "a"\nmodle = "x"\n'), env={})


def test_torch_threads_setting_pins_torch_and_zero_keeps_the_default(tmp_path: Path) -> None:
    import torch

    settings = load_participant_settings(write(tmp_path, 'participant_id = "a"\ntorch_threads = 1\n'), env={})
    assert settings.torch_threads == 1
    assert load_participant_settings(write(tmp_path, 'participant_id = "a"\n'), env={}).torch_threads == 0
    with pytest.raises(SettingsError, match="torch_threads"):
        load_participant_settings(write(tmp_path, 'participant_id = "a"\ntorch_threads = -1\n'), env={})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        apply_torch_threads(0)
        assert torch.get_num_threads() == 2
        apply_torch_threads(settings.torch_threads)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
