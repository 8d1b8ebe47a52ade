"""The public prompt set: loading it, and sampling each round's prompts deterministically."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import ChorusError
from schemas.messages import Prompt, PromptShard


class PromptSetError(ChorusError):
    """The public prompt file is missing or has a bad line."""


@dataclass(frozen=True)
class PublicPrompt:
    prompt_id: str
    text: str


def load_prompts(path: Path) -> list[PublicPrompt]:
    """Read JSONL lines `{"prompt_id": ..., "prompt": ...}` (`text` is accepted for `prompt`)."""
    if not path.is_file():
        raise PromptSetError(f"public prompt file {path} does not exist")
    prompts: list[PublicPrompt] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt_id, text = str(row["prompt_id"]), row.get("prompt", row.get("text"))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise PromptSetError(
                    f'{path}:{number}: expected a JSON object with "prompt_id" and "prompt" ({e})'
                ) from e
            if not isinstance(text, str) or not text.strip():
                raise PromptSetError(f'{path}:{number}: "prompt" must be a non-empty string')
            if prompt_id in seen:
                raise PromptSetError(f"{path}:{number}: prompt_id {prompt_id!r} appears twice")
            seen.add(prompt_id)
            prompts.append(PublicPrompt(prompt_id, text))
    if not prompts:
        raise PromptSetError(f"public prompt file {path} holds no prompts")
    return prompts


class PromptSampler:
    """Round r takes the next slice of a seeded permutation; a new permutation per pass.

    Depends only on (seed, round id), so a restarted coordinator samples the same prompts.
    """

    def __init__(self, prompts: Sequence[PublicPrompt], seed: int) -> None:
        self._prompts = list(prompts)
        self._by_id = {p.prompt_id: p for p in self._prompts}
        self._seed = seed

    def sample(self, round_id: int, count: int, first: Sequence[str] = ()) -> list[PublicPrompt]:
        """`count` prompts for `round_id` (1-based), starting with `first` (e.g. prompts of failed shards)."""
        count = min(count, len(self._prompts))
        chosen = [self._by_id[pid] for pid in dict.fromkeys(first) if pid in self._by_id][:count]
        taken = {p.prompt_id for p in chosen}
        position = (round_id - 1) * count
        while len(chosen) < count:
            epoch, offset = divmod(position, len(self._prompts))
            candidate = self._permutation(epoch)[offset]
            position += 1
            if candidate.prompt_id not in taken:
                chosen.append(candidate)
                taken.add(candidate.prompt_id)
        return chosen

    def _permutation(self, epoch: int) -> list[PublicPrompt]:
        order = list(self._prompts)
        random.Random(f"{self._seed}:{epoch}").shuffle(order)
        return order


def split_into_shards(prompts: Sequence[PublicPrompt], shards: int) -> list[PromptShard]:
    """Deal prompts round-robin over `shards`; shards left empty are not used."""
    dealt: list[list[Prompt]] = [[] for _ in range(shards)]
    for index, prompt in enumerate(prompts):
        dealt[index % shards].append(Prompt(prompt_id=prompt.prompt_id, text=prompt.text))
    return [PromptShard(shard_id=s, prompts=ps) for s, ps in enumerate(dealt) if ps]
