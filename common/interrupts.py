"""SIGTERM and Ctrl-C for a long-running service: both stop it cleanly; Ctrl-C also says it was one.

A service's CLI runs its loop inside `StopSignals(service.request_stop)`: SIGTERM (an operator, a
process manager) and a first Ctrl-C (SIGINT) ask the service to stop after the step in flight; a second
Ctrl-C cancels the task at once. `interrupted` tells the CLI to exit 130 (common/exits.py), as a shell
reports SIGINT, rather than 0.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from types import TracebackType

import structlog

from common.exits import EXIT_INTERRUPTED

log = structlog.get_logger(__name__)


class StopSignals:
    """Installs the SIGTERM/SIGINT handlers on the running loop for the `with` block's duration."""

    def __init__(self, request_stop: Callable[[], None], *, service: str) -> None:
        self.request_stop = request_stop
        self.service = service
        self.interrupted = False  # Ctrl-C (SIGINT) was pressed at least once
        self._presses = 0
        self._task: asyncio.Task[object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> StopSignals:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(signum, self._on_signal, signum)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._loop is not None and not self._loop.is_closed():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._loop.remove_signal_handler(signum)

    def _on_signal(self, signum: signal.Signals) -> None:
        if signum == signal.SIGINT:
            self.interrupted = True
            self._presses += 1
            if self._presses > 1:
                log.warning("aborting", service=self.service, signal=signum.name)
                if self._task is not None:
                    self._task.cancel()
                return
        log.info(
            "stopping",
            service=self.service,
            signal=signum.name,
            detail="finishing the step in flight" + (" (Ctrl-C again to abort)" if self.interrupted else ""),
        )
        self.request_stop()


def report_interrupted(service: str) -> None:
    """The line a service's CLI logs before it exits 130 after Ctrl-C."""
    log.warning("interrupted", service=service, exit_status=EXIT_INTERRUPTED)
