"""A random member's answer per prompt (seeded by the prompt id): what a rule without signal gets."""

from __future__ import annotations

import hashlib

from bench.labels.rules.base import Choices, Stage


class RandomMember:
    def choose(self, stage: Stage) -> Choices:
        choices: Choices = {}
        for record in stage.records:
            draw = int.from_bytes(hashlib.sha256(record.prompt_id.encode()).digest()[:8], "big")
            choices[record.prompt_id] = record.members[draw % len(record.members)]
        return choices
