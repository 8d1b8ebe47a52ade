"""A per-sender budget for a log line that a sender can make repeat at will.

A line per rejected message lets one member write the log at its own bandwidth (a flood of bad
messages gave 5.1 MiB of `coord.log` per 20 s). A `LogBudget` logs each sender's first `per_window`
lines in a window of `window_seconds`; past that it counts them, and says how many it left out in one
`<event>_suppressed` line when that sender's window ends (at its next line, or at the next sweep of
ended windows, at most one per window), so the log grows with the number of senders and the time, never
with the flood. Key it by what the sender cannot choose (the broker-checked login): keyed by a claimed
id, a forger could spend another member's budget and hide that member's lines.

    rejected = LogBudget(log, per_window=20, window_seconds=60.0)
    rejected.warning("rejected", sender=delivery.user_id, reason=reason, round=..., participant=...)

Not thread-safe: one per event loop, like the logger calls it stands in for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

OVERFLOW_SENDER = "(other senders)"  # what senders past `max_senders` share, until windows end


class Logger(Protocol):
    def info(self, event: str, **fields: Any) -> Any: ...

    def warning(self, event: str, **fields: Any) -> Any: ...


@dataclass
class _Window:
    started: float
    event: str
    level: str
    logged: int = 0
    suppressed: int = 0


class LogBudget:
    """At most `per_window` lines per sender per `window_seconds`, then a count of the rest."""

    def __init__(
        self,
        logger: Logger,
        *,
        per_window: int = 20,
        window_seconds: float = 60.0,
        max_senders: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_window < 1 or window_seconds <= 0 or max_senders < 1:
            raise ValueError("per_window and max_senders must be at least 1, window_seconds above 0")
        self._logger = logger
        self._per_window = per_window
        self._window = window_seconds
        self._max_senders = max_senders
        self._clock = clock
        self._windows: dict[str | None, _Window] = {}
        self._swept = clock()

    def info(self, event: str, *, sender: str | None, **fields: Any) -> bool:
        return self._log("info", event, sender, fields)

    def warning(self, event: str, *, sender: str | None, **fields: Any) -> bool:
        """Log `event` with `fields` if `sender` has budget left; True if it was logged."""
        return self._log("warning", event, sender, fields)

    def flush(self) -> None:
        """Report every window's suppressed lines now (on shutdown), and start afresh."""
        for sender, window in self._windows.items():
            self._summarise(sender, window)
        self._windows.clear()

    def _log(self, level: str, event: str, sender: str | None, fields: dict[str, Any]) -> bool:
        now = self._clock()
        if now - self._swept >= self._window:
            self._sweep(now)
        if sender not in self._windows and len(self._windows) >= self._max_senders:
            sender = OVERFLOW_SENDER
        window = self._windows.get(sender)
        if window is not None and now - window.started >= self._window:
            self._summarise(sender, window)
            window = None
        if window is None:
            window = self._windows[sender] = _Window(now, event, level)
        if window.logged < self._per_window:
            window.logged += 1
            getattr(self._logger, level)(event, **fields)
            return True
        window.suppressed += 1
        return False

    def _sweep(self, now: float) -> None:
        """Summarise and forget the windows that have ended, so quiet senders cost nothing."""
        self._swept = now
        for sender in [s for s, w in self._windows.items() if now - w.started >= self._window]:
            self._summarise(sender, self._windows.pop(sender))

    def _summarise(self, sender: str | None, window: _Window) -> None:
        if window.suppressed:
            getattr(self._logger, window.level)(
                f"{window.event}_suppressed",
                sender=sender,
                suppressed=window.suppressed,
                logged=window.logged,
                window_seconds=self._window,
            )
