"""Semantic consensus over one shard: pick, per prompt, the answer the others agree with most.

Pure: plain data in, plain data out; no broker, no clock, no I/O beyond the embedder call.

For each prompt, every non-blank answer is embedded (one embedder call per shard, each distinct text
once). The *density* of an answer is its own weight times the weighted sum of its (non-negative)
cosine similarities to its `neighbours` nearest same-prompt answers, each neighbour weighted by its
`Candidate.weight`. The settings' label rule (`label_choice`, one of coordinator.label_rules) picks
the pseudo-label among the answers; the shipped "medoid" picks the densest answer that is not an
outlier and that a strict majority of the prompt's answers agree with: a real answer, the semantic
medoid of the majority, never a blend. Then:

- confidence = the winner's weighted mean similarity to the prompt's other answers;
- support = how many answers (the winner included) lie within `support_similarity` of it;
- a prompt with fewer than `min_answers` non-blank answers, no non-outlier answer, no answer that
  more than `min_support_share` of its answers (blank ones included, each member counting once
  whatever its weight) lie within `support_similarity` of, or confidence below `min_confidence`
  abstains: no label, and a reason;
- an exact tie between answers that do not agree with each other abstains; between answers that do,
  it goes to the lower hash of the text, never to a participant id.

Why, because members lie (tests/test_label_rules_adversarial.py checks each of these for every label
rule): a weight below 1 (late, low reputation) scales the answer's own density down, so it can only
lower that answer's chance; weights never decide the majority, so down-weighting honest members cannot
turn a minority into one; attackers that are no strict majority of a prompt's answers and disagree with
the honest ones cannot label it; a member's reported numbers (`Answer.logprob`) are not read at all.

`ExactConsensus` computes all pairwise similarities per prompt (the reference). `HnswConsensus` finds
each answer's neighbours with one hnswlib index per shard, restricted to the answer's prompt, and then
scores the neighbours it found with the very same arithmetic, so the two agree whenever the index
finds the true nearest neighbours. Similarities are computed in float64 from the float32 embeddings
and rounded to 1e-9, so that both strategies see the same numbers although they reach them by
different BLAS paths; sums use `math.fsum`, exact and independent of order.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Protocol

import msgspec
import msgspec.inspect
import numpy as np
import numpy.typing as npt
from msgspec import Meta

from common.embedding import Embedder
from coordinator.label_rules import LABEL_RULES, PromptAnswers
from schemas.errors import ChorusError

if TYPE_CHECKING:
    import hnswlib

FloatArray = npt.NDArray[np.float64]
Cosine = Annotated[float, Meta(ge=-1.0, le=1.0)]
IndexArray = npt.NDArray[np.intp]

_SIMILARITY_DECIMALS = 9


class ConsensusError(ChorusError, ValueError):
    """Consensus could not run: bad settings, a bad candidate, or an embedder that misbehaved."""


@dataclass(frozen=True)
class Candidate:
    """One participant's answer to one prompt; a `weight` below 1 (a stale answer, a member with a low
    reputation) can only lower the answer's chance and its pull on others, never raise it."""

    participant_id: str
    text: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and 0.0 < self.weight <= 1.0):
            raise ConsensusError(f"candidate weight must lie in (0, 1], got {self.weight!r}")


@dataclass(frozen=True)
class PromptDecision:
    """The outcome for one prompt. `label` is None when the prompt abstains, with `abstain_reason` set."""

    prompt_id: str
    label: str | None
    source: str | None  # participant whose answer became the label
    confidence: float
    support: int
    abstain_reason: str = ""

    @property
    def labelled(self) -> bool:
        return self.label is not None


