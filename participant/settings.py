"""Typed participant settings: a TOML file, environment overrides, validated on load."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from broker.addresses import check_broker_urls
from common.settings import MetricsTable, SettingsError, convert, read_settings
from participant.data import DataFormat
from participant.label_weights import LabelWeighting
from participant.learners import learner_kind
from schemas.messages import Id

__all__ = [
    "HttpTable",
    "LeakGuardTable",
    "ParticipantSettings",
    "PrivacySettings",
    "SettingsError",
    "TrainSettings",
    "checked_train",
    "load_participant_settings",
]


class PrivacySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[train.privacy]`: train on the private examples with DP-SGD (Opacus; participant/privacy.py), and
    stop training on them once the privacy budget (`epsilon`, `delta`) is spent. Pseudo-labels are public
    and are trained on without it. LoRA members only."""

    epsilon: Annotated[float, Meta(gt=0.0, le=1_000.0)]  # the budget for the member's whole life
    delta: Annotated[float, Meta(gt=0.0, lt=1.0)] = 1e-5  # below 1 / (private examples), to mean much
    max_grad_norm: Annotated[float, Meta(gt=0.0)] = 1.0  # each private example's gradient clipped to this
    # The Gaussian noise's standard deviation over max_grad_norm: larger spends the budget more slowly.
    noise_multiplier: Annotated[float, Meta(gt=0.0, le=1_000.0)] = 1.0


class TrainSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[train]`: how a participant trains, the one place its defaults and limits live (the training loop,
    the learners and chorus-run's [train] tables all take this type)."""

    # "lora": train a LoRA adapter (what FedAvg averages); "last_layers": train the last `last_layers`
    # transformer blocks in full, no adapter (semantic federations only); "none": only answer, as a
    # black box would.
    method: Literal["lora", "last_layers", "none"] = "lora"
    last_layers: Annotated[int, Meta(ge=1, le=1024)] = 2
    rank: Annotated[int, Meta(ge=1, le=1024)] = 8
    alpha: Annotated[int, Meta(ge=1)] = 16
    dropout: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.05
    target_modules: tuple[str, ...] | Literal["all-linear"] | None = None  # None: q/v (per architecture)
    epochs: Annotated[int, Meta(ge=1)] = 1
    warmup_epochs: Annotated[int, Meta(ge=0)] = 1  # local epochs on private data before round 1
    learning_rate: Annotated[float, Meta(gt=0.0)] = 2e-4
    max_grad_norm: Annotated[float, Meta(gt=0.0)] = 1.0  # gradients are clipped to this norm each step
    batch_size: Annotated[int, Meta(ge=1)] = 8
    max_length: Annotated[int, Meta(ge=8)] = 256
    seed: int = 0
    private_examples_per_round: Annotated[int, Meta(ge=0)] = 64  # mixed with each round's labels
    # "disagreement" (the default, the quality grid's recipe), "confidence" (the recipe before it) or
    # "uniform": see participant/label_weights.py.
    label_weighting: LabelWeighting = "disagreement"
    # How much a pseudo-label counts against a private example (weight 1), before the confidence factor.
    # Below 1, labels cannot outweigh the private data when the federation's answers are weak.
    label_weight: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    privacy: PrivacySettings | None = None  # None: no differential privacy

    def __post_init__(self) -> None:
        if not (math.isfinite(self.learning_rate) and math.isfinite(self.max_grad_norm)):
            raise ValueError("learning_rate and max_grad_norm must be finite")
        if self.privacy is not None and self.method != "lora":
            raise ValueError(f'[train.privacy] trains LoRA adapters only, not method = "{self.method}"')


def checked_train(train: TrainSettings) -> TrainSettings:
    """`train` held to the limits a settings file is: msgspec checks them when it decodes, not when
    Python code builds the struct, and the training loop takes both."""
    try:
        return msgspec.convert(msgspec.to_builtins(train), TrainSettings)
    except msgspec.ValidationError as e:
        raise SettingsError(f"invalid training settings: {e}") from e


class HttpTable(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A generate-only black box behind an OpenAI-compatible `POST {base_url}/chat/completions`."""

    base_url: Annotated[str, Meta(pattern=r"^https?://[^/\s]+", max_length=2_048)]  # e.g. http://host:8080/v1
    model: Annotated[str, Meta(min_length=1, max_length=256)]  # the server's model name, sent and reported
    # The NAME of the environment variable holding the API key, never the key itself; None sends no key.
    api_key_env: Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256)] | None = None
    connect_timeout_seconds: Annotated[float, Meta(gt=0.0, le=600.0)] = 10.0
    # The longest silence from the server; each attempt as a whole is also cut at connect + read timeout,
    # so generation must fit in it.
    read_timeout_seconds: Annotated[float, Meta(gt=0.0, le=3_600.0)] = 120.0
    retries: Annotated[int, Meta(ge=0, le=20)] = 3  # on connection errors, timeouts, 429 and 5xx only
    backoff_seconds: Annotated[float, Meta(ge=0.0, le=600.0)] = 1.0  # doubles after each retry
    max_backoff_seconds: Annotated[float, Meta(ge=0.0, le=3_600.0)] = 30.0
    max_concurrency: Annotated[int, Meta(ge=1, le=256)] = 4  # requests in flight at once


class LeakGuardTable(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[leak_guard]`: before publishing, withhold an answer that copies a span of a private example
    (participant/leak_guard.py). On by default; it checks the text, so it guards black boxes too."""

    enabled: bool = True
    # Withhold an answer that shares this many consecutive normalized word tokens with a private example.
    min_span_tokens: Annotated[int, Meta(ge=2, le=1_024)] = 8
    # Index each private example's prompt with its response (one span may run from one into the other);
    # False: responses only.
    index_prompts: bool = True
    # Also withhold an answer of at least min_span_tokens tokens when more than this share of its distinct
    # `precision_ngram_tokens`-grams occur in one private example (copying with a word changed here and
    # there); None: off.
    max_precision: Annotated[float, Meta(gt=0.0, lt=1.0)] | None = None
    precision_ngram_tokens: Annotated[int, Meta(ge=1, le=64)] = 4
    # "blank": a withheld answer is sent as "" (it counts against a label's majority, and as 0 in the
    # member's agreement); "omit": it is left out of the batch.
    withhold_as: Literal["blank", "omit"] = "blank"


class ParticipantMetricsTable(MetricsTable, frozen=True, kw_only=True, forbid_unknown_fields=True):
    port: Annotated[int, Meta(ge=0, le=65_535)] = 9465  # beside a coordinator's 9464 on one host


# A Python learner's factory: "package.module:factory" or "path/to/file.py:factory".
LearnerSpec = Annotated[str, Meta(pattern=r"^[^:\s][^:]*:[A-Za-z_][A-Za-z0-9_.]*$", max_length=4_096)]

# A local model's torch device; participant.models.resolve_device checks it against the machine.
DEVICE_PATTERN = r"^(cpu|auto|cuda(:[0-9]+)?)$"
Device = Annotated[str, Meta(pattern=DEVICE_PATTERN)]
# A local model's weights: "auto" is bfloat16 where the device computes it natively (a CPU with AMX or
# AVX-512 BF16, a CUDA GPU that supports it), else float32; participant.models.resolve_dtype decides.
Dtype = Literal["auto", "float32", "bfloat16"]


class ParticipantSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    federation: Id = "chorus"
    participant_id: Id
    # One URL, or several nodes of one cluster: a list, or ";"-separated (broker.addresses).
    broker_url: str | list[str] = "memory://"
    model: str = "smollm2-135m-instruct"  # a registry name, or a local Hugging Face model directory
    command: list[str] | None = None  # a generate-only black box: prompt on stdin, answer on stdout
    # The folder `command` runs in, so its relative paths (the program's, its arguments') are against it;
    # from a settings file, default that file's folder.
    command_dir: str | None = None
    # The name a `command` black box is reported under; default the program's (a script's, not its
    # interpreter's: "answer.py" for ["python3", "answer.py"]).
    model_id: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    command_timeout_seconds: Annotated[float, Meta(gt=0.0)] = 120.0
    http: HttpTable | None = None  # a generate-only black box over an OpenAI-compatible HTTP API
    # Your own learner object: "package.module:factory" or "file.py:factory" (a path against this file's
    # folder); factory(settings) returns it (participant/learners/python.py, examples/custom_learner.py).
    learner: LearnerSpec | None = None
    cache_dir: str | None = None  # converted models; default ~/.cache/chorus/models
    state_dir: str = "participant-state"  # checkpoints and the applied-message ledger
    # Examples to train on (prompt_response, alpaca or chat records: participant/data.py); none for a
    # generate-only participant.
    private_data: str | None = None
    # Examples to evaluate on, in the same formats; without it `test_fraction` of private_data is held
    # out, and with test_fraction = 0 too the participant is not evaluated.
    test_data: str | None = None
    test_fraction: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.2
    data_format: DataFormat = "auto"  # both files' record format; "auto" finds it from each record's keys
    generation_batch_size: Annotated[int, Meta(ge=1, le=512)] = 16
    # torch intra-op threads; 0 keeps torch's default (all cores). On a busy 2-core machine one thread
    # generated 4-5x faster than two (`python -m bench.bench_participant --speed --threads 1`, then 2).
    torch_threads: Annotated[int, Meta(ge=0, le=1_024)] = 0
    device: Device = "cpu"  # where a local model runs: "cpu", "cuda", "cuda:N", or "auto" (a GPU if any)
    # The local model's weights; LoRA adapters and their optimizer state stay float32 either way.
    dtype: Dtype = "float32"
    heartbeat_seconds: Annotated[float, Meta(gt=0.0)] = 15.0
    evaluate: bool = True
    progress: bool = True
    train: TrainSettings = TrainSettings()
    metrics: ParticipantMetricsTable = ParticipantMetricsTable()  # Prometheus /metrics and /healthz; off
    leak_guard: LeakGuardTable = LeakGuardTable()  # withhold answers that copy private examples; on

    def __post_init__(self) -> None:
        learner_kind(self)  # one learner, and no key that only another kind reads (participant.learners)
        check_broker_urls(self.broker_url)
        if self.dtype == "bfloat16" and self.train.method == "last_layers":
            raise ValueError(
                'dtype = "bfloat16" with [train] method = "last_layers": the blocks it trains in full '
                'would train in bfloat16; use dtype = "float32" (or "auto", which keeps it float32)'
            )


ENV_OVERRIDES = {"CHORUS_BROKER_URL": "broker_url", "CHORUS_FEDERATION": "federation"}
PATH_KEYS = ("cache_dir", "state_dir", "private_data", "test_data", "command_dir")


def load_participant_settings(
    path: Path, env: Mapping[str, str] | None = None, **overrides: object
) -> ParticipantSettings:
    """Read `path`, apply environment then keyword overrides; relative paths are against the file's folder."""
    raw = read_settings(path, ENV_OVERRIDES, PATH_KEYS, env, overrides)
    model = raw.get("model")
    if isinstance(model, str) and (model.startswith(".") or "/" in model):
        raw["model"] = str((path.parent / model).resolve())
    _resolve_command(raw, path)
    _resolve_learner_file(raw, path)
    _refuse_training_setup_beside_http(raw, path)
    return convert(raw, ParticipantSettings, path)


