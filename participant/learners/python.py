"""The `python` kind: your own learner object, named in the settings as `learner = "package.module:factory"`
or `"path/to/file.py:factory"` (a relative path is against the settings file's folder).

`factory(settings)` is called once with the participant's settings and returns the learner: any object
with the attributes and methods of `participant.learner.Learner` (see examples/custom_learner.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from participant.learner import Learner, LearnerError

if TYPE_CHECKING:
    from participant.settings import ParticipantSettings

NEEDED = ("model_id", "generate")
# A capability is all of its methods or none: half of one is a mistake to name, not to skip silently.
CAPABILITIES = {
    "TrainableLearner": ("train", "save_checkpoint", "load_checkpoint"),
    "AdapterLearner": ("adapter_state", "load_adapter_state"),
}


def load_object(spec: str) -> object:
    """The object `spec` names: "package.module:attribute" (importable), or "file.py:attribute"."""
    source, _, attribute = spec.rpartition(":")
    if not source or not attribute:
        raise LearnerError(f"learner {spec!r}: write it as package.module:factory or file.py:factory")
    try:
        module = (
            _module_from_file(Path(source)) if source.endswith(".py") else importlib.import_module(source)
        )
    except LearnerError:
        raise
    except Exception as e:  # the user's module failed to import: say which and why
        raise LearnerError(f"learner {spec!r}: cannot import {source}: {type(e).__name__}: {e}") from e
    found: object = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise LearnerError(f"learner {spec!r}: {source} has no {attribute!r}")
        found = getattr(found, part)
    return found


def _module_from_file(path: Path) -> object:
    if not path.is_file():
        raise LearnerError(f"learner file {path} does not exist")
    name = f"chorus_learner_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LearnerError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as an import does (dataclasses look themselves up)
    spec.loader.exec_module(module)
    return module


def build(settings: ParticipantSettings) -> Learner:
    spec = settings.learner or ""
    factory = load_object(spec)
    if not callable(factory):
        raise LearnerError(f"learner {spec!r} is a {type(factory).__name__}, not a factory to call")
    learner = cast("Callable[[ParticipantSettings], object]", factory)(settings)
    what = f"learner {spec!r} returned an object of type {type(learner).__name__}"
    missing = [name for name in NEEDED if not hasattr(learner, name)]
    if missing:
        raise LearnerError(
            f"{what} without {', '.join(missing)} (see participant.learner.Learner; in "
            "participant.learners.black_box, PerPromptLearner gives a black box all but `answer`)"
        )
    for capability, methods in CAPABILITIES.items():
        has = [name for name in methods if hasattr(learner, name)]
        if has and len(has) < len(methods):
            lacking = [name for name in methods if name not in has]
            raise LearnerError(
                f"{what} with {', '.join(has)} but not {', '.join(lacking)}: a {capability} needs all of "
                f"{', '.join(methods)} (participant.learner.{capability})"
            )
    return cast("Learner", learner)
