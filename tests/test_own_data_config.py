"""Own data in `chorus-run` and participant settings: one key name in both places (the old run-config
name still loads, with a warning), optional test data (not evaluated, and said so), a format setting,
and the shipped own-data example run end to end on tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from federation import cli
from federation.config import RunConfigError, load_run_config
from federation.data import prepare_data
from federation.settings import participant_settings
from participant.data import Example
from participant.settings import load_participant_settings
from participant.wiring import load_data

ROOT = Path(__file__).resolve().parent.parent
OWN_DATA = ROOT / "examples" / "own-data"

pytestmark = pytest.mark.usefixtures("restore_logging")


def write_config(tmp_path: Path, participants: str, top: str = 'prompts_path = "public.jsonl"\n') -> Path:
    (tmp_path / "public.jsonl").write_text('{"prompt_id": "p1", "prompt": "Hi?"}\n')
    (tmp_path / "alice.jsonl").write_text(
        '{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n'
    )
    (tmp_path / "test.jsonl").write_text('{"instruction": "t", "output": "u"}\n')
    path = tmp_path / "run.toml"
    path.write_text(top + participants)
    return path


def test_private_data_is_the_run_configs_name_too(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[[participants]]\nid = "alice"\nprivate_data = "alice.jsonl"\n')
    with capture_logs() as logs:
        entry = load_run_config(path).run.participants[0]
    assert entry.private_data == str(tmp_path / "alice.jsonl") and entry.test_data is None
    assert not [line for line in logs if line["event"] == "deprecated_key"]


def test_train_data_still_loads_with_a_warning(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[[participants]]\nid = "alice"\ntrain_data = "alice.jsonl"\n'
        '[[participants]]\nid = "bob"\ntrain_data = "alice.jsonl"\n',
    )
    with capture_logs() as logs:
        config = load_run_config(path)
    assert [e.private_data for e in config.run.participants] == [str(tmp_path / "alice.jsonl")] * 2
    warnings = [line for line in logs if line["event"] == "deprecated_key"]
    assert len(warnings) == 1  # once per key, not per participant
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["key"] == "train_data" and warnings[0]["use"] == "private_data"
    assert warnings[0]["file"] == str(path)


def test_both_names_at_once_is_an_error(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, '[[participants]]\nid = "alice"\ntrain_data = "alice.jsonl"\nprivate_data = "alice.jsonl"\n'
    )
    with pytest.raises(RunConfigError, match="'alice' gives both 'train_data' and 'private_data'"):
        load_run_config(path)


def test_what_is_still_required_without_a_task(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[[participants]]\nid = "alice"\n')
    with pytest.raises(RunConfigError, match=r"each participant's private_data \(missing for: alice\)"):
        load_run_config(path)
    path = write_config(tmp_path, '[[participants]]\nid = "alice"\nprivate_data = "alice.jsonl"\n', top="")
    with pytest.raises(RunConfigError, match=r"give prompts_path .*\(missing for: prompts_path\)"):
        load_run_config(path)
    # a member that does not train needs no private data
    path = write_config(tmp_path, '[[participants]]\nid = "frozen"\n[participants.train]\nmethod = "none"\n')
    assert load_run_config(path).run.participants[0].private_data is None


def test_a_run_member_without_test_data_is_not_evaluated(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[[participants]]\nid = "alice"\nprivate_data = "alice.jsonl"\n'
        '[[participants]]\nid = "bob"\nprivate_data = "alice.jsonl"\ntest_data = "test.jsonl"\n'
        'data_format = "auto"\n',
    )
    config = load_run_config(path)
    data = prepare_data(config, tmp_path / "results")
    alice, bob = (
        participant_settings(config, e, data, tmp_path / "results") for e in config.run.participants
    )
    with capture_logs() as logs:
        train, test = load_data(alice)
    assert len(train) == 2 and test == []  # nothing of the private data is held out in its place
    assert [line["participant"] for line in logs if line["event"] == "not_evaluated"] == ["alice"]
    assert load_data(bob) == ([Example("a", "b"), Example("c", "d")], [Example("t", "u")])


def test_participant_settings_take_the_same_keys_and_a_format(tmp_path: Path) -> None:
    (tmp_path / "chat.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    )
    settings_file = tmp_path / "participant.toml"
    settings_file.write_text(
        'participant_id = "bob"\nprivate_data = "chat.jsonl"\ndata_format = "chat"\ntest_fraction = 0\n'
    )
    settings = load_participant_settings(settings_file)
    with capture_logs() as logs:
        assert load_data(settings) == ([Example("q", "a")], [])
    assert [line["event"] for line in logs] == ["not_evaluated"]
    settings_file.write_text('participant_id = "bob"\nprivate_data = "chat.jsonl"\ndata_format = "csv"\n')
    with pytest.raises(Exception, match="data_format"):
        load_participant_settings(settings_file)


def test_the_shipped_own_data_run_on_tiny_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """examples/own-data/chorus-run.toml as docs/own-data.md shows it, with tiny models for speed."""
    folder = tmp_path / "own-data"
    shutil.copytree(OWN_DATA, folder)
    config = folder / "chorus-run.toml"
    text = config.read_text()
    text = text.replace('model = "smollm2-135m-instruct"', 'model = "tiny-llama"', 1)
    text = text.replace('model = "smollm2-135m-instruct"', 'model = "tiny-gpt2"', 1)
    text = text.replace('embedder = "minilm"', 'embedder = "hashing"')
    text = text.replace("max_new_tokens = 48", "max_new_tokens = 8").replace("rounds = 3", "rounds = 1")
    # Tiny random models answer noise: label it anyway (as examples/tiny.toml does), so the run has labels.
    loose = ("min_confidence = -1.0", "outlier_similarity = -1.0", "support_similarity = -1.0")
    text += "\n[coordinator.consensus]\n" + "\n".join(loose) + "\n"
    config.write_text(text)
    results = tmp_path / "results"
    assert cli.main([str(config), "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "bob: no test_data, so it is not evaluated" in out
    summary = json.loads((results / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    assert summary["participants"]["alice"]["last_rouge_l"] is not None
    assert summary["participants"]["bob"]["last_rouge_l"] is None
    assert summary["participants"]["bob"]["rounds_answered"] == 1


def test_the_own_data_page_shows_the_shipped_own_data_files_verbatim() -> None:
    section = (ROOT / "docs" / "own-data.md").read_text()  # the whole page is the section
    for name in ("chorus-run.toml", "participant.toml"):
        assert f"```toml\n{(OWN_DATA / name).read_text()}```" in section, name
    for key in ("private_data", "test_data", "data_format", "prompts_path", "train_data", "test_fraction"):
        assert f"`{key}`" in section, key
