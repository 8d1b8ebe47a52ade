"""Semantic consensus: who wins, who abstains, and that the HNSW path agrees with the exact one."""

from __future__ import annotations

import random
import string
from collections.abc import Iterator, Mapping, Sequence

import msgspec
import numpy as np
import numpy.typing as npt
import pytest
from support.geometry import TableEmbedder, block_gram, table_of

from common.embedding import Embedder, HashingEmbedder, SentenceEmbedder
from coordinator.consensus import (
    Candidate,
    Consensus,
    ConsensusError,
    ConsensusSettings,
    ExactConsensus,
    HnswConsensus,
    ShardConsensus,
)

Answers = dict[str, list[Candidate]]
STRATEGIES = [ExactConsensus, HnswConsensus]


def candidates(*texts: str, weight: float = 1.0, first: int = 0) -> list[Candidate]:
    return [Candidate(f"p{first + i:02d}", text, weight) for i, text in enumerate(texts)]


def both(embedder: Embedder, answers: Mapping[str, Sequence[Candidate]], **settings: float) -> ShardConsensus:
    """Runs both strategies, checks that they agree, and returns the result."""
    chosen = ConsensusSettings(**settings)  # type: ignore[arg-type]
    results = [strategy(embedder, chosen).decide(answers) for strategy in STRATEGIES]
    assert results[0] == results[1]
    return results[0]


@pytest.fixture(scope="module")
def minilm() -> Iterator[SentenceEmbedder]:
    yield SentenceEmbedder()


# ---- who wins --------------------------------------------------------------


def test_clear_majority_wins_with_minilm(minilm: SentenceEmbedder) -> None:
    answers = {
        "capital": [
            Candidate("alice", "The capital of France is Paris."),
            Candidate("bob", "Paris is the capital of France."),
            Candidate("carol", "France's capital city is Paris."),
            Candidate("dave", "The capital of France is Lyon."),
            Candidate("eve", "zxq vlorp 9931 !!"),
        ]
    }
    result = both(minilm, answers)
    [decision] = result.decisions
    assert decision.label in {"The capital of France is Paris.", "Paris is the capital of France."}
    assert decision.source in {"alice", "bob"}
    assert decision.confidence > 0.5
    assert 3 <= decision.support <= 4  # the paraphrases (and perhaps the on-topic wrong answer)
    assert min(result.agreement, key=lambda p: result.agreement[p]) == "eve"


def test_majority_cluster_beats_a_minority_cluster() -> None:
    texts = ["a1", "a2", "a3", "a4", "b1", "b2", "b3"]
    embedder = table_of(texts, block_gram([4, 3], within=0.9, between=0.3))
    shuffled = [Candidate(f"p{i}", text) for i, text in enumerate(reversed(texts))]
    [decision] = both(embedder, {"q": shuffled}, min_confidence=0.0).decisions
    assert decision.label is not None and decision.label.startswith("a")
    assert decision.support == 4
    # confidence is the winner's mean similarity to the other six answers: 3 × 0.9 and 3 × 0.3
    assert decision.confidence == pytest.approx((3 * 0.9 + 3 * 0.3) / 6, abs=1e-6)


def test_lone_outlier_never_wins_even_when_its_density_is_highest() -> None:
    # Eight pairs in orthogonal planes (0.35 within a pair) and one answer X equally close to all
    # sixteen, at 0.29: X has the highest density of all, yet it agrees with nobody well enough.
    pair_similarity, pairs = 0.35, 8
    vectors = np.zeros((2 * pairs + 1, 2 * pairs))
    for p in range(pairs):
        vectors[2 * p, 2 * p] = 1.0
        vectors[2 * p + 1, 2 * p : 2 * p + 2] = [pair_similarity, np.sqrt(1 - pair_similarity**2)]
    everyone = vectors[:-1].sum(axis=0)
    vectors[-1] = everyone / np.linalg.norm(everyone)
    texts = [f"pair{p}-{side}" for p in range(pairs) for side in "ab"] + ["X"]
    embedder = TableEmbedder(dict(zip(texts, vectors, strict=True)))
    answers = {"q": candidates(*texts)}
    assert float(vectors[-1] @ vectors[0]) < 0.3

    loose = {"min_confidence": -1.0, "min_support_share": 0.0}  # the outlier rule alone
    with_rule = both(embedder, answers, **loose, outlier_similarity=0.3).decisions[0]
    without_rule = both(embedder, answers, **loose, outlier_similarity=-1.0).decisions[0]
    assert without_rule.label == "X"  # the rule, not the density, is what keeps X out
    assert with_rule.label != "X"  # (the sixteen pair answers tie exactly, and disagree: it abstains)


