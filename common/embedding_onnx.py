"""A sentence-transformers BERT model (by default all-MiniLM-L6-v2) run by ONNX Runtime on the CPU.

`OnnxEmbedder` gives the same vectors as `SentenceEmbedder` (cosine ≥ 0.999 per row) for about half
the CPU time. The model is exported once from its local directory (never from a hub) with the legacy
TorchScript exporter, transformer-fused by `onnxruntime.transformers.optimizer` (one Attention, BiasGelu
and SkipLayerNormalization op per layer), optionally int8-quantized, and written atomically into a
cache (`$CHORUS_CACHE_DIR/onnx`, else `~/.cache/chorus/models/onnx`): later starts load the file
without importing torch. Mean pooling over the attention mask and L2 normalisation are part of the
exported graph, as in the model's `modules.json` (Transformer → mean Pooling → Normalize).

`embed` tokenizes with the model's `tokenizer.json` (truncated at the model's `max_seq_length`, as
sentence-transformers does), sorts the texts by token count and pads each batch only to its longest
text. Safe to call from several threads: `InferenceSession.run` is thread-safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from common.embedding import EmbeddingError, Embeddings, default_model_dir, model_label

CACHE_ENV = "CHORUS_CACHE_DIR"
# Bump when the exported graph changes (inputs, pooling, fusion), so stale cache files are not reused.
EXPORT_VERSION = 1
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_INSTALL_HINT = 'install it with `pip install onnxruntime onnx`, or use embedder = "minilm" (torch)'
_SUPPORTED_MODULES = {
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
}


def default_threads() -> int:
    """Every CPU, at most 4 (more is not measured): the intra-op threads ONNX Runtime uses by default.

    Consensus embeds in a worker thread while the event loop mostly waits, and the threads do not spin,
    so they leave the CPU to the loop and the broker whenever those need it. Measured on 2 cores
    (bench/results/embedding.md): 2 threads embedded 1.6-1.9x the sentences/s of 1 on a quiet machine,
    and 0.95-1.2x while other processes kept both cores busy (a test suite; busy loops).
    """
    return max(1, min(4, os.cpu_count() or 1))


def onnx_cache_dir(cache_dir: Path | None = None) -> Path:
    """Exported models: `cache_dir`, else $CHORUS_CACHE_DIR/onnx, else ~/.cache/chorus/models/onnx."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "chorus" / "models") / "onnx"


