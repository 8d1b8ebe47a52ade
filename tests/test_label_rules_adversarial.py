"""The adversarial harness every label rule must pass (issue #20, point 8).

Honest members answer each prompt near one true answer (they agree with each other); attackers
choose their answers' geometry (junk, one text shared by colluders, riders on an honest answer),
every number they report (log-probabilities), how late they are (a stale weight), their own and
the honest members' reputation weights, and their ids. For every registered label rule and both
neighbour searches, Hypothesis looks for a shard in which they:

- carry a label although they are no strict majority of a prompt's answers and disagree with the
  honest ones (the bound: nothing, whatever their numbers, timing, weights, ids or collusion);
- carry a label by riding alone on one honest answer (an honest text plus a payload);
- make an answer win by lowering its weight (a weight below 1 only lowers an answer's chance);
- change a label by what they report (log-probabilities) or by which ids they hold;
- drive an honest member's reputation below what honest agreement alone gives it.

Pure: a table embedder gives exact geometry; no broker, no model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from support.geometry import TableEmbedder

from coordinator.consensus import (
    Candidate,
    ConsensusSettings,
    ExactConsensus,
    HnswConsensus,
    ShardConsensus,
)
from coordinator.label_rules import LABEL_RULES
from coordinator.labelling import shard_candidates
from coordinator.reputation import reputation_weights, weighted
from schemas import Answer, GenerationBatch

DIM = 24
SEARCHES = (ExactConsensus, HnswConsensus)
# Read from the registry, so that a rule registered there is covered here without a line of this file.
RULES = [(search, rule) for search in SEARCHES for rule in sorted(LABEL_RULES)]
HARNESS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PAYLOAD = "::payload"

FloatArray = npt.NDArray[np.float64]


def unit(vector: FloatArray) -> FloatArray:
    normalised: FloatArray = vector / np.linalg.norm(vector)
    return normalised


@dataclass(frozen=True)
class Federation:
    """One shard: per prompt, each member's text; the table of every text's vector; who attacks."""

    answers: dict[str, dict[str, str]]  # prompt -> member -> text
    table: dict[str, FloatArray]
    honest: tuple[str, ...]
    attackers: tuple[str, ...]

    def candidates(self, weights: dict[str, float] | None = None) -> dict[str, list[Candidate]]:
        weights = weights or {}
        return {
            prompt: [Candidate(m, text, weights.get(m, 1.0)) for m, text in sorted(by_member.items())]
            for prompt, by_member in self.answers.items()
        }

    def attacker_texts(self) -> set[str]:
        return {
            text
            for by_member in self.answers.values()
            for m, text in by_member.items()
            if m in self.attackers
        }

    def embedder(self) -> TableEmbedder:
        return TableEmbedder(self.table)


def decide(
    search: type[ExactConsensus], rule: str, answers: dict[str, list[Candidate]], fed: Federation
) -> ShardConsensus:
    return search(fed.embedder(), ConsensusSettings(label_choice=rule)).decide(answers)


def captured(result: ShardConsensus, fed: Federation) -> list[str]:
    """Prompts whose label is an attacker's text (and no honest member wrote it too)."""
    theirs = fed.attacker_texts()
    honest = {t for by_member in fed.answers.values() for m, t in by_member.items() if m in fed.honest}
    return [d.prompt_id for d in result.decisions if d.label in theirs and d.label not in honest]


# ---- the federations Hypothesis draws --------------------------------------