def test_garbage_outlier_never_wins_among_many_duplicates() -> None:
    hashing = HashingEmbedder(256)
    honest = ["water boils at 100 degrees celsius"] * 3 + ["water boils at one hundred degrees celsius"] * 2
    for garbage_count in (1, 2):
        answers = {"q": candidates(*honest, *["qq zzv kkx"] * 1, *["ppl 0987 vv"] * (garbage_count - 1))}
        [decision] = both(hashing, answers).decisions
        assert decision.label == "water boils at 100 degrees celsius"
        assert decision.source == "p00"


def test_empty_and_whitespace_answers_never_win_and_count_as_disagreement() -> None:
    hashing = HashingEmbedder(256)
    answers = {
        "q": [
            *candidates("   "),
            *candidates("the sky is blue", "the sky is blue!", first=10),
        ]
    }
    result = both(hashing, answers)
    [decision] = result.decisions
    assert decision.label in {"the sky is blue", "the sky is blue!"}
    assert decision.support == 2  # of 3 answers, the blank one against
    assert result.agreement["p00"] == 0.0
    four_blank = {
        "q": [*candidates("", " ", "\n", "\t"), *candidates("the sky is blue", "the sky is blue!", first=10)]
    }
    assert both(hashing, four_blank).decisions[0].label is None  # 2 of 6: no majority
    assert result.agreement["p10"] > 0.9


def test_ties_between_agreeing_answers_do_not_go_by_participant_id() -> None:
    embedder = table_of(["x", "y"], [[1.0, 0.8], [0.8, 1.0]])
    chosen = set()
    for order in (["zed", "amy"], ["amy", "zed"]):
        for texts in (dict(zip(order, ["x", "y"], strict=True)), dict(zip(order, ["y", "x"], strict=True))):
            answers = {"q": [Candidate(p, texts[p]) for p in order]}
            [decision] = both(embedder, answers).decisions
            chosen.add(decision.label)
    assert len(chosen) == 1  # the same text whoever wrote it and whichever id sorts first


def test_an_exact_tie_between_answers_that_disagree_abstains() -> None:
    # Two pairs, each of two identical answers, 0.2 apart: no majority either way (and no id decides).
    embedder = table_of(["x", "y"], [[1.0, 0.2], [0.2, 1.0]])
    answers = {"q": [Candidate("a", "x"), Candidate("b", "x"), Candidate("c", "y"), Candidate("d", "y")]}
    [decision] = both(embedder, answers, min_confidence=0.0, min_support_share=0.0).decisions
    assert decision.label is None and "tie" in decision.abstain_reason
    [decision] = both(embedder, answers, min_confidence=0.0).decisions
    assert decision.label is None and "more than 0.5" in decision.abstain_reason


