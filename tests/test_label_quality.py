"""Label quality against references: hand-made prompts whose scores are worked out here, the shard
outcomes built from a PseudoLabels message, and the references file with its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.replay.label_quality import (
    PromptOutcome,
    QualitySummary,
    label_quality,
    score_prompt,
    shard_outcomes,
)
from coordinator.replay.label_sources import label_quality_of_run
from coordinator.replay.log import ReplayError
from coordinator.replay.references import load_references
from federation.stdlib_task.files import write_task
from federation.stdlib_task.split import build_task
from schemas.messages import Answer, GenerationBatch, Label, PseudoLabels

# Reference of 6 words. Against it (ROUGE-L F1 = 2PR / (P + R) over the longest common subsequence):
CAT = "The cat sat on the mat."
EXACT = "the cat sat on the mat"  # LCS 6 of 6 both ways: 1.0
HALF = "the cat"  # LCS 2: P = 2/2, R = 2/6 -> 2 * 1/3 / (4/3) = 0.5
NONE = "a dog ran"  # no common word: 0.0
# Reference of 4 words.
XYZW = "x y z w"
TWO_THIRDS = "x y"  # LCS 2: P = 1, R = 1/2 -> 2 * 1/2 / (3/2) = 2/3


def outcome(round_id: int, prompt_id: str, label: str | None, *answers: str) -> PromptOutcome:
    return PromptOutcome(round_id, prompt_id, label, {f"m{i}": text for i, text in enumerate(answers)})


def test_a_prompt_scores_its_label_the_members_mean_and_the_best_member() -> None:
    score = score_prompt(outcome(1, "p", EXACT, EXACT, HALF, NONE), CAT)
    assert score.label == pytest.approx(1.0)
    assert score.members_mean == pytest.approx((1.0 + 0.5 + 0.0) / 3)  # a random member's expectation
    assert score.oracle == pytest.approx(1.0)
    assert score.beat_mean


def test_a_label_that_only_ties_the_members_mean_does_not_beat_it() -> None:
    every_member_agrees = score_prompt(outcome(1, "p", HALF, HALF, HALF), CAT)
    assert every_member_agrees.label == every_member_agrees.members_mean == pytest.approx(0.5)
    assert not every_member_agrees.beat_mean
    abstained = score_prompt(outcome(1, "p", None, HALF, NONE), CAT)
    assert abstained.label is None and abstained.members_mean == pytest.approx(0.25)
    assert not abstained.beat_mean


def test_summaries_per_round_and_overall_average_over_labelled_prompts() -> None:
    references = {"cat": CAT, "xyzw": XYZW, "cat2": CAT}
    outcomes = [
        # round 1: label 1.0 vs mean 0.5, oracle 1.0 -> beats
        outcome(1, "cat", EXACT, EXACT, HALF, NONE),
        # round 1: label 2/3 vs mean (1 + 2/3) / 2 = 5/6, oracle 1.0 -> does not beat
        outcome(1, "xyzw", TWO_THIRDS, XYZW, TWO_THIRDS),
        # round 1: abstained (counted, kept out of the means: members' mean 0.0 would pull it down)
        outcome(1, "cat2", None, NONE, NONE),
        # round 2: label 0.0 vs mean 0.25, oracle 0.5
        outcome(2, "cat", NONE, HALF, NONE),
        # not scored: no reference, and no member answered
        outcome(2, "unknown", EXACT, EXACT),
        outcome(2, "xyzw", None),
    ]
    quality = label_quality(outcomes, references)
    assert quality.unscored == ((2, "unknown"), (2, "xyzw"))

    first, second = quality.rounds[1], quality.rounds[2]
    assert (first.labelled, first.abstained, first.prompts, first.beat_mean) == (2, 1, 3, 1)
    assert first.label == pytest.approx((1.0 + 2 / 3) / 2)
    assert first.members_mean == pytest.approx((0.5 + 5 / 6) / 2)
    assert first.oracle == pytest.approx(1.0)
    assert (second.labelled, second.abstained, second.beat_mean) == (1, 0, 0)
    assert (second.label, second.members_mean, second.oracle) == pytest.approx((0.0, 0.25, 0.5))

    overall = quality.overall  # every labelled prompt weighs the same, whatever its round
    assert (overall.labelled, overall.abstained, overall.beat_mean) == (3, 1, 1)
    assert overall.label == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert overall.members_mean == pytest.approx((0.5 + 5 / 6 + 0.25) / 3)
    assert overall.oracle == pytest.approx((1.0 + 1.0 + 0.5) / 3)

    as_json = json.loads(json.dumps(quality.as_dict()))  # what a benchmark writes
    assert as_json["unscored"] == 2 and set(as_json["rounds"]) == {"1", "2"}
    assert as_json["rounds"]["2"] == {
        "prompts": 1,
        "labelled": 1,
        "abstained": 0,
        "label": 0.0,
        "members_mean": 0.25,
        "oracle": 0.5,
        "beat_mean": 0,
    }
    assert as_json["overall"]["prompts"] == 4 and as_json["overall"]["beat_mean"] == 1


def test_a_round_that_abstained_everywhere_has_counts_but_no_means() -> None:
    quality = label_quality([outcome(3, "cat", None, EXACT)], {"cat": CAT})
    assert quality.rounds[3] == QualitySummary(
        labelled=0, abstained=1, label=None, members_mean=None, oracle=None, beat_mean=0
    )
    assert label_quality([], {"cat": CAT}).rounds == {}


def test_shard_outcomes_pair_each_decided_prompt_with_every_members_answer() -> None:
    def batch(participant: str, **texts: str) -> GenerationBatch:
        return GenerationBatch(
            federation="f",
            round_id=4,
            message_id=f"m-{participant}",
            participant_id=participant,
            shard_id=0,
            model_id="m",
            answers=[Answer(prompt_id=p, text=t) for p, t in texts.items()],
        )

    labels = PseudoLabels(
        federation="f",
        round_id=4,
        message_id="labels",
        participant_id="coordinator",
        shard_id=0,
        labels=[Label(prompt_id="a", text="A1", confidence=0.9, support=2, source="ann")],
        abstained=["b"],
    )
    outcomes = shard_outcomes(labels, [batch("ann", a="A1", b="B1"), batch("ben", a="A2")])
    assert outcomes == [
        PromptOutcome(4, "a", "A1", {"ann": "A1", "ben": "A2"}),
        PromptOutcome(4, "b", None, {"ann": "B1"}),
    ]


# ---- the references file ---------------------------------------------------------------


def test_the_task_builders_references_file_reads_back(tmp_path: Path) -> None:
    task = build_task(["json", "csv", "textwrap", "heapq"], n_participants=3, seed=1)
    write_task(task, tmp_path)
    references = load_references(tmp_path / "public_references.jsonl")
    assert references == {e.prompt_id: e.reference for e in task.public}
    assert references  # the task has public prompts


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_references_accept_either_field_name_and_skip_blank_lines(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "refs.jsonl",
        json.dumps({"prompt_id": "a", "family": "text", "response": "A"}),
        "",
        json.dumps({"prompt_id": "b", "reference": "B"}),
        json.dumps({"prompt_id": "a", "response": "A"}),  # the same again is harmless
    )
    assert load_references(path) == {"a": "A", "b": "B"}


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ("{not json", r"refs\.jsonl:2: not a reference line \(JSON is malformed"),
        (json.dumps({"response": "B"}), r"refs\.jsonl:2: .*missing required field `prompt_id`"),
        (json.dumps({"prompt_id": 7, "response": "B"}), r"refs\.jsonl:2: .*Expected `str`, got `int`"),
        (json.dumps({"prompt_id": "b"}), r'refs\.jsonl:2: no "response" \(or "reference"\) field'),
        (json.dumps(["b", "B"]), r"refs\.jsonl:2: .*Expected `object`, got `array`"),
        (
            json.dumps({"prompt_id": "a", "response": "other"}),
            r"refs\.jsonl:2: .*another reference \(line 1\)",
        ),
    ],
)
def test_a_bad_references_line_is_named_by_its_number(tmp_path: Path, second_line: str, message: str) -> None:
    path = write_lines(tmp_path / "refs.jsonl", json.dumps({"prompt_id": "a", "response": "A"}), second_line)
    with pytest.raises(ReplayError, match=message):
        load_references(path)


def test_a_missing_or_empty_references_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match=r"references file .*nope\.jsonl does not exist"):
        load_references(tmp_path / "nope.jsonl")
    with pytest.raises(ReplayError, match="holds no references"):
        load_references(write_lines(tmp_path / "empty.jsonl", ""))


def test_a_finished_run_without_its_store_is_a_clear_error(tmp_path: Path) -> None:
    references = write_lines(tmp_path / "refs.jsonl", json.dumps({"prompt_id": "a", "response": "A"}))
    with pytest.raises(ReplayError, match=r"coordinator store .*coordinator\.sqlite3 does not exist"):
        label_quality_of_run(tmp_path / "state" / "coordinator.sqlite3", references)
