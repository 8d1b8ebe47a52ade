"""Did it help, and why did nothing happen? Round 0 beside the rounds, `--compare local`, abstention
reasons in the table, summary.json and `chorus-replay inspect`, and a run that taught nothing exits 1.

Real runs of the tiny models on the embedded memory broker, as tests/test_federation_run.py does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from coordinator.consensus import Candidate, ConsensusSettings, ExactConsensus
from coordinator.labelling import UNSAID, abstain_reason_counts, pseudo_labels_message, reason_group
from coordinator.replay import cli as replay_cli
from federation import cli
from federation.plots import _nothing_labelled
from federation.records import RoundRecord
from schemas.codec import decode_reply, encode
from schemas.messages import PseudoLabels

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny.toml"
# examples/tiny.toml accepts any agreement; with the default thresholds its noise answers all abstain.
TINY_THRESHOLDS = "min_confidence = -1.0\noutlier_similarity = -1.0\nsupport_similarity = -1.0\n"

pytestmark = pytest.mark.usefixtures("restore_logging")


def tiny_variant(tmp_path: Path, *replacements: tuple[str, str]) -> Path:
    text = TINY.read_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    config = tmp_path / "tiny-variant.toml"
    config.write_text(text)
    return config


def summary_of(results: Path) -> dict[str, Any]:
    return dict(json.loads((results / "summary.json").read_text()))


def rounds_of(results: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (results / "rounds.jsonl").read_text().splitlines() if line]


# ---- round 0 and --compare local ------------------------------------------------------------------


def test_round_zero_is_in_the_table_and_summary_and_compare_local_reports_each_member(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    assert cli.main([str(TINY), "--results", str(results), "--compare", "local"]) == 0
    out = capsys.readouterr().out
    assert "round 0 (after warm-up)" in out
    assert "federated vs local-only" in out
    summary = summary_of(results)
    round_0 = summary["round_0"]
    assert isinstance(round_0, dict) and set(round_0) == {"llama", "gpt2"}
    participants = summary["participants"]
    assert isinstance(participants, dict)
    for pid in ("llama", "gpt2"):
        assert round_0[pid]["rouge_l"] is not None and round_0[pid]["embedding_similarity"] is not None
        member = participants[pid]
        assert member["round_0_rouge_l"] == round_0[pid]["rouge_l"]
        assert member["rouge_l_change"] == pytest.approx(
            member["last_rouge_l"] - round_0[pid]["rouge_l"], abs=1e-4
        )
    compare = summary["compare_local"]
    assert isinstance(compare, dict) and set(compare) == {"llama", "gpt2"}
    for pid, row in compare.items():
        assert row["rounds"] == 2
        assert row["federated"]["rouge_l"] == participants[pid]["last_rouge_l"]
        for key in ("rouge_l", "embedding_similarity"):
            assert row["difference"][key] == pytest.approx(
                row["federated"][key] - row["local"][key], abs=1e-4
            )
    # The run warmed each member up once, where its participant restores it from: no second warm-up.
    for pid in ("llama", "gpt2"):
        assert (results / "state" / pid / "checkpoints" / "round-0").is_dir()
    assert '"event": "warm_up"' not in (results / "run.log").read_text()
    assert summary["rounds_productive"] == 2 and summary["unproductive"] is None


def test_a_member_without_test_data_has_no_round_zero_and_no_twin(tmp_path: Path) -> None:
    empty = tmp_path / "no-test.jsonl"
    empty.write_text("")
    config = tiny_variant(
        tmp_path, ('model = "tiny-gpt2"\n', f'model = "tiny-gpt2"\ntest_data = "{empty}"\n')
    )
    results = tmp_path / "results"
    assert cli.main([str(config), "--results", str(results), "--compare", "local"]) == 0
    summary = summary_of(results)
    assert set(summary["round_0"]) == {"llama"}
    assert set(summary["compare_local"]) == {"llama"}


# ---- a run that labels nothing says why, and exits 1 ----------------------------------------------


def test_every_prompt_abstaining_is_explained_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_variant(tmp_path, (TINY_THRESHOLDS, "min_confidence = -1.0\n"))  # default thresholds
    results = tmp_path / "results"
    assert cli.main([str(config), "--results", str(results)]) == 1
    captured = capsys.readouterr()
    assert "chorus-run: error: no round produced labels (round 1: " in captured.err
    assert "abstained: " in captured.err
    assert "failed: 2/2 rounds" in captured.out and "done: " not in captured.out
    assert "round 1: " in captured.out  # the table's caption
    summary = summary_of(results)
    assert summary["rounds_productive"] == 0 and summary["error"] is None
    assert isinstance(summary["unproductive"], str) and summary["unproductive"].startswith(
        "no round produced labels"
    )
    reasons = summary["abstain_reasons"]
    assert isinstance(reasons, dict) and reasons
    assert sum(reasons.values()) == sum(int(str(r["abstained"])) for r in rounds_of(results)) > 0
    for record in rounds_of(results):
        assert sum(record["abstain_reasons"].values()) == record["abstained"]
        assert record["labelled"] == 0
    assert UNSAID not in reasons
    assert (results / "agreement.png").read_bytes()[:4] == b"\x89PNG"
    # the recorded labels carry the reasons: chorus-replay inspect counts them per round
    logs = sorted(map(str, (results / "records").glob("*.chorus-log")))
    assert replay_cli.main(["inspect", *logs]) == 0
    inspected = capsys.readouterr().out
    section = inspected.split("abstentions (why prompts got no label)\n", 1)[1].split("\n\n", 1)[0]
    assert section.startswith("  round 1: ") and " abstained: " in section
    for cause in reasons:
        assert cause in section


def test_a_fedavg_run_whose_every_round_failed_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Llama and GPT-2 adapters cannot be averaged: the second upload is refused, every round misses quorum.
    config = tiny_variant(
        tmp_path,
        ("[coordinator.round]\n", '[coordinator]\nstrategy = "fedavg"\n\n[coordinator.round]\n'),
        ("deadline_seconds = 60.0", "deadline_seconds = 3.0"),
    )
    results = tmp_path / "results"
    assert cli.main([str(config), "--results", str(results)]) == 1
    captured = capsys.readouterr()
    assert "chorus-run: error: no round produced an average (round 1: shards [0] failed" in captured.err
    assert "done: " not in captured.out
    summary = summary_of(results)
    assert summary["rounds_completed"] == 2 and summary["rounds_productive"] == 0


# ---- the reasons themselves -----------------------------------------------------------------------


def _decide(answers: dict[str, list[Candidate]], **settings: Any) -> PseudoLabels:
    from common.embedding import HashingEmbedder

    consensus = ExactConsensus(HashingEmbedder(), ConsensusSettings(**settings))
    return pseudo_labels_message("f", 1, 0, consensus.decide(answers))


def test_pseudo_labels_carry_each_abstention_reason_and_group_by_cause() -> None:
    same = "the quick brown fox jumps over the lazy dog"
    answers = {
        "alone": [Candidate("a", "one answer"), Candidate("b", " ")],
        "apart": [Candidate("a", "zebra quantum"), Candidate("b", "violin harbour"), Candidate("c", "x y z")],
        "agreed": [Candidate("a", same), Candidate("b", same), Candidate("c", same)],
    }
    message = _decide(answers)
    assert [label.prompt_id for label in message.labels] == ["agreed"]
    assert sorted(message.abstained) == ["alone", "apart"]
    assert message.abstain_reason("alone") == "usable answers: 1 (1 blank); min_answers is 2"
    decoded = decode_reply(encode(message))
    assert isinstance(decoded, PseudoLabels) and decoded.abstain_reasons == message.abstain_reasons
    counts = abstain_reason_counts([message, message])
    assert counts["too few non-blank answers: min_answers is 2"] == 2
    assert sum(counts.values()) == 4


def test_labels_without_abstentions_encode_as_before_the_reasons_existed() -> None:
    same = "an answer everyone gave"
    message = _decide({"p": [Candidate("a", same), Candidate("b", same)]})
    assert not message.abstained
    assert b"abstain_reasons" not in encode(message)
    older = msgspec.msgpack.decode(encode(message))
    assert "abstain_reasons" not in older
    # an older coordinator's labels (no reasons) still count, under a cause that says so
    unsaid = msgspec.structs.replace(message, abstained=["q"])
    assert abstain_reason_counts([unsaid]) == {UNSAID: 1}


@pytest.mark.parametrize(
    ("reason", "cause"),
    [
        ("usable answers: 1 (2 blank); min_answers is 2", "too few non-blank answers: min_answers is 2"),
        ("usable answers: 0; min_answers is 3", "too few non-blank answers: min_answers is 3"),
        (
            "every answer is an outlier: no two answers agree",
            "every answer is an outlier: no two answers agree",
        ),
        (
            "no answer is agreed with by more than 0.5 of the prompt's 3 answers (support_similarity 0.7)",
            "no answer is agreed with by more than 0.5 of the prompt's answers (support_similarity 0.7)",
        ),
        ("confidence 0.312 is below min_confidence 0.5", "confidence is below min_confidence 0.5"),
        (
            "answers that disagree tie exactly: no majority between them",
            "answers that disagree tie exactly: no majority between them",
        ),
    ],
)
def test_a_reason_groups_under_its_cause_without_its_prompts_numbers(reason: str, cause: str) -> None:
    assert reason_group(reason) == cause


def test_an_agreement_plot_with_nothing_labelled_says_why() -> None:
    record = RoundRecord(
        round_id=1, opened_unix=0.0, closed_unix=1.0, round_seconds=1.0, elapsed_seconds=1.0,
        consensus_seconds=0.0, labelled=0, abstained=6,
        abstain_reasons={"confidence is below min_confidence 0.5": 6},
        failed_shards=[], shards=1, strategy="semantic", mean_confidence=None, late=[], missing=[],
        participants=[],
    )  # fmt: skip
    text = _nothing_labelled([record])
    assert text.startswith("nothing was labelled")
    assert "round 1: 6 abstained: confidence is below min_confidence 0.5" in text.replace("\n", " ")
