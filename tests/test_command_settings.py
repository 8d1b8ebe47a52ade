"""A `command` black box from a settings file: its relative paths are against the file's folder (as
every path in a settings file is), whatever the working directory; its model id is the script's
name or the file's `model_id`, not the interpreter's. And a model path that does not exist says so."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from participant.learner import command_model_id
from participant.models import ModelNotInstalledError, load_model
from participant.settings import SettingsError, load_participant_settings
from participant.wiring import build_learner
from schemas.messages import GenerationParams

ANSWER_PY = "import sys\nprint(open('prefix.txt').read().strip() + ' ' + sys.stdin.read().upper())\n"


def site(tmp_path: Path, **keys: object) -> Path:
    """A settings folder holding answer.py (which reads prefix.txt beside it) and answer.sh."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "answer.py").write_text(ANSWER_PY)
    (folder / "prefix.txt").write_text("ANSWER:")
    script = folder / "answer.sh"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} answer.py\n")
    script.chmod(0o755)
    lines = ['participant_id = "alice"'] + [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    (folder / "participant.toml").write_text("\n".join(lines) + "\n")
    return folder / "participant.toml"


def answer(settings_file: Path) -> tuple[str, str]:
    learner = build_learner(load_participant_settings(settings_file, env={}))
    [reply] = learner.generate([("q1", "hello")], GenerationParams())
    return learner.model_id, reply.text


@pytest.mark.parametrize(
    ("command", "model_id"),
    [([sys.executable, "answer.py"], "answer.py"), (["./answer.sh"], "answer.sh")],
)
def test_relative_paths_of_a_command_are_against_the_settings_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str], model_id: str
) -> None:
    settings_file = site(tmp_path, command=command)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither answer.py nor prefix.txt is here
    assert answer(settings_file) == (model_id, "ANSWER: HELLO")


def test_the_settings_can_name_the_command_s_model(tmp_path: Path) -> None:
    settings_file = site(tmp_path, command=["python3", "answer.py"], model_id="my-ranker-v2")
    assert answer(settings_file)[0] == "my-ranker-v2"


def test_command_dir_names_another_folder(tmp_path: Path) -> None:
    settings_file = site(tmp_path, command=["python3", "answer.py"], command_dir="work")
    work = settings_file.parent / "work"
    work.mkdir()
    (work / "answer.py").write_text(ANSWER_PY)
    (work / "prefix.txt").write_text("FROM WORK:")
    assert answer(settings_file)[1] == "FROM WORK: HELLO"


def test_model_id_without_a_command_is_refused(tmp_path: Path) -> None:
    settings_file = site(tmp_path, model="tiny-llama", model_id="x")
    with pytest.raises(SettingsError, match="model_id names a `command` black box"):
        load_participant_settings(settings_file, env={})


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["python3", "-u", "bin/answer.py", "--fast"], "answer.py"),
        (["/usr/bin/env", "python3", "answer.py"], "answer.py"),
        (["node", "serve.js"], "serve.js"),
        (["ollama", "run", "llama3"], "ollama"),
        (["/opt/models/ranker"], "ranker"),
        (["python3"], "python3"),
    ],
)
def test_a_command_s_default_model_id_is_its_script(argv: list[str], expected: str) -> None:
    assert command_model_id(argv) == expected


def test_a_model_directory_that_does_not_exist_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "my-llama"
    with pytest.raises(ModelNotInstalledError, match=rf"model directory {missing} does not exist$"):
        load_model(str(missing))
    settings_file = site(tmp_path, model="../models/my-llama")  # as written in a settings file
    settings = load_participant_settings(settings_file, env={})
    with pytest.raises(ModelNotInstalledError, match="does not exist"):
        load_model(settings.model)
    (tmp_path / "models").mkdir()
    missing.write_text("not a folder")
    with pytest.raises(ModelNotInstalledError, match="is a file, not a Hugging Face model directory"):
        load_model(str(missing))


def test_a_registry_name_that_is_unknown_still_lists_the_choices() -> None:
    with pytest.raises(ModelNotInstalledError, match="unknown model 'smollm-135m'"):
        load_model("smollm-135m")
