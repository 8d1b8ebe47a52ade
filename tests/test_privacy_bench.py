"""bench/privacy/: canaries, exact exposure, verbatim hits, the membership attack, the audit file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.privacy.audit import noise_for, private_steps
from bench.privacy.canaries import Canary, make_canaries, with_canaries
from bench.privacy.exposure import context_ids, digit_token_ids, rank_of, secret_log_likelihoods
from bench.privacy.leaks import Hits, hit, hits
from bench.privacy.membership import loss_attack_auc
from bench.privacy.report import markdown, summarize
from bench.privacy.settings import AuditError, dp_epsilon, load_audit
from participant.data import Example
from participant.models import LocalModel, load_model
from participant.settings import TrainSettings

REPO = Path(__file__).resolve().parent.parent


def test_canaries_are_distinct_seeded_and_inserted_as_often_as_asked() -> None:
    canaries = make_canaries(3, [1, 4, 16], 4)
    assert canaries == make_canaries(3, [1, 4, 16], 4)
    assert canaries != make_canaries(4, [1, 4, 16], 4)
    assert len({c.secret for c in canaries}) == 3 and len({c.patient for c in canaries}) == 3
    assert all(len(c.secret) == 4 and c.secret.isdigit() for c in canaries)
    rows = with_canaries([Example("q", "a")] * 5, canaries, seed=0)
    assert len(rows) == 5 + 21
    for canary in canaries:
        assert sum(r.response == canary.response for r in rows) == canary.repeats
        assert canary.response == canary.response_head + canary.secret + "."
    with pytest.raises(ValueError):
        make_canaries(0, [0], 4)


def test_hits_tell_the_whole_secret_from_most_of_it_and_from_a_longer_number() -> None:
    canary = Canary("c", "4471", "8302", 1)
    assert hit("the code is 8302.", canary) == Hits(exact=1)
    assert hit("code 830 or so", canary) == Hits(partial=1)
    assert hit("it ends in 302", canary) == Hits(partial=1)
    assert hit("serial 183029", canary) == Hits(partial=1)  # inside a longer number: not the secret
    assert hit("patient 4471 has code 1234", canary) == Hits()
    assert hits(["8302", "nothing", "x830"], [canary]) == Hits(exact=1, partial=1)


def test_the_loss_attack_auc_counts_pairs_and_ties() -> None:
    assert loss_attack_auc([0.1, 0.2], [0.5, 0.6]) == 1.0
    assert loss_attack_auc([0.5, 0.6], [0.1, 0.2]) == 0.0
    assert loss_attack_auc([0.3], [0.3]) == 0.5
    assert loss_attack_auc([0.1, 0.4], [0.2, 0.3]) == 0.5  # 0.1 beats both, 0.4 neither
    with pytest.raises(ValueError):
        loss_attack_auc([], [1.0])


@pytest.fixture(scope="module")
def tiny() -> LocalModel:
    return load_model("tiny-llama")


def test_exposure_scores_every_secret_as_a_plain_forward_pass_would(tiny: LocalModel) -> None:
    canary = Canary("c", "4471", "830", 1)
    scores = secret_log_likelihoods(tiny, canary, chunk=7)  # chunks that do not divide the 100 heads
    assert scores.shape == (1000,)
    context, digits = context_ids(tiny, canary), digit_token_ids(tiny)
    with torch.inference_mode():
        for value in (0, 9, 830, 999):
            ids = context + [digits[int(c)] for c in f"{value:03d}"]
            logp = torch.log_softmax(tiny.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
            expected = sum(float(logp[len(context) - 1 + i, ids[len(context) + i]]) for i in range(3))
            assert math.isclose(scores[value], expected, abs_tol=1e-4)
    # The candidates' probabilities sum to 1 over the secret's digits only if the model spends nothing
    # elsewhere; they can never sum to more.
    assert np.exp(scores).sum() <= 1.0 + 1e-6


def test_rank_counts_the_candidates_strictly_likelier() -> None:
    scores = np.array([0.0, -1.0, 0.0, -3.0])
    assert rank_of(scores, 1) == 3
    assert rank_of(scores, 0) == 1  # a tie goes the secret's way
    assert rank_of(scores, 3) == 4


def test_the_shipped_audit_file_loads_and_quick_mode_draws_every_public_prompt_in_one_round() -> None:
    audit = load_audit(REPO / "bench" / "privacy.toml")
    assert audit.settings.methods[:5] == ["local", "fedavg", "shipped", "shipped_no_guard", "shipped_dp"]
    quick = load_audit(REPO / "bench" / "privacy.toml", quick=True)
    assert quick.task.run.rounds == 1 and quick.settings.seeds == 1
    rounds = quick.task.coordinator_raw["round"]
    assert isinstance(rounds, dict) and rounds["prompts_per_round"] == quick.settings.quick.max_public


def test_a_dp_method_trains_at_the_epsilon_its_name_gives(tmp_path: Path) -> None:
    audit = tmp_path / "audit.toml"
    audit.write_text(
        f'task = "{REPO / "bench" / "quality.toml"}"\nmethods = ["shipped_dp", "shipped_dp_eps1.5"]\n'
    )
    settings = load_audit(audit).settings
    assert [dp_epsilon(m, settings) for m in ("shipped_dp", "shipped_dp_eps1.5", "shipped", "local")] == [
        settings.dp_epsilon, 1.5, None, None,
    ]  # fmt: skip


def test_a_bad_audit_file_is_refused_with_its_reason(tmp_path: Path) -> None:
    bad = tmp_path / "audit.toml"
    bad.write_text(f'task = "{REPO / "bench" / "quality.toml"}"\nmethods = ["local", "sharing"]\n')
    with pytest.raises(AuditError, match="sharing"):
        load_audit(bad)
    bad.write_text(f'task = "{REPO / "bench" / "quality.toml"}"\nsecret_digits = 9\n')
    with pytest.raises(AuditError, match="secret_digits"):
        load_audit(bad)


def test_the_dp_noise_is_the_least_that_keeps_the_budget_for_the_whole_run() -> None:
    from opacus.accountants import RDPAccountant

    def spent(sigma: float, steps: list[tuple[float, int]]) -> float:
        accountant = RDPAccountant()
        for rate, count in steps:
            for _ in range(count):
                accountant.step(noise_multiplier=sigma, sample_rate=rate)
        return float(accountant.get_epsilon(1e-5))

    train = TrainSettings(batch_size=8, warmup_epochs=3, private_examples_per_round=4)
    steps = private_steps(53, 35, train, rounds=3)
    assert steps == [(8 / 35, 20), (1.0, 1), (1.0, 1), (1.0, 1)]  # 159 warm-up examples; 4 a round
    for epsilon in (1.0, 8.0):
        sigma = noise_for(epsilon, 1e-5, steps)
        assert spent(sigma, steps) <= 0.98 * epsilon < spent(sigma / 1.03, steps)


def test_the_report_sums_hits_and_averages_exposure_over_seeds() -> None:
    canaries = [{"canary_id": "c1", "repeats": 1}, {"canary_id": "c16", "repeats": 16}]

    def member(exposure: float, exact: int, nll: float, auc: dict[str, float]) -> dict[str, object]:
        rows = {
            c["canary_id"]: {"exposure": exposure, "rank": 1, "exact": exact, "partial": exact}
            for c in canaries
        }
        return {"canaries": rows, "membership_auc": auc, "test_nll": [nll, nll]}

    def run(seed: int, method: str, owner_exposure: float, nll: float) -> dict[str, object]:
        result: dict[str, object] = {
            "seed": seed, "method": method, "error": None, "bytes_up": 10, "bytes_down": 0,
            "canaries": canaries,
            "members": {
                "p00": member(owner_exposure, 1, nll, {"p00": 0.7, "p01": 0.5}),
                "p01": member(1.5 if method == "shipped" else 1.0, 0, nll, {"p00": 0.4, "p01": 0.6}),
            },
        }  # fmt: skip
        if method == "shipped":
            hits = {"exact": seed, "partial": 1}
            result["published"] = {
                "owner_answers": hits, "labels": hits, "owner_answers_sent": 5, "labels_sent": 7,
                "owner_canary_answers_blank": 2,
            }  # fmt: skip
        return result

    results = [run(s, m, 5.0 + s, 2.0 + (m == "shipped") * 0.1) for s in (0, 1) for m in ("local", "shipped")]
    summary = summarize(results, "p00")
    shipped = summary["methods"]["shipped"]
    assert shipped["exposure"]["x16"]["owner"]["mean"] == pytest.approx(5.5)
    assert shipped["exposure"]["x1"]["others"]["mean"] == pytest.approx(1.5)
    assert shipped["greedy_hits"]["owner"] == {"exact": 4, "partial": 4, "answers": 4}
    assert shipped["published"]["labels"] == {"exact": 1, "partial": 2}
    assert (
        shipped["published"]["labels_sent"] == 14 and shipped["published"]["owner_canary_answers_blank"] == 4
    )
    assert shipped["test_nll_vs_local"]["mean"] == pytest.approx(0.1)
    assert shipped["others_exposure_vs_local"]["x16"]["mean"] == pytest.approx(0.5)  # p01: 1.5 against 1.0
    # Own model minus the other's on the same data: p00 0.7 - 0.4, p01 0.6 - 0.5.
    assert shipped["membership_auc"]["lift"]["mean"] == pytest.approx(0.2)
    assert shipped["membership_auc"]["owner_lift"]["mean"] == pytest.approx(0.3)
    text = "\n".join(markdown(summary, ["# t"]))
    assert "1 / 2 of 14" in text and "4 of 4" in text
