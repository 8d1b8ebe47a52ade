"""Replacing a whole directory so that no reader ever sees half of it (model caches, adapters, exports)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def write_directory_atomically(target: Path, write: Callable[[Path], object]) -> None:
    """Run `write` into a staging directory beside `target`, then rename it into place.

    Readers see the old directory, or none, or the new one: never a half-written one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        write(staging)
        if target.exists():
            os.rename(target, aside)  # a non-empty directory cannot be renamed over
        try:
            os.rename(staging, target)
        except OSError:
            if aside.exists() and not target.exists():
                os.rename(aside, target)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
