"""bench.labels: scoring label rules on a label corpus, on a hand-made corpus worked out by hand.

Two prompts, three members a, b, c. q1: a alone is right (the expert); b and c agree on a wrong answer.
q2: b is right (the expert), a is close ("add numbers": ROUGE-L 0.8), c is wrong.
ROUGE-L per member: q1 a 1.0, b 0, c 0 (mean 1/3, oracle 1); q2 a 0.8, b 1.0, c 0 (mean 0.6, oracle 1).
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from support.geometry import TableEmbedder, table_of

from bench.labels.corpus import MemberAnswer, PromptRecord, read_corpus, write_corpus
from bench.labels.rules import CANDIDATE_RULES, Stage
from bench.labels.rules.affinity import AffinityRouting
from bench.labels.score import score_choices, score_stage, shipped_choices

TEXTS = {
    "q1": {"a": "the cat sat on the mat", "b": "a dog ran", "c": "a dog ran"},
    "q2": {"a": "add numbers", "b": "add two numbers", "c": "multiply"},
}
REFERENCES = {"q1": "the cat sat on the mat", "q2": "add two numbers"}
EXPERTS = {"q1": "a", "q2": "b"}
# a and b each lead on their own prompt; c claims a high affinity everywhere, which z-scores to nothing
AFFINITY = {"q1": {"a": 0.9, "b": 0.5, "c": 0.99}, "q2": {"a": 0.1, "b": 0.6, "c": 0.99}}


def record(prompt_id: str, **signals: dict[str, float]) -> PromptRecord:
    def value(signal: str, member: str, default: float) -> float:
        return signals.get(signal, {}).get(member, default)

    return PromptRecord(
        stage="warmup",
        prompt_id=prompt_id,
        prompt=f"What does {prompt_id} do?",
        reference=REFERENCES[prompt_id],
        family="text",
        expert=EXPERTS[prompt_id],
        answers={
            m: MemberAnswer(
                text=text,
                logprob=value("logprob", m, -1.0),
                self_certainty=value("self_certainty", m, 1.0),
                affinity=AFFINITY[prompt_id][m],
                scored_by={s: value(f"scored_by_{s}", m, -1.0) for s in "abc"},
            )
            for m, text in TEXTS[prompt_id].items()
        },
    )


RECORDS = [record("q1"), record("q2")]


def embedder() -> TableEmbedder:
    # q1: the two wrong answers are one text; q2: a and b agree (0.9), c is far from both
    texts = ["the cat sat on the mat", "a dog ran", "add numbers", "add two numbers", "multiply"]
    gram = [
        [1.0, 0.2, 0.0, 0.0, 0.0],
        [0.2, 1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.9, 0.2],
        [0.0, 0.0, 0.9, 1.0, 0.1],
        [0.0, 0.0, 0.2, 0.1, 1.0],
    ]
    return table_of(texts, gram)


def test_scores_of_a_choice_worked_out_by_hand() -> None:
    score = score_choices("toy", "a-always", RECORDS, {"q1": "a", "q2": "a"})
    assert (score.prompts, score.labelled, score.expert_prompts) == (2, 2, 2)
    assert score.label == pytest.approx(0.9)  # (1.0 + 0.8) / 2
    assert score.members_mean == pytest.approx((1 / 3 + 0.6) / 2)
    assert score.oracle == pytest.approx(1.0)
    assert score.gap_closed == pytest.approx((0.9 - 7 / 15) / (1 - 7 / 15))  # 0.8125
    assert score.chose_expert == pytest.approx(0.5)  # right on q1, not on q2


def test_an_abstention_leaves_its_prompt_out_of_every_mean() -> None:
    score = score_choices("toy", "q2-only", RECORDS, {"q1": None, "q2": "b"})
    assert (score.labelled, score.label, score.oracle) == (1, 1.0, 1.0)
    assert score.members_mean == pytest.approx(0.6)
    assert score.gap_closed == pytest.approx(1.0) and score.chose_expert == 1.0


def test_choosing_a_text_the_expert_also_wrote_counts_as_choosing_the_expert() -> None:
    q1 = RECORDS[0]
    echo = msgspec.structs.replace(q1.answers["b"], text=q1.answers["a"].text)  # b repeats the expert
    same = msgspec.structs.replace(q1, answers={**q1.answers, "b": echo})
    assert score_choices("toy", "x", [same], {"q1": "b"}).chose_expert == 1.0
    assert score_choices("toy", "x", [q1], {"q1": "b"}).chose_expert == 0.0


def test_the_shipped_medoid_takes_the_majority_and_misses_both_experts() -> None:
    choices = shipped_choices(RECORDS, "medoid", embedder())
    # q1: b and c's shared text is the majority (b first in canonical order); q2: a is densest (0.9 + 0.2)
    assert choices == {"q1": "b", "q2": "a"}
    score = score_choices("toy", "medoid", RECORDS, choices)
    assert score.label == pytest.approx(0.4)
    assert score.gap_closed == pytest.approx(
        (0.4 - 7 / 15) / (1 - 7 / 15)
    )  # -0.125: worse than a random member
    assert score.chose_expert == 0.0


def test_the_oracle_picks_each_best_answer() -> None:
    stage = Stage(RECORDS, {})
    assert CANDIDATE_RULES["oracle"].choose(stage) == {"q1": "a", "q2": "b"}


def test_affinity_routing_takes_the_clear_leader_and_ignores_a_member_claiming_everything() -> None:
    # z-scored per member: a +1 on q1, -1 on q2; b the reverse; c 0 on both although its raw value is highest
    stage = Stage(RECORDS, {"medoid": {"q1": "b", "q2": "a"}})
    assert AffinityRouting(margin=0.5).choose(stage) == {"q1": "a", "q2": "b"}  # leads of 1
    # no lead of 3 standard deviations: the medoid decides
    assert AffinityRouting(margin=3.0).choose(stage) == {"q1": "b", "q2": "a"}


def test_cross_scoring_takes_the_answer_the_others_find_likely() -> None:
    # On q1 both others find a's answer likelier than anything else they score; on q2, b's.
    records = [
        record("q1", scored_by_b={"a": -0.5, "c": -2.0}, scored_by_c={"a": -0.5, "b": -2.0}, scored_by_a={}),
        record("q2", scored_by_a={"b": -0.5, "c": -3.0}, scored_by_c={"b": -0.5, "a": -2.0}, scored_by_b={}),
    ]
    assert CANDIDATE_RULES["cross_affinity"].choose(Stage(records, {})) == {"q1": "a", "q2": "b"}


def test_self_certainty_is_normalized_per_member() -> None:
    # c is far surer than anyone everywhere (raw), so z-scores leave a, surest on q1, and b on q2
    records = [
        record("q1", self_certainty={"a": 2.0, "b": 1.0, "c": 9.5}),
        record("q2", self_certainty={"a": 1.0, "b": 2.0, "c": 9.5}),
    ]
    assert CANDIDATE_RULES["self_certainty"].choose(Stage(records, {})) == {"q1": "a", "q2": "b"}


def test_score_stage_runs_shipped_and_candidate_rules_alike() -> None:
    scores = score_stage("toy", RECORDS, ["medoid", "oracle", "random"], embedder())
    assert [s.rule for s in scores] == ["medoid", "oracle", "random"]
    assert scores[1].label == 1.0 and scores[1].gap_closed == 1.0
    assert scores[2].labelled == 2


def test_a_corpus_reads_back_as_written(tmp_path: Path) -> None:
    path = tmp_path / "toy-0.jsonl"
    write_corpus(path, reversed(RECORDS))
    assert read_corpus(path) == RECORDS
    path.write_text('{"stage": "warmup"}\n')
    with pytest.raises(ValueError, match="not a label corpus"):
        read_corpus(path)
