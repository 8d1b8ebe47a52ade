"""Run one federation to its end: its log file, its live report and the results it leaves behind.

`chorus-run` and the quality benchmark both run federations this way; only what they do with the
outcome differs (an exit code, a row of a comparison).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any

import structlog

from common.logs import configure_logging
from federation.config import LoadedConfig, RunConfigError
from federation.report import Reporter
from federation.runner import FederationRun, RunOptions
from schemas.errors import ChorusError

LOG_FILE = "run.log"


@dataclass(frozen=True)
class Finished:
    run: FederationRun
    reporter: Reporter  # its records are the rounds that finished
    error: str | None  # why the run failed; None when it finished or was interrupted
    config_fault: bool  # the error was found while preparing the run (data, brokers): fix the config


def run_to_end(
    config: LoadedConfig,
    options: RunOptions,
    *,
    log_level: str = "info",
    extra: dict[str, Any] | None = None,
    handle_signals: bool = True,
) -> Finished:
    """Run, log to `<results>/run.log`, and write the results of the rounds that finished, whatever happens.

    With `handle_signals`, a first SIGINT or SIGTERM stops the run cleanly (the step in flight finishes)
    and a second aborts it; without, Ctrl-C propagates once the results are written. Logging is set back
    as it was afterwards, so that one process can run several federations.
    """
    results = options.results
    results.mkdir(parents=True, exist_ok=True)
    handlers = logging.getLogger().handlers[:]
    with (results / LOG_FILE).open("w", encoding="utf-8", buffering=1) as log_file:
        configure_logging(log_level, json=True, file=log_file, capture_stdlib=True)
        reporter = Reporter(results.resolve(), [p.id for p in config.run.participants])
        run = FederationRun(config, options, reporter)
        error: str | None = None
        config_fault = False
        try:
            asyncio.run(_run_with_signals(run) if handle_signals else run.run())
        except RunConfigError as e:
            error, config_fault = str(e), True
        except ChorusError as e:
            error = str(e)
        except (KeyboardInterrupt, asyncio.CancelledError):
            if not handle_signals:
                raise
            run.interrupted = True
        finally:
            reporter.finish(
                rounds_wanted=run.rounds,
                interrupted=run.interrupted,
                error=error,
                extra={
                    "federation": config.run.federation,
                    "config": str(config.path),
                    "log": LOG_FILE,
                    **(extra or {}),
                },
            )
            structlog.reset_defaults()
            logging.getLogger().handlers = handlers
            logging.captureWarnings(False)
    return Finished(run, reporter, error, config_fault)


async def _run_with_signals(run: FederationRun) -> None:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    presses = 0

    def on_signal() -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            run.request_stop()
        else:
            main_task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    try:
        await run.run()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def quiet_library_progress_bars() -> None:
    """transformers' and the hub's tqdm bars ("Loading weights") would tear through the table."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    transformers_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
