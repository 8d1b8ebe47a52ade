"""Logging set-up for every command-line tool (library modules only log, they never configure)."""

from __future__ import annotations

import logging
import sys
import warnings
from typing import TextIO

import structlog


def configure_logging(
    level: str = "info", *, json: bool | None = None, file: TextIO | None = None, capture_stdlib: bool = False
) -> None:
    """structlog to `file` (stderr by default): readable lines on a terminal, JSON lines otherwise.

    `capture_stdlib` also sends the standard library's logging and warnings there (for a run's own log
    file, where third-party chatter belongs too).
    """
    out = sys.stderr if file is None else file
    as_json = not out.isatty() if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    numeric = getattr(logging, level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,  # tests call main() more than once and reset structlog
    )
    if capture_stdlib:
        handler = logging.StreamHandler(out)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.handlers = [handler]
        root.setLevel(max(numeric, logging.WARNING))
        logging.captureWarnings(True)
        warnings.simplefilter("default")
