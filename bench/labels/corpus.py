"""The label corpus: per prompt, every member's answer with the signals a label rule may read.

One JSON object a line (`PromptRecord`), text and numbers only, so that a rule is scored on it in
seconds and the file diffs readably. Written by `python -m bench.labels record`, read by `score`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec

CORPUS_DIR = Path(__file__).parent / "corpus"


class MemberAnswer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One member's answer to one prompt, and what members computed about it locally."""

    text: str
    logprob: float | None  # mean token log-probability as generation reported it (Answer.logprob)
    self_certainty: float  # its writer's mean KL(uniform || next-token distribution), teacher forced
    affinity: float  # its writer's mean top-k MiniLM similarity of the prompt to its private prompts
    scored_by: dict[str, float]  # member -> that member's teacher-forced mean log-prob of this answer


class PromptRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One public prompt at one stage ("warmup": after the warm-up; "round1": after one shipped round)."""

    stage: str
    prompt_id: str
    prompt: str
    reference: str
    family: str
    expert: str | None  # the member whose home family the prompt's callable belongs to
    answers: dict[str, MemberAnswer]  # member -> its answer

    @property
    def members(self) -> list[str]:
        return sorted(self.answers)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(PromptRecord)


def write_corpus(path: Path, records: Iterable[PromptRecord]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(records, key=lambda r: (r.stage, r.prompt_id))
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(b"".join(_encoder.encode(record) + b"\n" for record in ordered))
    temporary.replace(path)


def read_corpus(path: Path) -> list[PromptRecord]:
    lines = path.read_bytes().splitlines()
    try:
        return [_decoder.decode(line) for line in lines if line.strip()]
    except msgspec.ValidationError as e:
        raise ValueError(f"{path}: not a label corpus: {e}") from e


def stages(records: Sequence[PromptRecord]) -> list[str]:
    return sorted({record.stage for record in records})
