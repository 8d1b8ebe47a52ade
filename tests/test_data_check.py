"""`chorus-data check` as a user runs it: a real process, its output and its exit status."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
OWN_DATA = ROOT / "examples" / "own-data"


def chorus_data(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The installed console script when there is one (it is what the README names), else the module."""
    script = Path(sys.executable).parent / "chorus-data"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "federation.data_cli"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(
        [*command, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_the_shipped_own_data_example_is_clean() -> None:
    done = chorus_data(
        "check", OWN_DATA / "alice.json", OWN_DATA / "bob.jsonl",
        "--test", OWN_DATA / "test.jsonl", "--public", OWN_DATA / "public_prompts.jsonl",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "alice.json (private): 6 examples; format alpaca (6); json array" in out
    assert "bob.jsonl (private): 6 examples; format chat (6); jsonl" in out
    assert "test.jsonl (test): 3 examples; format prompt_response (3); jsonl" in out
    assert "public_prompts.jsonl (public): 10 prompts" in out
    assert "prompt:   What does `abs(-3)` return?" in out  # the sample
    assert "prompt words" in out and "response characters" in out  # lengths without a model
    assert "1 chat records have a system message" in out and "1 chat records are multi-turn" in out
    assert out.rstrip().endswith("errors: 0, warnings: 0")


def test_duplicates_and_overlap_are_warnings_and_strict_makes_them_fail(tmp_path: Path) -> None:
    private = jsonl(
        tmp_path / "private.jsonl",
        [
            {"prompt": "What is 2+2?", "response": "4"},
            {"prompt": "what is  2+2?", "response": "4"},  # the same, but for case and spacing
            {"prompt": "Capital of Peru?", "response": "Lima"},
            {"prompt": "Capital of Peru?", "response": "Lima, on the coast"},
        ],
    )
    test = jsonl(tmp_path / "test.jsonl", [{"prompt": "What is 2+2?", "response": "4"}])
    public = jsonl(tmp_path / "public.jsonl", [{"prompt_id": "q1", "prompt": "Capital of Peru?"}])
    done = chorus_data("check", private, "--test", test, "--public", public)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "warning: duplicates: 1 examples repeat another one" in out
    assert f"{private}:1, {private}:2" in out
    assert "warning: 1 prompts have different responses" in out
    assert "(private) and " in out and "measure memory of the private data" in out
    assert f"e.g. {private}:1 and {test}:1" in out
    assert "can repeat its private responses" in out and f"{public} prompt_id q1" in out
    assert "errors: 0, warnings: 4" in out
    strict = chorus_data("check", private, "--test", test, "--public", public, "--strict")
    assert strict.returncode == 1 and "--strict" in strict.stderr


def test_a_bad_line_exits_1_naming_file_line_and_formats(tmp_path: Path) -> None:
    good = jsonl(tmp_path / "good.jsonl", [{"instruction": "i", "output": "o"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    done = chorus_data("check", good, bad)
    assert done.returncode == 1
    assert f"error: {bad}:2: no assistant turn" in done.stdout
    assert "accepted formats: prompt_response" in done.stdout
    assert "good.jsonl (private): 1 examples; format alpaca (1)" in done.stdout  # the others still checked
    assert done.stderr.strip().endswith("problems make these files unusable (see above)")


def test_missing_empty_and_bad_public_files_are_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    public = tmp_path / "public.jsonl"
    public.write_text('{"prompt": "no id"}\n')
    done = chorus_data("check", tmp_path / "absent.jsonl", empty, "--public", public)
    assert done.returncode == 1
    assert "cannot read" in done.stdout and "absent.jsonl" in done.stdout
    assert f"error: {empty} holds no examples" in done.stdout
    assert f"{public}:1" in done.stdout and "prompt_id" in done.stdout
    assert "errors: 3" in done.stdout


def test_an_explicit_format_and_a_bad_command_line(tmp_path: Path) -> None:
    data = jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    assert chorus_data("check", data, "--format", "chat").returncode == 1
    assert chorus_data("check", data, "--format", "prompt_response").returncode == 0
    usage = chorus_data("check", data, "--format", "csv")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
    assert chorus_data("check").returncode == 2


@pytest.mark.slow
def test_lengths_in_tokens_of_a_named_model(tmp_path: Path) -> None:
    data = jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hello " * 40}, {"role": "assistant", "content": "hi"}]}],
    )
    done = chorus_data("--log-level", "warning", "check", data, "--model", "tiny-llama", "--max-length", "16")
    assert done.returncode == 0, done.stderr
    assert "lengths in tokens of tiny-llama" in done.stdout
    assert "prompt tokens" in done.stdout and "total tokens" in done.stdout
    assert "the model sees: " in done.stdout  # the prompt with the chat template around it
    assert "longer than max_length 16 tokens" in done.stdout
    unknown = chorus_data("check", data, "--model", str(tmp_path / "no-such-model"))
    assert unknown.returncode == 1 and "chorus-data: error: model directory" in unknown.stderr


def test_the_examples_folder_can_be_checked_from_anywhere(tmp_path: Path) -> None:
    """Relative paths are against the working directory, as a user types them."""
    shutil.copy(OWN_DATA / "bob.jsonl", tmp_path / "bob.jsonl")
    done = chorus_data("check", "bob.jsonl", cwd=tmp_path)
    assert done.returncode == 0 and "bob.jsonl (private): 6 examples" in done.stdout