def _resolve_command(raw: dict[str, object], path: Path) -> None:
    """A `command` runs in `command_dir` (default the settings file's folder); a relative program path
    (one with a "/", as `./answer.sh`) becomes absolute against it. A bare name is looked up on PATH."""
    command = raw.get("command")
    if not isinstance(command, list) or not command:
        return
    folder = raw.get("command_dir")
    if folder is None:
        folder = raw["command_dir"] = str(path.parent.resolve())
    program = command[0]
    if isinstance(program, str) and isinstance(folder, str) and "/" in program:
        raw["command"] = [str((Path(folder) / Path(program).expanduser()).resolve()), *command[1:]]


def _resolve_learner_file(raw: dict[str, object], path: Path) -> None:
    """`learner = "file.py:factory"`: a relative file is against the settings file's folder."""
    learner = raw.get("learner")
    if isinstance(learner, str):
        raw["learner"] = resolve_learner_file(learner, path.parent)


def resolve_learner_file(spec: str, base: Path) -> str:
    """`spec` with a relative "file.py" part made absolute against `base`; a module name is kept."""
    source, colon, attribute = spec.rpartition(":")
    if not colon or not source.endswith(".py"):
        return spec
    return f"{(base / Path(source).expanduser()).resolve()}:{attribute}"


def _refuse_training_setup_beside_http(raw: Mapping[str, object], path: Path) -> None:
    """An [http] black box cannot train, so a local `model` or a [train] table beside it is a mistake."""
    http = raw.get("http")
    if not isinstance(http, dict):
        return
    if "api_key" in http:
        raise SettingsError(
            f"{path}: [http] takes no api_key; put the key in an environment variable and name it "
            'with api_key_env (e.g. api_key_env = "OPENAI_API_KEY")'
        )
    clashing = [key for key in ("model", "train") if key in raw]
    if clashing:
        raise SettingsError(
            f"{path}: [http] is a generate-only black box; remove {' and '.join(clashing)} "
            "(a local model's training setup) or remove [http]"
        )
