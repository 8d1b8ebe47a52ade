"""The stdlib docstring benchmark: harvesting, splits, writers, CLI."""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest

from coordinator.prompts import load_prompts
from federation.stdlib_task import TaskError
from federation.stdlib_task import cli as task_cli
from federation.stdlib_task import harvest as sd
from federation.stdlib_task.harvest import first_sentence
from federation.stdlib_task.split import Task, build_task, home_fraction, resolve_families


@pytest.fixture(scope="module")
def task() -> Task:
    return build_task(n_participants=4, seed=3)


def ids(examples: list[sd.Example]) -> set[str]:
    return {e.prompt_id for e in examples}


def private_ids(task: Task, pid: str) -> set[str]:
    return ids(task.train[pid]) | ids(task.local_test[pid])


# ---- harvesting ----------------------------------------------------------------------


def test_reference_is_the_first_docstring_sentence_of_textwrap_dedent() -> None:
    harvest = sd.harvest_module("textwrap", "text")
    dedent = next(e for e in harvest.examples if e.prompt_id == "textwrap.dedent")
    expected = inspect.cleandoc(textwrap.dedent.__doc__ or "").split("\n")[0]
    assert dedent.reference == expected.replace("``", "`")
    assert dedent.reference.startswith("Remove any common leading whitespace")
    assert dedent.prompt == "In one sentence, what does the Python function `textwrap.dedent(text)` do?"


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ("Return the square root of x.", ("Return the square root of x.", "ok")),
        ("Split it, e.g. on commas. Then more.", ("Split it, e.g. on commas.", "ok")),
        ("Join   the\n    path parts\n  together.\n\nDetails.", ("Join the path parts together.", "ok")),
        # An old-style signature line is metadata: the sentence after it is the reference.
        ("strftime(format[, tuple]) -> string\n\nConvert a time tuple to a string.", None),
        ("sleep(seconds)\n\nDelay execution for a number of seconds.", None),
        ("time() -> floating point number", (None, "signature_line")),
        ("log(z[, base]) -> the logarithm of z to the given base.\nMore.", (None, "signature_line")),
        ("repeat(x) -> create an iterator which\nreturns x.", (None, "signature_line")),
        ("Find n!.", (None, "too_short")),
        (" ".join(["word"] * 41) + ".", (None, "too_long")),
        ("Return one of the following:\n\n- a\n- b", (None, "incomplete")),
        (None, (None, "no_docstring")),
        ("   ", (None, "no_docstring")),
    ],
)
def test_first_sentence(doc: str | None, expected: tuple[str | None, str] | None) -> None:
    if expected is None:  # a stripped signature line: the prose sentence after it
        sentence, reason = first_sentence(doc)
        assert reason == "ok" and sentence is not None and not sentence.startswith(("strftime", "sleep"))
        return
    assert first_sentence(doc) == expected


def test_a_class_opening_with_a_bare_constructor_signature_is_skipped() -> None:
    doc = "datetime(year, month, day)\n\nThe year, month and day arguments are required."
    assert first_sentence(doc, is_class=True) == (None, "signature_line")


def test_prompts_are_free_of_memory_addresses_and_builtins_get_an_ellipsis() -> None:
    harvest = sd.harvest(resolve_families(None, None))
    assert not [e.prompt for e in harvest.examples if " at 0x" in e.prompt]
    no_signature = [e for e in harvest.examples if "(...)" in e.prompt]
    assert no_signature, "some C callables have no inspectable signature"


def test_references_are_unique_and_within_the_word_limits(task: Task) -> None:
    references = [e.reference for e in task.harvest.examples]
    assert len(references) == len(set(references))
    assert all(sd.MIN_WORDS <= len(r.split()) <= sd.MAX_WORDS for r in references)


def test_a_module_that_fails_to_import_is_named_in_the_error() -> None:
    with pytest.raises(TaskError, match="no_such_module_xyz"):
        build_task(modules=["json", "no_such_module_xyz"])


def test_any_importable_module_works_and_unknown_modules_get_their_package_as_family() -> None:
    task = build_task(modules=["json", "msgspec.json"], n_participants=2)
    assert {e.family for e in task.harvest.examples} == {"data", "msgspec"}


# ---- splits -----------------------------------------------------------------------------


