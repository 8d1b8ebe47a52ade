"""The one exception root of Chorus, and the error every bad wire message becomes."""

from __future__ import annotations

from typing import Literal

SchemaProblem = Literal[
    "malformed",  # not msgpack at all, or truncated
    "not_a_message",  # valid msgpack, but not a map with a kind
    "unknown_kind",  # a kind this decoder does not accept
    "unsupported_version",  # schema_version this build cannot read
    "too_large",  # body, text or list over its limit
    "invalid",  # wrong field type, missing field, bad id
]


class ChorusError(Exception):
    """Root of every error Chorus raises on purpose."""


class SchemaError(ChorusError):
    """A wire message could not be decoded; `problem` classifies it, the text says where."""

    def __init__(self, problem: SchemaProblem, detail: str) -> None:
        super().__init__(f"{problem}: {detail}")
        self.problem: SchemaProblem = problem
        self.detail = detail