@st.composite
def federations(draw: st.DrawFn, attack: str, members: Federation | None = None) -> Federation:
    """`attack`: "disagree" (junk, shared by colluders or not), or "ride" (one attacker, an honest
    text plus a payload direction orthogonal to every honest answer). `members`: draw a new shard for
    that federation's members."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n_honest = draw(st.integers(2, 6))
    # Never a strict majority of the members.
    n_attackers = 1 if attack == "ride" else draw(st.integers(1, n_honest))
    if members is not None:
        n_honest, n_attackers = len(members.honest), len(members.attackers)
    ids = (
        [*members.honest, *members.attackers]
        if members is not None
        else draw(
            st.lists(
                st.text("abcxyz-_0189", min_size=1, max_size=6),
                min_size=n_honest + n_attackers,
                max_size=n_honest + n_attackers,
                unique=True,
            )
        )
    )
    honest, attackers = tuple(ids[:n_honest]), tuple(ids[n_honest:])
    collude = draw(st.booleans())
    prompts = draw(st.integers(1, 4))
    table: dict[str, FloatArray] = {}
    answers: dict[str, dict[str, str]] = {}
    for p in range(prompts):
        truth = unit(rng.standard_normal(DIM))
        by_member: dict[str, str] = {}
        honest_vectors = []
        for i, member in enumerate(honest):
            if i and rng.random() < 0.3:  # greedy decoding often repeats another member's text exactly
                by_member[member] = by_member[honest[int(rng.integers(i))]]
                continue
            text = f"p{p}-h{i}"
            table[text] = unit(truth + 0.35 * rng.standard_normal(DIM) / np.sqrt(DIM))
            honest_vectors.append(table[text])
            by_member[member] = text
        if attack == "ride":
            copied = by_member[honest[int(rng.integers(n_honest))]]
            payload = rng.standard_normal(DIM)
            basis = np.stack(honest_vectors)
            payload -= basis.T @ np.linalg.lstsq(basis.T, payload, rcond=None)[0]  # orthogonal to them all
            share = draw(st.floats(0.05, 0.8))
            text = copied + PAYLOAD
            table[text] = unit(table[copied] + share * unit(payload))
            by_member[attackers[0]] = text
        else:
            shared = f"p{p}-junk"
            alpha = draw(st.floats(-0.3, 0.4))
            for j, member in enumerate(attackers):
                text = shared if collude else f"p{p}-a{j}"
                if text not in table:
                    away = rng.standard_normal(DIM)
                    away -= (away @ truth) * truth
                    table[text] = unit(alpha * truth + np.sqrt(1 - alpha**2) * unit(away))
                by_member[member] = text
        answers[f"q{p}"] = by_member
    return Federation(answers, table, honest, attackers)


def similarity(fed: Federation, a: str, b: str) -> float:
    return float(fed.table[a] @ fed.table[b])


def honest_agree(fed: Federation, threshold: float) -> bool:
    return all(
        similarity(fed, by[a], by[b]) >= threshold
        for by in fed.answers.values()
        for a in fed.honest
        for b in fed.honest
    )


def attackers_disagree(fed: Federation, threshold: float) -> bool:
    return all(
        similarity(fed, by[a], by[h]) < threshold
        for by in fed.answers.values()
        for a in fed.attackers
        for h in fed.honest
    )


weights_of = st.dictionaries(st.integers(0, 11), st.floats(0.05, 1.0), max_size=12)


def member_weights(fed: Federation, drawn: dict[int, float]) -> dict[str, float]:
    """Weights (reputation, staleness) chosen by the attackers, for themselves and the honest."""
    members = [*fed.honest, *fed.attackers]
    return {members[i]: w for i, w in drawn.items() if i < len(members)}


# ---- the bounds ----------------------------------------------------------------


@pytest.mark.parametrize(("search", "rule"), RULES)
@HARNESS
@given(fed=federations("disagree"), drawn=weights_of)
def test_a_minority_that_disagrees_with_the_honest_members_carries_no_label(
    search: type[ExactConsensus], rule: str, fed: Federation, drawn: dict[int, float]
) -> None:
    support = ConsensusSettings().support_similarity
    assume(honest_agree(fed, support) and attackers_disagree(fed, support))
    result = decide(search, rule, fed.candidates(member_weights(fed, drawn)), fed)
    assert captured(result, fed) == []


@pytest.mark.parametrize(("search", "rule"), RULES)
@HARNESS
@given(fed=federations("ride"), weight=st.floats(0.05, 1.0))
def test_a_lone_rider_on_an_honest_answer_carries_no_label(
    search: type[ExactConsensus], rule: str, fed: Federation, weight: float
) -> None:
    assume(honest_agree(fed, ConsensusSettings().support_similarity))
    result = decide(search, rule, fed.candidates({fed.attackers[0]: weight}), fed)
    assert captured(result, fed) == []


@pytest.mark.parametrize(("search", "rule"), RULES)
@HARNESS
@given(
    fed=st.one_of(federations("disagree"), federations("ride")),
    drawn=weights_of,
    lowered=st.floats(0.05, 0.99),
)
def test_lowering_an_answers_weight_never_makes_it_win(
    search: type[ExactConsensus], rule: str, fed: Federation, drawn: dict[int, float], lowered: float
) -> None:
    weights = member_weights(fed, drawn)
    before = decide(search, rule, fed.candidates(weights), fed)
    for member in (*fed.honest, *fed.attackers):
        less = weights | {member: weights.get(member, 1.0) * lowered}
        after = decide(search, rule, fed.candidates(less), fed)
        for old, new in zip(before.decisions, after.decisions, strict=True):
            text = fed.answers[old.prompt_id][member]
            if new.label == text and old.label != text:
                raise AssertionError(f"{member} won {old.prompt_id} only once its weight was lowered")


@pytest.mark.parametrize(("search", "rule"), RULES)
@HARNESS
@given(
    fed=st.one_of(federations("disagree"), federations("ride")),
    logprobs=st.lists(st.floats(-10_000.0, 0.0), min_size=1),
)
def test_reported_logprobs_change_no_label(
    search: type[ExactConsensus], rule: str, fed: Federation, logprobs: list[float]
) -> None:
    def batches(with_logprobs: bool) -> list[GenerationBatch]:
        members = sorted({m for by in fed.answers.values() for m in by})
        return [
            GenerationBatch(
                federation="f",
                round_id=1,
                message_id=f"m-{i}",
                participant_id=member,
                shard_id=0,
                model_id="x",
                answers=[
                    Answer(
                        prompt_id=prompt,
                        text=by[member],
                        logprob=logprobs[(i + j) % len(logprobs)] if with_logprobs else None,
                    )
                    for j, (prompt, by) in enumerate(sorted(fed.answers.items()))
                ],
            )
            for i, member in enumerate(members)
        ]

    plain = decide(search, rule, shard_candidates(sorted(fed.answers), batches(False)), fed)
    reported = decide(search, rule, shard_candidates(sorted(fed.answers), batches(True)), fed)
    assert reported == plain


@pytest.mark.parametrize(("search", "rule"), RULES)
@HARNESS
@given(
    fed=st.one_of(federations("disagree"), federations("ride")), salt=st.text("abc", min_size=1, max_size=3)
)
def test_which_ids_the_members_hold_changes_no_label(
    search: type[ExactConsensus], rule: str, fed: Federation, salt: str
) -> None:
    # Every member renamed, reversing the order the ids sort in.
    members = sorted({m for by in fed.answers.values() for m in by})
    renamed = {m: f"{salt}{len(members) - i:03d}" for i, m in enumerate(members)}
    moved = dataclasses.replace(
        fed, answers={p: {renamed[m]: t for m, t in by.items()} for p, by in fed.answers.items()}
    )
    original = decide(search, rule, fed.candidates(), fed)
    again = decide(search, rule, moved.candidates(), moved)
    assert [d.label for d in again.decisions] == [d.label for d in original.decisions]
    assert [d.abstain_reason for d in again.decisions] == [d.abstain_reason for d in original.decisions]


@pytest.mark.parametrize(("search", "rule"), RULES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=federations("disagree"), data=st.data(), drawn=weights_of)
def test_a_minority_cannot_drive_an_honest_members_reputation_down(
    search: type[ExactConsensus], rule: str, first: Federation, data: st.DataObject, drawn: dict[int, float]
) -> None:
    # The same members every round, each round's shard drawn anew: reputation is computed from the
    # rounds before, as the coordinator does, and the attackers pick their own weights on top of what
    # reputation gives them.
    later = data.draw(st.lists(federations("disagree", members=first), min_size=1, max_size=3))
    support = ConsensusSettings().support_similarity
    history: list[dict[str, float]] = []
    lowest_honest = 1.0
    for fed in [first, *later]:
        assume(honest_agree(fed, support) and attackers_disagree(fed, support))
        lowest_honest = min(
            lowest_honest,
            min(
                similarity(fed, by[a], by[b])
                for by in fed.answers.values()
                for a in fed.honest
                for b in fed.honest
            ),
        )
        members = [*fed.honest, *fed.attackers]
        weights = reputation_weights(history, members, floor=0.1)
        chosen = {m: w for m, w in member_weights(fed, drawn).items() if m in fed.attackers}
        result = decide(search, rule, weighted(fed.candidates(), weights | chosen), fed)
        history.append(dict(result.agreement))
    final = reputation_weights(history, [*first.honest, *first.attackers], floor=0.1)
    # Every label is an honest answer, so an honest member agrees with each at least as much as with
    # the least similar honest answer, and the best member agrees at most fully.
    # (to float32's precision: consensus sees the table's vectors as float32 embeddings, this test in float64)
    for member in first.honest:
        assert final[member] >= lowest_honest - 1e-6
    assert max(final[m] for m in first.attackers) <= min(final[m] for m in first.honest)


def test_the_harness_runs_every_registered_rule_with_both_searches() -> None:
    assert sorted(RULES, key=repr) == sorted(
        ((search, rule) for search in SEARCHES for rule in LABEL_RULES), key=repr
    )