def test_a_label_needs_a_strict_majority_of_the_answers_blank_ones_included() -> None:
    embedder = table_of(["x", "y", "z"], block_gram([1, 1, 1], within=1.0, between=0.1))
    pair = [Candidate("a", "x"), Candidate("b", "x")]
    [decision] = both(embedder, {"q": [*pair, Candidate("c", "y")]}, min_confidence=0.0).decisions
    assert decision.label == "x"  # 2 of 3
    four = [*pair, Candidate("c", "y"), Candidate("d", "z")]
    [decision] = both(embedder, {"q": four}, min_confidence=0.0).decisions
    assert decision.label is None  # 2 of 4 is no strict majority
    blank = [*pair, Candidate("c", "y"), Candidate("d", " ")]
    [decision] = both(embedder, {"q": blank}, min_confidence=0.0).decisions
    assert decision.label is None  # a blank answer counts as one that disagrees
    stale = [Candidate("a", "x", 0.1), Candidate("b", "x", 0.1), Candidate("c", "y")]
    [decision] = both(embedder, {"q": stale}, min_confidence=0.0).decisions
    assert decision.label == "x"  # weights order the majority's answers; they do not make or unmake one


def test_a_down_weighted_answer_between_an_agreeing_pair_does_not_beat_it() -> None:
    # The rider r is 0.84 from h1 and 0.77 from h2, which agree at 0.87 (the hashing geometry of
    # tests/support/capture.py): in time it loses; at any lower weight it must lose too.
    gram = [[1.0, 0.87, 0.84], [0.87, 1.0, 0.77], [0.84, 0.77, 1.0]]
    embedder = table_of(["h1", "h2", "r"], gram)
    for weight in (1.0, 0.5, 0.375, 0.1):
        answers = {"q": [Candidate("h1", "h1"), Candidate("h2", "h2"), Candidate("m", "r", weight)]}
        [decision] = both(embedder, answers).decisions
        assert decision.label == "h1", weight


def test_identical_answers_from_several_participants_form_a_majority() -> None:
    embedder = table_of(["same", "other1", "other2"], block_gram([1, 2], within=0.7, between=0.6))
    answers = {
        "q": [
            Candidate("c", "same"),
            Candidate("b", "same"),
            Candidate("a", "other1"),
            Candidate("d", "other2"),
        ]
    }
    [decision] = both(embedder, answers, min_support_share=0.0).decisions  # density alone
    assert (decision.label, decision.source) == ("same", "b")


# ---- staleness -------------------------------------------------------------


def test_stale_weight_lowers_influence() -> None:
    texts = ["f1", "f2", "f3", "s1", "s2", "s3"]
    embedder = table_of(texts, block_gram([3, 3], within=0.9, between=0.4))

    def winner(stale: str) -> str | None:
        answers = {
            "q": [Candidate(f"p{i}", t, 0.5 if t.startswith(stale) else 1.0) for i, t in enumerate(texts)]
        }
        return both(embedder, answers, min_confidence=0.0, min_support_share=0.0).decisions[0].label

    assert winner(stale="s") == "f1"
    assert winner(stale="f") == "s1"  # the same answers, the other cluster stale: the other cluster wins


def test_stale_answers_weigh_less_in_confidence() -> None:
    embedder = table_of(["a", "b", "c"], [[1.0, 0.9, 0.2], [0.9, 1.0, 0.3], [0.2, 0.3, 1.0]])
    fresh = both(embedder, {"q": candidates("a", "b", "c")}, min_confidence=0.0).decisions[0]
    stale_c = both(embedder, {"q": [*candidates("a", "b"), Candidate("p99", "c", 0.25)]}, min_confidence=0.0)
    assert fresh.label == stale_c.decisions[0].label == "b"
    assert fresh.confidence == pytest.approx((0.9 + 0.3) / 2)
    assert stale_c.decisions[0].confidence == pytest.approx((0.9 + 0.25 * 0.3) / 1.25)


# ---- abstaining ------------------------------------------------------------


def test_total_disagreement_abstains() -> None:
    answers = {
        "q": [
            Candidate("a", "Photosynthesis happens in chloroplasts."),
            Candidate("b", "The stock market fell on Tuesday."),
            Candidate("c", "Bake at 180 degrees for forty minutes."),
            Candidate("d", "My favourite colour is green."),
        ]
    }
    [decision] = both(HashingEmbedder(512), answers).decisions
    assert decision.label is None and decision.source is None
    assert "outlier" in decision.abstain_reason


