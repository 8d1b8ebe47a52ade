"""`python -m bench.quality` on your own data: a chorus-run config without [task] runs as a grid of one
task, scored on its test_data; one without any test set is refused with one line naming what is missing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.quality import cli
from bench.quality.grid import GridError, load_grid, seeded

OWN_DATA = Path(__file__).resolve().parent.parent / "examples" / "own-data"

pytestmark = pytest.mark.usefixtures("restore_logging")


def own_data_config(tmp_path: Path, *, test_data: bool = True) -> Path:
    """examples/own-data/ with tiny models and the hashing embedder, so that it runs in seconds."""
    folder = tmp_path / "own-data"
    shutil.copytree(OWN_DATA, folder)
    config = folder / "chorus-run.toml"
    text = config.read_text().replace("smollm2-135m-instruct", "tiny-llama")
    text = text.replace('embedder = "minilm"', 'embedder = "hashing"')
    if not test_data:
        text = text.replace('test_data = "test.jsonl"', "")
    config.write_text(text)
    return config


def test_an_own_data_config_runs_as_a_grid_of_one_task(tmp_path: Path) -> None:
    config = own_data_config(tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [str(config), "--quick", "--methods", "local,medoid", "--out", str(out), "--work", str(work)]
    assert cli.main(argv) == 0
    report = json.loads((out / "quality.json").read_text())
    assert report["failed_runs"] == []
    task = report["tasks"]["own-data"]  # named by its federation
    assert set(task["methods"]) == {"local", "medoid"}
    test_lines = (config.parent / "test.jsonl").read_text().splitlines()
    assert task["test_prompts"] == [len([line for line in test_lines if line.strip()])]
    assert set(task["differences"]["medoid"]) == {"local"}


def test_a_seed_of_own_data_changes_training_only(tmp_path: Path) -> None:
    grid = load_grid(own_data_config(tmp_path))
    config = seeded(next(iter(grid.tasks.values())), 2)
    assert config.run.task is None and config.run.train.seed == 2


def test_own_data_without_any_test_set_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = own_data_config(tmp_path, test_data=False)
    with pytest.raises(GridError, match="test_data"):
        load_grid(config)
    assert cli.main([str(config), "--quick", "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m bench.quality: error: ") and err.count("\n") == 1
    assert "test_data" in err and str(config) in err
