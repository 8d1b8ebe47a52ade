"""Learner kinds: which settings pick each one, and the module that builds it.

A kind is one module with a `build(settings) -> Learner` function plus one line in `KINDS`. The builder is
named as "module:function" and imported only when that kind is built, so choosing or validating a kind
loads nothing heavy: a black box never imports torch. A black box is picked by the key that configures
it (at most one may be given); without one, `[train] method` picks the local-model kind.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from participant.learner import Learner
    from participant.settings import ParticipantSettings


@dataclass(frozen=True)
class LearnerKind:
    builder: str  # "module:function": function(settings) -> Learner
    what: str  # how errors name it
    key: str | None = None  # the settings key that picks this black box, as the file writes it
    method: str | None = None  # or the `[train] method` that picks this local model
    reads: tuple[str, ...] = ()  # keys only some kinds read: an error beside any other kind

    @property
    def attribute(self) -> str | None:
        """The ParticipantSettings field behind `key` ("[http]" is the field `http`)."""
        return None if self.key is None else self.key.strip("[]")


KINDS: dict[str, LearnerKind] = {
    "lora": LearnerKind("participant.learners.lora:build", "a local model (LoRA)", method="lora"),
    "last_layers": LearnerKind(
        "participant.last_layers:build", "a local model (last layers)", method="last_layers"
    ),
    "frozen": LearnerKind(
        "participant.learners.frozen:build", "a local model that only answers", method="none"
    ),
    "command": LearnerKind(
        "participant.learners.command:build", "a `command` black box", key="command", reads=("model_id",)
    ),
    "http": LearnerKind("participant.http_learner:build", "an [http] black box", key="[http]"),
    "python": LearnerKind(
        "participant.learners.python:build", "a Python `learner` object", key="learner", reads=("model_id",)
    ),
}


def _given(settings: ParticipantSettings, attribute: str) -> bool:
    value = getattr(settings, attribute)
    return value is not None and value != []


def learner_kind(settings: ParticipantSettings) -> str:
    """The name of the kind these settings pick; ValueError, saying what to write, when they pick none
    or several, or give a key the picked kind does not read."""
    given = [name for name, kind in KINDS.items() if kind.attribute and _given(settings, kind.attribute)]
    if len(given) > 1:
        keys = " or ".join(str(KINDS[name].key) for name in given)
        raise ValueError(f"give either {keys} for the learner, not both")
    if given:
        name = given[0]
    else:
        local = [name for name, kind in KINDS.items() if kind.method == settings.train.method]
        if not local:
            raise ValueError(f"no learner kind trains with [train] method = {settings.train.method!r}")
        name = local[0]
    _check_reads(settings, name)
    return name


def _check_reads(settings: ParticipantSettings, name: str) -> None:
    chosen = KINDS[name]
    for key in sorted({key for kind in KINDS.values() for key in kind.reads} - set(chosen.reads)):
        if _given(settings, key):
            readers = " or ".join(kind.what for kind in KINDS.values() if key in kind.reads)
            raise ValueError(f"{key} names {readers}, not {chosen.what}: remove it")


def build_learner(settings: ParticipantSettings) -> Learner:
    """The learner the settings describe, built by its kind's module (imported now)."""
    module, _, function = KINDS[learner_kind(settings)].builder.partition(":")
    build = cast(
        "Callable[[ParticipantSettings], Learner]", getattr(importlib.import_module(module), function)
    )
    return build(settings)