def test_same_seed_same_task_other_seed_other_split(task: Task) -> None:
    again = build_task(n_participants=4, seed=3)
    assert again.train == task.train and again.public == task.public and again.test == task.test
    other = build_task(n_participants=4, seed=4)
    assert ids(other.public) != ids(task.public)


def test_every_example_lands_in_exactly_one_set(task: Task) -> None:
    sets = [ids(task.public), ids(task.test)] + [private_ids(task, pid) for pid in task.participants]
    assert sum(len(s) for s in sets) == len(task.harvest.examples)
    assert set().union(*sets) == ids(task.harvest.examples)


def test_public_prompts_are_in_no_private_set_and_not_in_test(task: Task) -> None:
    public = ids(task.public)
    assert public
    assert not public & ids(task.test)
    for pid in task.participants:
        assert not public & private_ids(task, pid)
    public_refs = {e.reference for e in task.public}
    assert not public_refs & {e.reference for e in task.test}


def test_global_test_covers_every_family(task: Task) -> None:
    assert {e.family for e in task.test} == {e.family for e in task.harvest.examples}


@pytest.mark.parametrize("n_participants", [2, 4, 10])
def test_family_split_gives_each_participant_mostly_its_own_families(n_participants: int) -> None:
    task = build_task(n_participants=n_participants, seed=0)
    for pid in task.participants:
        homes = task.home_families[pid]
        assert homes
        assert home_fraction(task.train[pid], homes) > 0.5, (pid, homes)


def test_dirichlet_split_is_a_deterministic_partition_of_the_private_pool() -> None:
    task = build_task(n_participants=5, split="dirichlet", alpha=0.3, seed=1)
    again = build_task(n_participants=5, split="dirichlet", alpha=0.3, seed=1)
    assert task.train == again.train
    private = [private_ids(task, pid) for pid in task.participants]
    assert sum(map(len, private)) == len(set().union(*private))
    assert all(task.home_families[pid] for pid in task.participants if task.train[pid])


def mean_top_share(task: Task) -> float:
    """How much of each family its largest holder has, averaged over families."""
    shares = []
    for family in {e.family for e in task.harvest.examples}:
        held = [sum(e.family == family for e in task.train[pid]) for pid in task.participants]
        shares.append(max(held) / sum(held))
    return sum(shares) / len(shares)


def test_dirichlet_alpha_controls_how_concentrated_families_are() -> None:
    skewed = build_task(n_participants=5, split="dirichlet", alpha=0.05)
    even = build_task(n_participants=5, split="dirichlet", alpha=100.0)
    assert mean_top_share(skewed) > 0.6 > 0.35 > mean_top_share(even)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_participants": 0},
        {"public_fraction": 0.6, "test_fraction": 0.5},
        {"split": "round_robin"},
        {"alpha": 0.0},
        {"modules": []},
    ],
)
def test_bad_configuration_is_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(TaskError):
        build_task(**kwargs)  # type: ignore[arg-type]


# ---- files and CLI ----------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_cli_writes_the_task_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "task"
    assert (
        task_cli.main(["--out", str(out), "--participants", "3", "--modules", "json,csv,textwrap,heapq"]) == 0
    )
    printed = capsys.readouterr().out
    assert "participant" in printed and "p02" in printed

    summary = json.loads((out / "task.json").read_text())
    assert summary["python_version"] and summary["config"]["n_participants"] == 3
    counts = summary["counts"]
    for pid in ("p00", "p01", "p02"):
        train = read_jsonl(out / "participants" / pid / "train.jsonl")
        test = read_jsonl(out / "participants" / pid / "test.jsonl")
        assert all(set(row) == {"prompt", "response"} for row in train + test)
        assert len(train) == counts["per_participant"][pid]["train"]
    public = read_jsonl(out / "public_prompts.jsonl")
    assert all(set(row) == {"prompt_id", "prompt"} for row in public)
    assert len(public) == counts["public"] == len(load_prompts(out / "public_prompts.jsonl"))
    assert len(read_jsonl(out / "test.jsonl")) == counts["test"]


def test_cli_reports_a_bad_module_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert task_cli.main(["--out", str(tmp_path), "--participants", "2", "--modules", "json,not_a_mod"]) == 2
    assert "not_a_mod" in capsys.readouterr().err