@dataclass(frozen=True)
class ShardConsensus:
    """Decisions in prompt-id order; `agreement` maps participant -> mean similarity to the labels."""

    decisions: tuple[PromptDecision, ...]
    agreement: Mapping[str, float]

    @property
    def labelled(self) -> tuple[PromptDecision, ...]:
        return tuple(decision for decision in self.decisions if decision.labelled)

    @property
    def abstained(self) -> tuple[PromptDecision, ...]:
        return tuple(decision for decision in self.decisions if not decision.labelled)


class ConsensusSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Knobs of consensus. Similarity thresholds are cosine similarities in [-1, 1]. The coordinator's
    `[consensus]` settings table is this type plus how to embed and weigh (coordinator.settings), so
    each default and limit is stated here once; a value out of range is refused, on load or here.

    The defaults are tuned for all-MiniLM-L6-v2, where paraphrases of one answer score 0.7-0.97,
    a short answer against its one-sentence form (“Paris” / “The capital of France is Paris.”)
    about 0.72, and unrelated sentences or garbage -0.15 to 0.1:

    - `outlier_similarity` 0.3: an answer whose closest other answer is below 0.3 shares not even the
      topic with anyone, so it must never become a label, whatever its density.
    - `support_similarity` 0.7: counts answers that say roughly the same thing as the label. Embedding
      similarity measures topic and form more than facts (“…is Paris” / “…is Lyon” score 0.75), so
      support is agreement in meaning-space, not a fact check.
    - `min_confidence` 0.5: below it the answers disagree more than they agree, and no label beats a
      wrong one.
    - `min_support_share` 0.5: the label must be agreed with (within `support_similarity`) by more than
      this share of the prompt's answers, every member counting once: a strict majority, so that
      members that are not one cannot write a label on their own. 0 lets any non-outlier answer win
      (the rule before issue #20; not safe against colluders).
    - HNSW: M 16 and ef_construction 100 build a shard's index quickly; query ef 64 (raised to at least
      neighbours + 1) keeps recall on same-prompt neighbours essentially exact at the sizes of a round.
      `hnsw_filter_min_texts` 1024: below it, neighbours the unfiltered search missed are found by a
      brute-force scan of the prompt instead of hnswlib's much slower filtered search.
    """

    neighbours: Annotated[int, Meta(ge=1, le=1_000)] = 8
    min_confidence: Cosine = 0.5
    min_answers: Annotated[int, Meta(ge=2)] = 2  # confidence needs another answer
    outlier_similarity: Cosine = 0.3
    support_similarity: Cosine = 0.7
    hnsw_m: Annotated[int, Meta(ge=2)] = 16
    hnsw_ef_construction: Annotated[int, Meta(ge=1)] = 100
    hnsw_ef: Annotated[int, Meta(ge=1)] = 64
    hnsw_seed: Annotated[int, Meta(ge=0)] = 100
    hnsw_filter_min_texts: Annotated[int, Meta(ge=0)] = 1_024
    min_support_share: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.5
    label_choice: str = "medoid"  # a rule of coordinator.label_rules.LABEL_RULES

    def __post_init__(self) -> None:
        # "surest" (the answer its writer reported the highest log-probability for) let any reported
        # number beat members that reported none.
        if self.label_choice == "surest":
            raise ConsensusError(
                'label_choice "surest" was removed: a member\'s reported log-probability could make its '
                'answer the label (issue #20); remove the key or set "medoid"'
            )
        if self.label_choice not in LABEL_RULES:
            raise ConsensusError(
                f"label_choice must be one of {sorted(LABEL_RULES)}, got {self.label_choice!r}"
            )
        # Decoding a settings file checks the bounds above; constructing in code does not, so check here.
        problems = [problem for field in _bounded_fields(type(self)) if (problem := field.problem(self))]
        if problems:
            raise ConsensusError("invalid consensus settings: " + "; ".join(problems))


@dataclass(frozen=True)
class _Bound:
    name: str
    ge: float | None
    gt: float | None
    le: float | None
    lt: float | None

    def problem(self, settings: object) -> str:
        value = getattr(settings, self.name)
        for limit, holds, words in (
            (self.ge, operator.ge, ">="),
            (self.gt, operator.gt, ">"),
            (self.le, operator.le, "<="),
            (self.lt, operator.lt, "<"),
        ):
            if limit is not None and not holds(value, limit):
                return f"{self.name} must be {words} {limit}, got {value!r}"
        return ""


@cache
def _bounded_fields(kind: type) -> tuple[_Bound, ...]:
    """The numeric bounds a struct type declares, read once from its annotations."""
    info = msgspec.inspect.type_info(kind)
    assert isinstance(info, msgspec.inspect.StructType)
    return tuple(
        _Bound(field.name, field.type.ge, field.type.gt, field.type.le, field.type.lt)
        for field in info.fields
        if isinstance(field.type, msgspec.inspect.IntType | msgspec.inspect.FloatType)
    )


class Consensus(Protocol):
    """Turns a shard's answers (prompt id -> candidates) into per-prompt decisions."""

    @property
    def name(self) -> str: ...

    def decide(self, answers: Mapping[str, Sequence[Candidate]]) -> ShardConsensus: ...