class OnnxEmbedder:
    """A local sentence-transformers BERT model (mean pooling) on ONNX Runtime; never downloads."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        cache_dir: Path | None = None,
        batch_size: int = 32,
        threads: int | None = None,
        quantize: bool = False,
    ) -> None:
        if batch_size < 1:
            raise EmbeddingError(f"batch_size must be at least 1, got {batch_size}")
        if threads is not None and threads < 1:
            raise EmbeddingError(f"threads must be at least 1, got {threads}")
        directory = Path(model_dir) if model_dir is not None else default_model_dir()
        ort = _import("onnxruntime")
        config = _read_json(directory / "config.json")
        self._lower_case = _check_layout(directory, config)
        self._max_length = _max_seq_length(directory, config)
        self.dim = int(config["hidden_size"])
        self._pad_id = int(config.get("pad_token_id") or 0)  # masked out: pooling and attention ignore it
        self._batch_size = batch_size
        self.name = f"onnx{'-int8' if quantize else ''}:{model_label(directory)}"
        self._tokenizer = _load_tokenizer(directory, self._max_length)
        self.path = exported_model(directory, onnx_cache_dir(cache_dir), quantize=quantize)
        options = ort.SessionOptions()
        self.threads = threads if threads is not None else default_threads()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning threads steal the CPU from the event loop and from other processes on a shared machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own pybind exception types
            raise EmbeddingError(
                f"onnxruntime could not load {self.path} ({type(e).__name__}: {e}); "
                "delete the file to export the model again"
            ) from e
        self._wants_token_types = "token_type_ids" in {i.name for i in self._session.get_inputs()}

    def embed(self, texts: Sequence[str]) -> Embeddings:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encoded = self._tokenizer.encode_batch([t.lower() if self._lower_case else t for t in texts])
        ids = [e.ids for e in encoded]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
        for start in range(0, len(order), self._batch_size):
            chosen = order[start : start + self._batch_size]
            out[chosen] = self._run([ids[i] for i in chosen])
        return out

    def _run(self, batch: list[list[int]]) -> npt.NDArray[np.float32]:
        width = max(len(row) for row in batch)
        input_ids = np.full((len(batch), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, tokens in enumerate(batch):
            input_ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        feed = {"input_ids": input_ids, "attention_mask": mask}
        if self._wants_token_types:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        vectors = self._session.run(None, feed)[0]
        return np.asarray(vectors, dtype=np.float32)


# ---- export ------------------------------------------------------------------------------------


def exported_model(directory: Path, cache: Path, *, quantize: bool = False) -> Path:
    """The cached ONNX file for the model in `directory`, exported (atomically) if not there yet.

    The int8 file is quantized from the fp32 one, which is exported first if needed.
    """
    target = cache / f"{_cache_key(directory)}-{'int8' if quantize else 'fp32'}.onnx"
    if target.is_file():
        return target
    source = exported_model(directory, cache) if quantize else None
    cache.mkdir(parents=True, exist_ok=True)
    staging = cache / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    unfused = staging.with_suffix(".unfused")
    try:
        if source is not None:
            _quantize(source, staging)
        else:
            _export(directory, unfused)
            _fuse(unfused, staging, _read_json(directory / "config.json"))
        os.replace(staging, target)  # readers see no file or a whole one, never half of one
    finally:
        staging.unlink(missing_ok=True)
        unfused.unlink(missing_ok=True)
    return target


def _cache_key(directory: Path) -> str:
    """Model name plus a digest of what the export depends on: its files (size, mtime) and the versions."""
    ort = _import("onnxruntime")
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{EXPORT_VERSION} {ort.__version__} {directory.resolve()}".encode())
    for path in sorted(directory.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    return f"{model_label(directory)}-{digest.hexdigest()}"


def _export(directory: Path, target: Path) -> None:
    try:
        import torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained(directory, local_files_only=True, attn_implementation="eager")
        model.eval()
        sample = torch.ones((2, 8), dtype=torch.long)
        axes = {name: {0: "batch", 1: "tokens"} for name in _INPUTS} | {"embedding": {0: "batch"}}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # deprecation of the legacy exporter, tracer warnings
            torch.onnx.export(
                _mean_pooled(model),
                (sample, sample, torch.zeros_like(sample)),
                str(target),
                dynamo=False,  # the TorchScript exporter: no onnxscript needed, output ORT fuses fully
                input_names=list(_INPUTS),
                output_names=["embedding"],
                dynamic_axes=axes,
                opset_version=17,
            )
    except Exception as e:  # torch's exporters raise anything from RuntimeError to their own types
        raise EmbeddingError(
            f"could not export the model in {directory} to ONNX ({type(e).__name__}: {e}); "
            'use embedder = "minilm" (torch) instead'
        ) from e


def _fuse(source: Path, target: Path, config: dict[str, Any]) -> None:
    from onnxruntime.transformers import optimizer

    try:
        fused = optimizer.optimize_model(
            str(source),
            model_type="bert",
            num_heads=int(config["num_attention_heads"]),
            hidden_size=int(config["hidden_size"]),
            opt_level=0,  # fusions only; the session applies ORT_ENABLE_ALL when it loads the file
        )
        fused.save_model_to_file(str(target))
    except Exception as e:
        raise EmbeddingError(f"could not optimise the exported model ({type(e).__name__}: {e})") from e


def _quantize(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            # the fused ops' outputs have no inferred type; they are all float32
            extra_options={"DefaultTensorType": 1},  # onnx.TensorProto.FLOAT
        )
    except Exception as e:
        raise EmbeddingError(f"could not quantize the exported model ({type(e).__name__}: {e})") from e


def _mean_pooled(model: Any) -> Any:
    """`model`, then the mean of its token states over the attention mask, L2-normalised (as the model's
    Pooling and Normalize modules). The class is built here because importing torch is slow."""
    import torch

    class MeanPooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            states = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    return MeanPooled()


# ---- model directory ---------------------------------------------------------------------------


def _import(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EmbeddingError(
            f"the ONNX embedder needs {module}, which did not import ({e}); {_INSTALL_HINT}"
        ) from e


def _read_json(path: Path, kind: type = dict) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EmbeddingError(f"could not read {path}: {e}") from e
    if not isinstance(data, kind):
        raise EmbeddingError(f"{path} is not a JSON {kind.__name__}")
    return data


def _check_layout(directory: Path, config: dict[str, Any]) -> bool:
    """Checks the model is a BERT with mean pooling (what the export reproduces); returns do_lower_case."""
    if config.get("model_type") != "bert":
        raise EmbeddingError(
            f"the ONNX embedder supports BERT models only; {directory} holds {config.get('model_type')!r}"
        )
    listed = directory / "modules.json"
    modules: list[dict[str, Any]] = _read_json(listed, list) if listed.is_file() else []
    unsupported = sorted(str(m.get("type")) for m in modules if m.get("type") not in _SUPPORTED_MODULES)
    if unsupported:
        raise EmbeddingError(f"the ONNX embedder cannot reproduce the modules {unsupported} of {directory}")
    for module in modules:
        if module.get("type") == "sentence_transformers.models.Pooling":
            pooling = _read_json(directory / module["path"] / "config.json")
            modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v is True)
            if modes != ["pooling_mode_mean_tokens"]:
                raise EmbeddingError(f"the ONNX embedder needs mean pooling; {directory} uses {modes}")
    st_config = directory / "sentence_bert_config.json"
    return bool(_read_json(st_config).get("do_lower_case", False)) if st_config.is_file() else False


def _max_seq_length(directory: Path, config: dict[str, Any]) -> int:
    """sentence-transformers' truncation length: max_seq_length, capped by the position embeddings."""
    positions = int(config.get("max_position_embeddings", 512))
    st_config = directory / "sentence_bert_config.json"
    wanted = _read_json(st_config).get("max_seq_length") if st_config.is_file() else None
    return min(int(wanted), positions) if wanted else positions


def _load_tokenizer(directory: Path, max_length: int) -> Any:
    from tokenizers import Tokenizer

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise EmbeddingError(f"the ONNX embedder needs a fast tokenizer (tokenizer.json) in {directory}")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length)  # tokenizer.json's own truncation (128) is not the model's
    tokenizer.no_padding()  # each batch is padded to its own longest text in OnnxEmbedder._run
    return tokenizer
