"""Scoring saved adapters on the test set: NLL of the references (every round), greedy answers (last).

Every method leaves one checkpoint per trainable participant and round (a LoRA adapter, or the last
blocks' weights); scoring loads each into one cached model per architecture and way of training, so it
costs no model load and no training-time work. Checkpoints with identical bytes (FedAvg participants
after an average) are scored once; a member that never trains is scored as it is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean

import msgspec
import numpy as np

from common.rouge import rouge_l
from participant.data import Example
from participant.evaluation import Embedder
from participant.generation import generate_answers
from participant.learners.local import LocalLearner, TrainableLocalLearner
from participant.scoring import response_nll
from participant.settings import ParticipantSettings
from participant.wiring import build_learner
from schemas.messages import GenerationParams

STATE_DIR = "state"  # as chorus-run keeps participants' checkpoints: state/<pid>/checkpoints/round-<n>


def checkpoint_dir(run_dir: Path, pid: str, round_id: int) -> Path:
    return run_dir / STATE_DIR / pid / "checkpoints" / f"round-{round_id}"


class FinalScores(msgspec.Struct, frozen=True):
    nll: list[float]  # per test prompt
    rouge_l: list[float]  # per subset prompt
    embedding_similarity: list[float]


class Scorer:
    """Scores checkpoints; one model per (architecture, adapter shape), reused for every checkpoint."""

    def __init__(
        self, embed: Embedder | None, generation: GenerationParams, generation_batch: int = 64
    ) -> None:
        self.embed = embed
        self.generation = generation
        self.generation_batch = generation_batch
        self._learners: dict[str, LocalLearner] = {}
        # keyed by (model, checkpoint bytes, examples[, max_length])
        self._nll: dict[tuple[str, str, str, int], list[float]] = {}
        self._answers: dict[tuple[str, str, str], list[str]] = {}

    def subset_nll(self, settings: ParticipantSettings, checkpoint: Path, subset: Sequence[Example]) -> float:
        """Mean over `subset` of each reference's NLL per token under the checkpoint."""
        return fmean(self.nll(settings, checkpoint, subset))

    def final(
        self, settings: ParticipantSettings, checkpoint: Path, test: Sequence[Example], subset: Sequence[int]
    ) -> FinalScores:
        """NLL on every test prompt, and ROUGE-L / embedding similarity of greedy answers on the subset."""
        nll = self.nll(settings, checkpoint, test)
        chosen = [test[i] for i in subset]
        answers = self.greedy(settings, checkpoint, chosen)
        references = [e.response for e in chosen]
        if self.embed is None:
            raise ValueError("final scores need an embedder (this Scorer was built without one)")
        return FinalScores(
            nll=nll,
            rouge_l=[rouge_l(a, r) for a, r in zip(answers, references, strict=True)],
            embedding_similarity=per_pair_similarity(answers, references, self.embed),
        )

    def _learner(self, settings: ParticipantSettings) -> LocalLearner:
        key = model_key(settings)
        if key not in self._learners:
            # Scoring never trains: without [train.privacy], any member's checkpoint loads into the one
            # learner a model shares, DP-trained or not.
            plain = msgspec.structs.replace(settings.train, privacy=None)
            learner = build_learner(msgspec.structs.replace(settings, train=plain))
            if not isinstance(learner, LocalLearner):
                raise TypeError(
                    f"{settings.participant_id}: only local models can be scored, not black boxes"
                )
            self._learners[key] = learner
        return self._learners[key]

    def loaded(self, settings: ParticipantSettings, checkpoint: Path) -> LocalLearner:
        learner = self._learner(settings)
        if isinstance(learner, TrainableLocalLearner) and not learner.load_checkpoint(checkpoint):
            raise FileNotFoundError(f"no checkpoint in {checkpoint}")
        return learner

    def nll(
        self, settings: ParticipantSettings, checkpoint: Path, examples: Sequence[Example]
    ) -> list[float]:
        max_length = settings.train.max_length
        key = (model_key(settings), _digest(checkpoint), _examples_digest(examples), max_length)
        if key not in self._nll:
            learner = self.loaded(settings, checkpoint)
            self._nll[key] = response_nll(learner.lm, examples, max_length=max_length)
        return self._nll[key]

    def greedy(
        self, settings: ParticipantSettings, checkpoint: Path, examples: Sequence[Example]
    ) -> list[str]:
        key = (model_key(settings), _digest(checkpoint), _examples_digest(examples))
        if key not in self._answers:
            learner = self.loaded(settings, checkpoint)
            prompts = [(str(i), e.prompt) for i, e in enumerate(examples)]
            answers = generate_answers(learner.lm, prompts, self.generation, batch_size=self.generation_batch)
            self._answers[key] = [a.text for a in answers]
        return self._answers[key]


def model_key(settings: ParticipantSettings) -> str:
    """What a scoring model must share with a checkpoint: the architecture and what it trains."""
    return f"{settings.model}|{learner_description(settings)}"


def learner_description(settings: ParticipantSettings) -> str:
    """How a member trains, in a few words: "lora r8 a16 default", "last_layers 2", "none"."""
    train = settings.train
    if train.method == "lora":
        targets = train.target_modules
        shown = ",".join(targets) if isinstance(targets, list) else (targets or "default")
        return f"lora r{train.rank} a{train.alpha} {shown}"
    if train.method == "last_layers":
        return f"last_layers {train.last_layers}"
    return train.method


def per_pair_similarity(answers: Sequence[str], references: Sequence[str], embed: Embedder) -> list[float]:
    """Cosine similarity of each answer with its reference (the embedder returns unit rows)."""
    vectors = np.asarray(embed([*answers, *references]), dtype=np.float64)
    n = len(answers)
    return [float(v) for v in np.sum(vectors[:n] * vectors[n:], axis=1)]


def generation_subset(test_size: int, size: int, seed: str) -> list[int]:
    """A fixed subset of test indices, the same for every method of a (task, seed)."""
    order = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16)).permutation(
        test_size
    )
    return sorted(int(i) for i in order[: min(size, test_size)])


def _digest(checkpoint: Path) -> str:
    """The checkpoint's bytes (every file in it); the same for every round of a member that never trains."""
    digest = hashlib.sha256()
    for path in sorted(checkpoint.iterdir()) if checkpoint.is_dir() else []:
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _examples_digest(examples: Sequence[Example]) -> str:
    text = "\x1e".join(f"{e.prompt}\x1f{e.response}" for e in examples)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