# ---- the shard, prepared ---------------------------------------------------


@dataclass(frozen=True)
class _Prompt:
    """One prompt's answers in canonical order, grouped by distinct text."""

    prompt_id: str
    candidates: tuple[Candidate, ...]  # sorted by (participant, text, weight)
    eligible: IndexArray  # positions in `candidates` of the non-blank answers
    weights: FloatArray  # per eligible answer
    text_of: IndexArray  # per eligible answer, the index of its distinct text (0..texts-1)
    rows: IndexArray  # per distinct text, its row in the shard's embedding matrix

    @property
    def texts(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class _Pools:
    """Per eligible answer (row), the answers that may be its neighbours: their similarity and weight.

    Rows are padded with similarity -inf (no answer). The exact strategy puts every other answer in
    the pool; HNSW puts the other copies of the same text and the copies of the texts it found.
    """

    similarities: FloatArray  # (answers, width)
    weights: FloatArray  # (answers, width)


def _is_blank(text: str) -> bool:
    return not text.strip()


def _canonical(candidates: Sequence[Candidate]) -> tuple[Candidate, ...]:
    return tuple(sorted(candidates, key=lambda c: (c.participant_id, c.text, c.weight)))


def _prepare(answers: Mapping[str, Sequence[Candidate]]) -> tuple[list[_Prompt], list[str]]:
    """Prompts in id order, and the shard's distinct non-blank texts (each embedded once)."""
    row_of_text: dict[str, int] = {}
    prompts = []
    for prompt_id in sorted(answers):
        candidates = _canonical(answers[prompt_id])
        eligible = [i for i, c in enumerate(candidates) if not _is_blank(c.text)]
        local: dict[str, int] = {}
        text_of = [local.setdefault(candidates[i].text, len(local)) for i in eligible]
        rows = [row_of_text.setdefault(text, len(row_of_text)) for text in local]
        prompts.append(
            _Prompt(
                prompt_id=prompt_id,
                candidates=candidates,
                eligible=np.asarray(eligible, dtype=np.intp),
                weights=np.asarray([candidates[i].weight for i in eligible], dtype=np.float64),
                text_of=np.asarray(text_of, dtype=np.intp),
                rows=np.asarray(rows, dtype=np.intp),
            )
        )
    return prompts, list(row_of_text)


def _embed(embedder: Embedder, texts: list[str]) -> FloatArray:
    if not texts:
        return np.zeros((0, embedder.dim), dtype=np.float64)
    vectors = np.asarray(embedder.embed(texts), dtype=np.float64)
    if vectors.shape != (len(texts), embedder.dim):
        raise ConsensusError(
            f"embedder {embedder.name} returned shape {vectors.shape}, expected {(len(texts), embedder.dim)}"
        )
    if not np.isfinite(vectors).all():
        raise ConsensusError(f"embedder {embedder.name} returned non-finite values")
    return vectors


# ---- similarity: the one place numbers are made ----------------------------


def _round_similarities(raw: FloatArray) -> FloatArray:
    rounded: FloatArray = np.round(np.clip(raw, -1.0, 1.0), _SIMILARITY_DECIMALS).astype(np.float64)
    return rounded


def _similarities_to(vectors: FloatArray, rows: IndexArray, row: int) -> FloatArray:
    """Similarity of the text at `row` to the texts at `rows`; a text is exactly 1.0 to itself."""
    similarities = _round_similarities(vectors[rows] @ vectors[row])
    similarities[rows == row] = 1.0
    return similarities


def _similarity_matrix(vectors: FloatArray, rows: IndexArray) -> FloatArray:
    block = vectors[rows]
    similarities = _round_similarities(block @ block.T)
    np.fill_diagonal(similarities, 1.0)
    return similarities


# ---- density, winner, decision ---------------------------------------------


def _densities(pools: _Pools, weights: FloatArray, k: int) -> tuple[FloatArray, FloatArray]:
    """Per answer: its density (weighted sum over its k nearest pool entries) and its closest similarity.

    Nearest means higher similarity, then higher weight; entries equal in both are interchangeable,
    so the chosen multiset, and with `math.fsum` (exact, order-free) the density, is fully defined.
    `weights` are the prompt's answer weights, from which every pool weight is drawn.
    """
    known = np.isfinite(pools.similarities)
    closest = pools.similarities.max(axis=1, initial=-np.inf)
    # 0 for padding; a dissimilar neighbour adds nothing rather than pulling the density down
    products = np.where(known, np.maximum(pools.similarities, 0.0), 0.0) * pools.weights
    width = products.shape[1]
    if width > k:
        key = _nearness_key(pools, known, np.unique(weights))
        nearest = np.argpartition(key, width - k, axis=1)[:, width - k :]
        products = np.take_along_axis(products, nearest, axis=1)
    density = np.asarray([math.fsum(row) for row in products.tolist()], dtype=np.float64)
    return density, closest


def _densities_by_group(prompt: _Prompt, pools: _Pools, k: int) -> tuple[FloatArray, FloatArray]:
    """`_densities` for every answer, computed once per group of answers with the same text and weight.

    Two such answers have pools that are the same multiset of (similarity, weight): each holds the
    other copy where the other holds it, and the same entries otherwise (HNSW pools, too, are their
    text's pool less the answer itself). So their density and closest similarity are equal, and
    computing them per group gives bit-identical results. Identical answers are common (greedy
    decoding repeats itself across participants), and this is most of consensus's time otherwise.
    """
    if len(prompt.weights) <= prompt.texts:  # every answer a distinct text: nothing to share
        return _densities(pools, prompt.weights, k)
    levels, weight_rank = np.unique(prompt.weights, return_inverse=True)
    group_key = prompt.text_of * len(levels) + weight_rank
    _, first, member_of = np.unique(group_key, return_index=True, return_inverse=True)
    chosen = _Pools(similarities=pools.similarities[first], weights=pools.weights[first])
    density, closest = _densities(chosen, prompt.weights, k)
    return density[member_of], closest[member_of]


def _nearness_key(pools: _Pools, known: npt.NDArray[np.bool_], levels: FloatArray) -> npt.NDArray[np.int64]:
    """One integer per entry, larger when nearer: by similarity (on its 1e-9 grid), then by weight."""
    ranks = np.searchsorted(levels, pools.weights).astype(np.int64)  # padding (weight 0) ranks 0, unused
    grid = np.rint(np.where(known, pools.similarities, 0.0) * 10**_SIMILARITY_DECIMALS).astype(np.int64)
    key = grid * (len(levels) + 1) + ranks
    return np.where(known, key, np.iinfo(np.int64).min)


def _abstain(prompt_id: str, reason: str, confidence: float = 0.0, support: int = 0) -> PromptDecision:
    return PromptDecision(prompt_id, None, None, confidence, support, abstain_reason=reason)


def _decide_prompt(
    prompt: _Prompt, pools: _Pools | None, vectors: FloatArray, settings: ConsensusSettings
) -> tuple[PromptDecision, int | None]:
    """The prompt's decision, and the shard row of the label's text (None when it abstains)."""
    usable = len(prompt.weights)
    if usable < settings.min_answers or pools is None:
        blank = len(prompt.candidates) - usable
        detail = f" ({blank} blank)" if blank else ""
        return _abstain(
            prompt.prompt_id, f"usable answers: {usable}{detail}; min_answers is {settings.min_answers}"
        ), None
    density, closest = _densities_by_group(prompt, pools, settings.neighbours)
    choice = LABEL_RULES[settings.label_choice].choose(
        _rule_view(prompt, density * prompt.weights, closest, vectors), settings
    )
    winner = choice.answer
    if winner is None:
        return _abstain(prompt.prompt_id, choice.reason), None
    label_row = int(prompt.rows[prompt.text_of[winner]])
    to_label = _similarities_to(vectors, prompt.rows, label_row)[prompt.text_of]
    confidence = _weighted_mean_without(to_label, prompt.weights, winner)
    support = int(np.count_nonzero(to_label >= settings.support_similarity))
    if confidence < settings.min_confidence:
        reason = f"confidence {confidence:.3f} is below min_confidence {settings.min_confidence}"
        return _abstain(prompt.prompt_id, reason, confidence, support), None
    candidate = prompt.candidates[int(prompt.eligible[winner])]
    decision = PromptDecision(prompt.prompt_id, candidate.text, candidate.participant_id, confidence, support)
    return decision, label_row


def _rule_view(
    prompt: _Prompt, density: FloatArray, closest: FloatArray, vectors: FloatArray
) -> PromptAnswers:
    """The prompt as a label rule sees it: its eligible answers, and similarities by this module's one
    arithmetic."""
    eligible = [prompt.candidates[i] for i in prompt.eligible.tolist()]
    return PromptAnswers(
        prompt_id=prompt.prompt_id,
        participants=tuple(c.participant_id for c in eligible),
        texts=tuple(c.text for c in eligible),
        weights=prompt.weights,
        density=density,
        closest=closest,
        text_of=prompt.text_of,
        answers_total=len(prompt.candidates),
        similarities_to_text=lambda text: _similarities_to(vectors, prompt.rows, int(prompt.rows[text]))[
            prompt.text_of
        ],
        text_similarities=lambda texts: _similarity_matrix(vectors, prompt.rows[list(texts)]),
    )


def _weighted_mean_without(values: FloatArray, weights: FloatArray, skip: int) -> float:
    keep = np.ones(len(values), dtype=bool)
    keep[skip] = False
    total = math.fsum(weights[keep].tolist())
    mean = math.fsum((values[keep] * weights[keep]).tolist()) / total
    return min(1.0, max(-1.0, mean))


def _agreement(prompts: list[_Prompt], label_rows: list[int | None], vectors: FloatArray) -> dict[str, float]:
    """Participant -> mean similarity of its answers to the labels; a blank answer counts as 0."""
    scores: dict[str, list[float]] = {}
    for prompt, label_row in zip(prompts, label_rows, strict=True):
        if label_row is None:
            continue
        to_label = _similarities_to(vectors, prompt.rows, label_row)[prompt.text_of]
        similarity_of = dict(zip(prompt.eligible.tolist(), to_label.tolist(), strict=True))
        for position, candidate in enumerate(prompt.candidates):
            scores.setdefault(candidate.participant_id, []).append(similarity_of.get(position, 0.0))
    return {participant: math.fsum(s) / len(s) for participant, s in sorted(scores.items())}


# ---- strategies ------------------------------------------------------------


class _MedoidConsensus:
    """Everything but the neighbour search, shared by the exact and the HNSW strategies."""

    name = "medoid"

    def __init__(self, embedder: Embedder, settings: ConsensusSettings | None = None) -> None:
        self.embedder = embedder
        self.settings = settings if settings is not None else ConsensusSettings()

    def decide(self, answers: Mapping[str, Sequence[Candidate]]) -> ShardConsensus:
        prompts, texts = _prepare(answers)
        vectors = _embed(self.embedder, texts)
        deciding = [prompt for prompt in prompts if len(prompt.weights) >= self.settings.min_answers]
        pools = dict(zip((p.prompt_id for p in deciding), self._pools(deciding, vectors), strict=True))
        outcomes = [
            _decide_prompt(prompt, pools.get(prompt.prompt_id), vectors, self.settings) for prompt in prompts
        ]
        agreement = _agreement(prompts, [row for _, row in outcomes], vectors)
        return ShardConsensus(
            decisions=tuple(decision for decision, _ in outcomes), agreement=MappingProxyType(agreement)
        )

    def _pools(self, prompts: list[_Prompt], vectors: FloatArray) -> list[_Pools]:
        """Per prompt (each with at least min_answers answers): every answer's neighbour candidates."""
        raise NotImplementedError


class ExactConsensus(_MedoidConsensus):
    """Reference strategy: every pairwise similarity of a prompt's answers, in NumPy."""

    name = "exact"

    def _pools(self, prompts: list[_Prompt], vectors: FloatArray) -> list[_Pools]:
        return [_all_pairs(prompt, vectors) for prompt in prompts]


def _all_pairs(prompt: _Prompt, vectors: FloatArray) -> _Pools:
    by_text = _similarity_matrix(vectors, prompt.rows)
    similarities = by_text[np.ix_(prompt.text_of, prompt.text_of)]
    np.fill_diagonal(similarities, -np.inf)  # an answer is not its own neighbour
    weights = np.broadcast_to(prompt.weights, similarities.shape)
    return _Pools(similarities=similarities, weights=weights)


class HnswConsensus(_MedoidConsensus):
    """Approximate strategy: one hnswlib index over the shard, kNN restricted to the same prompt.

    The index holds each prompt's distinct answers under contiguous labels [start, end). Each text
    needs its neighbours + 1 nearest same-prompt texts (it finds itself); every copy of a found text
    joins its pool, so the k nearest *answers* are always among them. Found neighbours are re-scored
    with the exact arithmetic, so any difference from `ExactConsensus` comes only from a neighbour the
    index missed.

    A prompt with at most neighbours + 1 distinct texts needs no search (all its texts are
    neighbours): it is scored exactly and left out of the index. The others are searched in two
    passes, because hnswlib's `filter=` is a Python callable that it calls, under the GIL, for every
    node it visits (slower than an unfiltered query, and slower still with more threads). Pass one:
    one unfiltered batch query for every text of the shard, asking for twice the neighbours needed,
    keeping the same-prompt hits in order; a prompt's answers sit together in embedding space, so
    that usually suffices. Pass two, only for the texts still short (typically answers far from the
    rest of their prompt):

    - in a prompt with fewer than `hnsw_filter_min_texts` distinct texts, a brute-force scan of the
      prompt's texts (`scanned_queries` counts them). A filter that admits a few dozen labels of a
      large index makes hnswlib visit much of the graph, a Python call per node: with 10 answers a
      prompt (500 prompts), a shard took 1.194 CPU s with `filter=` always against 0.446 s with the
      scan (`python -m bench.bench_hnsw`, its `filter= always` rows; bench/results/hnsw_vs_exact.md);
    - in larger prompts, one hnswlib query per prompt with `filter=` restricted to the prompt's label
      range (`filtered_queries` counts them).

    `fallbacks` counts prompts for which even the filtered search could not return enough neighbours
    (a graph too sparse) and exact scoring ran instead.
    """

    name = "hnsw"

    def __init__(self, embedder: Embedder, settings: ConsensusSettings | None = None) -> None:
        super().__init__(embedder, settings)
        self.scanned_queries = 0
        self.filtered_queries = 0
        self.fallbacks = 0

    def _pools(self, prompts: list[_Prompt], vectors: FloatArray) -> list[_Pools]:
        needs_search = {prompt.prompt_id for prompt in prompts if prompt.texts > self.settings.neighbours + 1}
        pools = {p.prompt_id: _all_pairs(p, vectors) for p in prompts if p.prompt_id not in needs_search}
        searched = [prompt for prompt in prompts if prompt.prompt_id in needs_search]
        if searched:
            pools.update(self._searched_pools(searched, vectors))
        return [pools[prompt.prompt_id] for prompt in prompts]

    def _searched_pools(self, prompts: list[_Prompt], vectors: FloatArray) -> dict[str, _Pools]:
        block = np.concatenate([vectors[prompt.rows] for prompt in prompts]).astype(np.float32)
        starts = np.cumsum([0] + [prompt.texts for prompt in prompts])[:-1].tolist()
        index = self._build_index(block)
        nearest = self._unfiltered(index, block)
        return {
            prompt.prompt_id: self._prompt_pools(
                index, block, prompt, start, nearest[start : start + prompt.texts], vectors
            )
            for prompt, start in zip(prompts, starts, strict=True)
        }

    def _build_index(self, block: npt.NDArray[np.float32]) -> hnswlib.Index:
        import hnswlib  # not at the top: loading settings (ConsensusSettings lives here) needs no index

        index = hnswlib.Index(space="ip", dim=block.shape[1])  # rows are unit length: ip is cosine
        index.init_index(
            max_elements=len(block),
            M=self.settings.hnsw_m,
            ef_construction=self.settings.hnsw_ef_construction,
            random_seed=self.settings.hnsw_seed,
        )
        # One thread: multi-threaded insertion order varies between runs, and so would the graph.
        index.add_items(block, np.arange(len(block)), num_threads=1)
        index.set_ef(max(self.settings.hnsw_ef, self._unfiltered_k(len(block))))
        return index

    def _unfiltered_k(self, total: int) -> int:
        return min(2 * (self.settings.neighbours + 1), total)

    def _unfiltered(self, index: hnswlib.Index, block: npt.NDArray[np.float32]) -> IndexArray:
        """Every text's nearest texts of the whole shard, nearest first (no columns if the search failed)."""
        try:
            labels, _ = index.knn_query(block, k=self._unfiltered_k(len(block)), num_threads=1)
        except RuntimeError:
            return np.zeros((len(block), 0), dtype=np.intp)
        return np.asarray(labels, dtype=np.intp)

    def _prompt_pools(
        self,
        index: hnswlib.Index,
        block: npt.NDArray[np.float32],
        prompt: _Prompt,
        start: int,
        nearest: IndexArray,
        vectors: FloatArray,
    ) -> _Pools:
        wanted = self.settings.neighbours + 1  # less than prompt.texts: smaller prompts are not searched
        end = start + prompt.texts
        same_prompt = (nearest >= start) & (nearest < end)
        found = np.full((prompt.texts, wanted + 1), -1, dtype=np.intp)  # -1: no text
        complete = same_prompt.sum(axis=1) >= wanted
        if complete.any():
            first_same = np.argsort(~same_prompt[complete], axis=1, kind="stable")[:, :wanted]
            found[complete, :wanted] = np.take_along_axis(nearest[complete], first_same, axis=1) - start
        short = np.flatnonzero(~complete)
        if len(short) and prompt.texts < self.settings.hnsw_filter_min_texts:
            self.scanned_queries += len(short)
            found[short] = _scan_nearest(block[start:end], short, wanted + 1)
        elif len(short):
            try:
                found[short, :wanted] = (
                    self._filtered(index, block[start + short], start, end, wanted) - start
                )
            except RuntimeError:  # hnswlib: "Cannot return the results in a contiguous 2D array"
                self.fallbacks += 1
                return _all_pairs(prompt, vectors)
        return _pools_from_found(prompt, found, vectors)

    def _filtered(
        self, index: hnswlib.Index, queries: npt.NDArray[np.float32], start: int, end: int, wanted: int
    ) -> IndexArray:
        self.filtered_queries += len(queries)
        # hnswlib's filtered search stops only once it holds `ef` allowed labels: an ef above the
        # prompt's size would make it walk the whole graph.
        index.set_ef(max(wanted, min(self.settings.hnsw_ef, end - start - 1)))
        # A closure: measured faster under hnswlib than the C-level range(start, end).__contains__.
        labels, _ = index.knn_query(
            queries, k=wanted, num_threads=1, filter=lambda label: start <= label < end
        )
        return np.asarray(labels, dtype=np.intp)


def _scan_nearest(prompt_block: npt.NDArray[np.float32], rows: IndexArray, count: int) -> IndexArray:
    """The `count` texts of a prompt nearest to each of `rows` (the row itself included), by brute force.

    `count` is one more than needed: the spare absorbs float32 near-ties at the boundary.
    """
    similarities = prompt_block[rows] @ prompt_block.T
    nearest: IndexArray = np.argpartition(-similarities, count - 1, axis=1)[:, :count]
    return nearest


def _pools_from_found(prompt: _Prompt, found: IndexArray, vectors: FloatArray) -> _Pools:
    """Pools from each distinct text's found texts: its own other copies, and every copy of those found.

    Vectorised: a text's pool lists, for itself and each text found for it, all answers with that
    text; an answer's pool is its text's pool without the answer itself.
    """
    own = np.arange(prompt.texts)[:, None]
    texts = np.concatenate([own, np.where(found == own, -1, found)], axis=1)  # -1: nothing (self, found)
    valid = texts >= 0
    texts = np.where(valid, texts, own)
    block = vectors[prompt.rows]
    similarities = _round_similarities(np.einsum("id,iwd->iw", block, block[texts]))
    similarities[:, 0] = 1.0  # the other copies of the text itself
    by_text = np.argsort(prompt.text_of, kind="stable")  # answers grouped by text
    copies = np.bincount(prompt.text_of, minlength=prompt.texts)
    entry_copies = np.where(valid, copies[texts], 0).ravel()
    members = by_text[_expand_ranges((np.cumsum(copies) - copies)[texts].ravel(), entry_copies)]
    widths = np.where(valid, copies[texts], 0).sum(axis=1)
    row = np.repeat(np.arange(prompt.texts), widths)
    column = _expand_ranges(np.zeros(prompt.texts, dtype=np.intp), widths)
    text_members = np.full((prompt.texts, int(widths.max())), -1, dtype=np.intp)
    text_similarities = np.full(text_members.shape, -np.inf)
    text_members[row, column] = members
    text_similarities[row, column] = np.repeat(similarities.ravel(), entry_copies)
    pool_members = text_members[prompt.text_of]
    is_self = pool_members == np.arange(len(prompt.text_of))[:, None]
    pool_similarities = np.where(is_self, -np.inf, text_similarities[prompt.text_of])
    pool_weights = np.where(pool_members >= 0, prompt.weights[pool_members], 0.0)
    return _Pools(similarities=pool_similarities, weights=pool_weights)


def _expand_ranges(starts: IndexArray, lengths: IndexArray) -> IndexArray:
    """Concatenation of range(start, start + length) for each pair, without a Python loop."""
    total = int(lengths.sum())
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    expanded: IndexArray = np.repeat(starts, lengths) + np.arange(total) - offsets
    return expanded
