"""Build the consensus rule and embedder a settings file asks for."""

from __future__ import annotations

from pathlib import Path

from common.embedding import CachedEmbedder, Embedder, HashingEmbedder, SentenceEmbedder
from coordinator.consensus import Consensus, ExactConsensus, HnswConsensus
from coordinator.settings import ConsensusSettingsTable


def build_embedder(table: ConsensusSettingsTable) -> Embedder:
    if table.embedder == "hashing":
        inner: Embedder = HashingEmbedder()
    elif table.embedder == "minilm":
        inner = SentenceEmbedder(batch_size=table.embed_batch_size)
    elif table.embedder == "minilm-onnx":
        from common.embedding_onnx import OnnxEmbedder  # onnxruntime only when asked for

        inner = OnnxEmbedder(batch_size=table.embed_batch_size, threads=table.embed_threads or None)
    else:
        inner = SentenceEmbedder(Path(table.embedder), batch_size=table.embed_batch_size)
    return CachedEmbedder(inner, max_entries=table.cache_entries) if table.cache_entries else inner


def build_consensus(table: ConsensusSettingsTable, embedder: Embedder | None = None) -> Consensus:
    """The consensus rule the settings name (the table is its settings), over `embedder` (None: the one
    the settings name)."""
    chosen = embedder if embedder is not None else build_embedder(table)  # a CachedEmbedder has __len__
    if table.index == "exact":
        return ExactConsensus(chosen, table)
    return HnswConsensus(chosen, table)
