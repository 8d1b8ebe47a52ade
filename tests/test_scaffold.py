"""`chorus-run init DIR`: the federation it writes loads as every tool reads it, and runs.

The test scaffolds with tiny models and the hashing embedder so that its federation runs in seconds on
the embedded broker; a user's default is SmolLM2 and the MiniLM encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.cli_processes import set_key

from common.exits import EXIT_OK, EXIT_USAGE
from coordinator.prompts import load_prompts
from coordinator.settings import load_coordinator_settings
from federation import cli
from federation.config import load_run_config
from participant import cli as participant_cli
from participant.settings import load_participant_settings
from participant.wiring import load_data

pytestmark = pytest.mark.usefixtures("restore_logging", "one_torch_thread")

SITES = ["site-1", "site-2", "site-3"]


def test_init_writes_a_federation_that_loads_and_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "fed"
    assert cli.main(["init", str(target), "--model", "tiny-llama", "--embedder", "hashing"]) == EXIT_OK
    assert "chorus-run" in capsys.readouterr().out

    # By hand: each service's settings, from any working directory, with the URL from the environment.
    coordinator = load_coordinator_settings(
        target / "coordinator" / "coordinator.toml", env={"CHORUS_BROKER_URL": "amqp://c:pw@mq:5672/chorus"}
    )
    assert coordinator.roster == SITES and coordinator.round.min_participants == 3
    assert Path(coordinator.state_path) == target.resolve() / "coordinator" / "state" / "coordinator.sqlite3"
    public = {p.text for p in load_prompts(Path(coordinator.prompts_path))}
    assert len(public) >= 24
    private_prompts: set[str] = set()
    for site in SITES:
        settings = load_participant_settings(target / site / "participant.toml", env={})
        assert settings.participant_id == site and settings.model == "tiny-llama"
        train, test = load_data(settings)
        assert len(train) == 24 and len(test) == 6
        private_prompts |= {e.prompt for e in train + test}
        for line in (target / site / "private.jsonl").read_text().splitlines():
            assert set(json.loads(line)) == {"prompt", "response"}  # the format accepted everywhere
    assert not public & private_prompts  # the public set shares no prompt with any site's data
    readme = (target / "README.md").read_text()
    assert "CHORUS_BROKER_URL=" in readme and "--broker" not in readme  # no password on a command line
    assert all(f"--config {site}/participant.toml" in readme for site in SITES)

    # In one process: the chorus-run config it wrote, as the README says to run it.
    run_config = target / "chorus-run.toml"
    assert [p.id for p in load_run_config(run_config).run.participants] == SITES
    set_key(run_config, "min_confidence", -1.0)  # hashing similarities of random models are low
    results = target / "results"
    assert cli.main([str(run_config), "--results", str(results), "--rounds", "1"]) == EXIT_OK
    summary = json.loads((results / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["error"] is None
    assert set(summary["participants"]) == set(SITES)
    # What the README's "Afterwards" does, on the state chorus-run kept.
    exported = target / "site-1-merged"
    state = results / "state" / "site-1"
    export = ["export", "--state-dir", str(state), "--out", str(exported), "--merged"]
    assert participant_cli.main(export) == 0
    assert (exported / "model.safetensors").is_file() and (exported / "tokenizer_config.json").is_file()


def test_init_refuses_a_folder_that_is_not_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mine.txt").write_text("keep")
    assert cli.main(["init", str(tmp_path)]) == EXIT_USAGE
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep"
