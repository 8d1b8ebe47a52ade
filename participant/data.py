"""Training examples: a prompt, the response to learn, and how much that example counts."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import ChorusError


class DataError(ChorusError):
    """A data file or example is unusable; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One supervised pair. `weight` scales this example's loss (pseudo-labels may carry their confidence)."""

    prompt: str
    response: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight) or self.weight < 0:
            raise DataError(f"example weight must be a finite number >= 0, got {self.weight!r}")


def load_jsonl(path: Path) -> list[Example]:
    """Read `{"prompt": ..., "response": ...}` objects, one per line (optional `weight`); blank lines skip."""
    examples: list[Example] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    for line_number, line in enumerate(lines, start=1):
        if line.strip():
            examples.append(_parse_line(line, f"{path}:{line_number}"))
    return examples


def _parse_line(line: str, where: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from e
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with 'prompt' and 'response'")
    prompt, response = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise DataError(f"{where}: 'prompt' and 'response' must both be present and be strings")
    weight = record.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise DataError(f"{where}: 'weight' must be a number")
    try:
        return Example(prompt=prompt, response=response, weight=float(weight))
    except DataError as e:
        raise DataError(f"{where}: {e}") from e


def train_test_split(
    examples: Sequence[Example], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Shuffle with `seed` and hold out `test_fraction` (at least one example when there are two or more)."""
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_test = round(len(shuffled) * test_fraction)
    if test_fraction > 0 and n_test == 0 and len(shuffled) >= 2:
        n_test = 1
    return shuffled[n_test:], shuffled[:n_test]
