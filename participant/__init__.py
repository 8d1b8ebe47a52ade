"""The participant: offline models, LoRA fine-tuning, batched generation, evaluation; `run` takes part."""

from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from participant.learner import Learner
    from participant.settings import ParticipantSettings


def run(
    learner: Learner | None,
    settings: ParticipantSettings | str | PathLike[str],
    *,
    rounds: int | None = None,
) -> bool:
    """Take part in the federation the settings (or a settings file) name with `learner` (None: the one
    the settings describe): connect, join, serve rounds until `rounds` are applied, the federation ends,
    or SIGINT/SIGTERM, then close. True when a signal stopped it. What `chorus-participant run` does::

        import participant
        from participant.learner import FunctionLearner

        participant.run(FunctionLearner(my_model, model_id="mine"), "participant.toml")
    """
    import asyncio
    from pathlib import Path

    from participant.cli import run_participant
    from participant.settings import ParticipantSettings, load_participant_settings

    if not isinstance(settings, ParticipantSettings):
        settings = load_participant_settings(Path(settings))
    return asyncio.run(run_participant(settings, rounds, learner))
