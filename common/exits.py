"""Exit statuses shared by every Chorus command, and the one place an error becomes one.

A command's body raises; `run_command` turns what it raised into one paragraph on stderr
(`PROG: error: ...`, no traceback) and the status below. An error class chooses its status with a
class attribute `exit_status` (broker.errors does); anything else of Chorus's is a failure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from common.settings import SettingsError
from schemas.errors import ChorusError

EXIT_OK = 0
EXIT_FAILED = 1  # it started and failed: the broker unreachable or refusing the login, a run that broke
EXIT_USAGE = 2  # a bad command line or settings file: nothing was started (argparse uses 2 as well)
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


def count_argument(text: str) -> int:
    """An argparse `type` for a count (rounds, say): an int of at least 0, else a usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def exit_status(error: ChorusError) -> int:
    """The status a command exits with after `error`."""
    if isinstance(error, SettingsError):
        return EXIT_USAGE
    status = getattr(type(error), "exit_status", EXIT_FAILED)
    return status if isinstance(status, int) else EXIT_FAILED


def run_command(prog: str, body: Callable[[], int]) -> int:
    """`body()`'s status; a Chorus error or a file that cannot be used is reported, not raised.

    An OSError naming a file (a state directory that cannot be made, a settings path that is a
    folder) is the machine's, not a bug: one line naming the file. Anything else keeps its traceback.
    """
    try:
        return body()
    except ChorusError as e:
        return _report(prog, str(e), exit_status(e))
    except OSError as e:
        if e.filename is None:
            raise
        return _report(prog, f"cannot use {e.filename}: {e.strerror}", EXIT_FAILED)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _report(prog: str, message: str, status: int) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status