def test_lukewarm_agreement_below_min_confidence_abstains() -> None:
    embedder = table_of(["a", "b", "c"], block_gram([1, 1, 1], within=1.0, between=0.4))
    answers = {"q": candidates("a", "b", "c")}
    [decision] = both(embedder, answers, min_support_share=0.0).decisions
    assert decision.label is None
    assert "min_confidence" in decision.abstain_reason
    assert decision.confidence == pytest.approx(0.4)
    [accepted] = both(embedder, answers, min_confidence=0.35, min_support_share=0.0).decisions
    assert accepted.label == "a"


def test_too_few_answers_abstain() -> None:
    hashing = HashingEmbedder(64)
    answers = {"one": candidates("only answer"), "none": [], "blank": candidates("fine answer", " ")}
    decisions = {d.prompt_id: d for d in both(hashing, answers).decisions}
    assert all(d.label is None for d in decisions.values())
    assert "min_answers" in decisions["one"].abstain_reason
    assert "1 blank" in decisions["blank"].abstain_reason
    three = both(hashing, {"q": candidates("a b c", "a b c d", "a b c e")}, min_answers=4).decisions[0]
    assert three.label is None


def test_empty_shard() -> None:
    result = both(HashingEmbedder(16), {})
    assert result.decisions == ()
    assert dict(result.agreement) == {}


# ---- agreement -------------------------------------------------------------


def _honest_and_adversarial_round(rng: random.Random) -> Answers:
    facts = ["paris", "oxygen", "jupiter", "shakespeare", "pacific", "everest", "mitochondria", "euro"]
    answers: Answers = {}
    for i, fact in enumerate(facts):
        honest = [f"the answer is {fact}", f"i think the answer is {fact}", f"{fact} is the answer"]
        prompt = [Candidate(f"honest{k}", rng.choice(honest)) for k in range(5)]
        garbage = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(30))
        answers[f"q{i}"] = [*prompt, Candidate("mallory", garbage)]
    return answers


def test_agreement_ranks_an_adversarial_participant_last() -> None:
    result = both(HashingEmbedder(256), _honest_and_adversarial_round(random.Random(7)))
    assert all(d.labelled for d in result.decisions)
    assert all(d.source != "mallory" for d in result.decisions)
    ranking = sorted(result.agreement, key=lambda p: result.agreement[p])
    assert ranking[0] == "mallory"
    assert (
        result.agreement["mallory"]
        < 0.3
        < 0.6
        < min(v for p, v in result.agreement.items() if p != "mallory")
    )


def test_agreement_leaves_out_participants_without_labelled_answers() -> None:
    hashing = HashingEmbedder(128)
    answers = {
        "labelled": candidates("red apple", "red apple"),
        "abstained": [Candidate("loner", "something else entirely")],
    }
    result = both(hashing, answers)
    assert set(result.agreement) == {"p00", "p01"}
    assert result.agreement["p00"] == 1.0


# ---- mechanics -------------------------------------------------------------


def test_the_whole_shard_is_embedded_in_one_call_each_text_once() -> None:
    texts = ["a", "b", "c"]
    embedder = table_of(texts, block_gram([3], within=0.8, between=0.0))
    answers = {"q1": candidates("a", "b", "a", " "), "q2": candidates("b", "c"), "q3": []}
    for strategy in STRATEGIES:
        embedder.calls.clear()
        strategy(embedder).decide(answers)
        assert len(embedder.calls) == 1
        assert sorted(embedder.calls[0]) == texts


def test_same_input_in_any_order_gives_the_same_output() -> None:
    rng = random.Random(3)
    answers = _honest_and_adversarial_round(rng)
    shuffled = {prompt: rng.sample(found, len(found)) for prompt, found in reversed(answers.items())}
    hashing = HashingEmbedder(256)
    for strategy in STRATEGIES:
        first = strategy(hashing).decide(answers)
        assert strategy(hashing).decide(answers) == first
        assert strategy(hashing).decide(shuffled) == first
        assert [d.prompt_id for d in first.decisions] == sorted(answers)


