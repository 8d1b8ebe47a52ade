"""A terminal progress bar that callers can switch off: generation and fine-tuning step it per batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


@contextmanager
def progress_bar(enabled: bool, total: int, description: str) -> Iterator[Callable[[str], None]]:
    """A rich progress bar when `enabled`; yields `advance(status)` that steps it once (a no-op when off)."""
    if not enabled:
        yield lambda status: None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda status: bar.update(task, advance=1, description=f"{description} {status}".rstrip())
