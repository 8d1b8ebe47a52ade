"""Exact geometry for consensus tests: an embedder that looks texts up in a table of unit vectors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from common.embedding import Embeddings


class TableEmbedder:
    """Looks each text up in a table of unit vectors: exact geometry for tests. Counts its calls."""

    name = "table"

    def __init__(self, table: Mapping[str, npt.NDArray[np.float64]]) -> None:
        self.table = {text: np.asarray(vector, dtype=np.float32) for text, vector in table.items()}
        self.dim = len(next(iter(self.table.values())))
        self.calls: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> Embeddings:
        self.calls.append(list(texts))
        return (
            np.stack([self.table[text] for text in texts]) if texts else np.zeros((0, self.dim), np.float32)
        )


def vectors_with_gram(gram: Sequence[Sequence[float]]) -> npt.NDArray[np.float64]:
    """Unit vectors whose pairwise cosine similarities are exactly `gram` (positive definite)."""
    return np.linalg.cholesky(np.asarray(gram, dtype=np.float64))


def table_of(texts: Sequence[str], gram: Sequence[Sequence[float]]) -> TableEmbedder:
    return TableEmbedder(dict(zip(texts, vectors_with_gram(gram), strict=True)))


def block_gram(sizes: Sequence[int], within: float, between: float) -> list[list[float]]:
    """Clusters of the given sizes: `within` inside a cluster, `between` across clusters."""
    cluster = [c for c, size in enumerate(sizes) for _ in range(size)]
    return [
        [1.0 if i == j else within if a == b else between for j, b in enumerate(cluster)]
        for i, a in enumerate(cluster)
    ]