def test_strategies_satisfy_the_protocol() -> None:
    strategies: list[Consensus] = [
        ExactConsensus(HashingEmbedder()),
        HnswConsensus(HashingEmbedder()),
    ]
    assert [s.name for s in strategies] == ["exact", "hnsw"]


def test_invalid_settings_and_candidates_are_rejected() -> None:
    for bad in ({"min_answers": 1}, {"neighbours": 0}, {"min_confidence": 1.5}, {"hnsw_m": 1}):
        with pytest.raises(ConsensusError):
            ConsensusSettings(**bad)
    for weight in (0.0, -1.0, 1.5, float("nan")):
        with pytest.raises(ConsensusError):
            Candidate("p", "text", weight)


# ---- HNSW against the exact reference --------------------------------------


def _random_shard(rng: np.random.Generator, prompts: int, dim: int) -> tuple[Answers, TableEmbedder]:
    """Prompts with 2-40 answers drawn around 1-4 topic centres, with repeats, blanks and stale answers."""
    table: dict[str, npt.NDArray[np.float64]] = {}
    answers: Answers = {}
    for prompt in range(prompts):
        centres = rng.standard_normal((int(rng.integers(1, 5)), dim))
        spread = rng.uniform(0.3, 1.5)
        found: list[Candidate] = []
        for answer in range(int(rng.integers(2, 41))):
            weight = 0.5 if rng.random() < 0.2 else 1.0
            if found and rng.random() < 0.15:  # a repeat of an earlier text, as greedy decoding produces
                text = found[int(rng.integers(len(found)))].text
            elif rng.random() < 0.05:
                text = " "
            else:
                text = f"q{prompt}-a{answer}"
                vector = centres[int(rng.integers(len(centres)))] + spread * rng.standard_normal(dim)
                table[text] = vector / np.linalg.norm(vector)
            found.append(Candidate(f"p{int(rng.integers(60)):02d}", text, weight))
        answers[f"q{prompt:03d}"] = found
    return answers, TableEmbedder(table)


@pytest.mark.parametrize("seed", range(12))
def test_hnsw_and_exact_agree_on_random_shards(seed: int) -> None:
    rng = np.random.default_rng(seed)
    answers, embedder = _random_shard(rng, prompts=30, dim=24)
    settings = ConsensusSettings(
        neighbours=int(rng.integers(1, 12)),
        min_confidence=float(rng.uniform(0.0, 0.4)),
        outlier_similarity=0.1,
        support_similarity=0.3,  # the random clusters are loose: a majority still forms on many prompts
        min_support_share=0.5 if seed % 2 else 0.0,
    )
    exact = ExactConsensus(embedder, settings).decide(answers)
    hnsw = HnswConsensus(embedder, settings).decide(answers)
    assert sum(d.labelled for d in exact.decisions) >= 5  # the shards exercise labelling, not just abstaining
    assert [d.label for d in hnsw.decisions] == [d.label for d in exact.decisions]
    assert hnsw == exact


def test_hnsw_agrees_with_exact_on_hashed_text_at_scale() -> None:
    rng = random.Random(11)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "zeta", "iota"]
    answers: Answers = {}
    for prompt in range(20):
        base = rng.sample(words, 5)
        found = []
        for k in range(120):
            tokens = [w if rng.random() < 0.8 else rng.choice(words) for w in base]
            found.append(Candidate(f"p{k:03d}", " ".join(tokens), 0.5 if k % 7 == 0 else 1.0))
        answers[f"q{prompt}"] = found
    hashing = HashingEmbedder(128)
    exact = ExactConsensus(hashing).decide(answers)
    hnsw = HnswConsensus(hashing).decide(answers)
    assert all(d.labelled for d in exact.decisions)
    assert hnsw == exact


def _interleaved_shard(seed: int) -> tuple[Answers, TableEmbedder]:
    """Ten prompts whose answers all come from one shared cloud, so an unfiltered search mixes prompts."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(16)
    table: dict[str, npt.NDArray[np.float64]] = {}
    answers: Answers = {}
    for prompt in range(10):
        found = []
        for answer in range(25):
            vector = centre + 1.2 * rng.standard_normal(16)
            text = f"q{prompt}-a{answer}"
            table[text] = vector / np.linalg.norm(vector)
            found.append(Candidate(f"p{answer:02d}", text))
        answers[f"q{prompt}"] = found
    return answers, TableEmbedder(table)


@pytest.mark.parametrize("filter_min_texts", [0, 1_024])
def test_hnsw_second_pass_when_prompts_overlap_still_agrees(filter_min_texts: int) -> None:
    answers, embedder = _interleaved_shard(5)
    settings = ConsensusSettings(
        min_confidence=0.0, outlier_similarity=-1.0, hnsw_filter_min_texts=filter_min_texts
    )
    hnsw = HnswConsensus(embedder, settings)
    result = hnsw.decide(answers)
    if filter_min_texts == 0:
        assert hnsw.filtered_queries > 0 and hnsw.scanned_queries == 0  # hnswlib's filter= ran
    else:
        assert hnsw.scanned_queries > 0 and hnsw.filtered_queries == 0  # the brute-force scan ran
    assert result == ExactConsensus(embedder, settings).decide(answers)


def test_hnsw_falls_back_to_exact_scoring_when_the_filtered_search_fails() -> None:
    class FailingSearch(HnswConsensus):
        def _filtered(self, *args: object, **kwargs: object) -> npt.NDArray[np.intp]:
            raise RuntimeError("Cannot return the results in a contiguous 2D array")

    answers, embedder = _interleaved_shard(6)
    settings = ConsensusSettings(min_confidence=0.0, hnsw_filter_min_texts=0)
    failing = FailingSearch(embedder, settings)
    assert failing.decide(answers) == ExactConsensus(embedder, settings).decide(answers)
    assert failing.fallbacks > 0


def test_settings_are_plain_comparable_data() -> None:
    settings = ConsensusSettings()
    assert msgspec.structs.replace(settings, neighbours=8) == settings
    assert settings.outlier_similarity < settings.min_confidence < settings.support_similarity


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("seed", range(6))
def test_densities_computed_per_group_of_identical_answers_equal_the_per_answer_ones(
    strategy: type[ExactConsensus] | type[HnswConsensus], seed: int
) -> None:
    from coordinator.consensus import _densities, _densities_by_group, _embed, _prepare

    rng = np.random.default_rng(100 + seed)
    answers, embedder = _random_shard(rng, prompts=20, dim=16)
    # Many copies of a few texts, some stale: the groups the shortcut shares work between.
    for prompt_id, found in answers.items():
        texts = [c.text for c in found[:3]]
        answers[prompt_id] = found + [
            Candidate(f"r{i:02d}", texts[i % len(texts)], 0.5 if i % 4 == 0 else 1.0) for i in range(30)
        ]
    settings = ConsensusSettings(neighbours=int(rng.integers(1, 12)))
    prompts, texts = _prepare(answers)
    vectors = _embed(embedder, texts)
    deciding = [p for p in prompts if len(p.weights) >= settings.min_answers]
    shared = 0
    for prompt, pools in zip(deciding, strategy(embedder, settings)._pools(deciding, vectors), strict=True):
        per_answer = _densities(pools, prompt.weights, settings.neighbours)
        grouped = _densities_by_group(prompt, pools, settings.neighbours)
        np.testing.assert_array_equal(grouped[0], per_answer[0])  # bit for bit, not approximately
        np.testing.assert_array_equal(grouped[1], per_answer[1])
        groups = set(zip(prompt.text_of.tolist(), prompt.weights.tolist(), strict=True))
        shared += len(prompt.weights) - len(groups)
    assert shared > 100  # the shortcut really had groups to share
