"""Logging set-up and the one error path of the command-line entry points (library code only uses
named loggers).

Both CLIs (`python -m producer` through `run_cli`, `python -m worker` through `report`, which `run_cli`
calls) end an error as one line on stderr (the logger's format) and an exit status:

    0    done
    1    the command was well-formed but failed: unknown job (never submitted, expired, or another
         REDIS_URL), Redis down, hung or full, the watched job failed, a timeout
    2    the command line is wrong: a bad flag value or setting (ConfigError), a bad file, video,
         prompt or job id (InputError); argparse's own errors (unknown flag, missing argument, a value
         of the wrong type) also exit 2, with its usage line and one error line
    3    worker only: its own machinery failed (WorkerBroken, EXIT_BROKEN)
    130  interrupted (Ctrl-C)

Anything else is a bug, and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

from schemas.errors import ConfigError, InputError, VsegError

EXIT_ERROR = 1
EXIT_USAGE = 2  # what argparse exits with for its own errors too
EXIT_BROKEN = 3  # a worker whose own machinery failed, for its supervisor to restart it
EXIT_INTERRUPTED = 130


def configure_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else getattr(logging, os.environ.get("VSEG_LOG_LEVEL", "INFO").upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def exit_code(error: BaseException) -> int:
    """The command-line exit status for an error: 2 for bad settings or input (the caller's to fix), else 1."""
    return EXIT_USAGE if isinstance(error, (ConfigError, InputError)) else EXIT_ERROR


def report(error: BaseException, log: logging.Logger, *, codes: Mapping[type[BaseException], int] | None = None) -> int:
    """Log `error` as one line and return its exit status: the first of `codes` it is an instance of,
    else 130 for KeyboardInterrupt, else `exit_code`."""
    if isinstance(error, KeyboardInterrupt):
        log.error("interrupted")
        return EXIT_INTERRUPTED
    log.error("%s", " ".join(str(error).splitlines()) or type(error).__name__)  # one line, whatever the message
    for cls, code in (codes or {}).items():
        if isinstance(error, cls):
            return code
    return exit_code(error)


def _same(error: Exception) -> Exception:
    return error


def run_cli(command: Callable[[], int], log: logging.Logger, *,
            handled: tuple[type[Exception], ...] = (VsegError,),
            translate: Callable[[Exception], Exception] = _same,
            codes: Mapping[type[BaseException], int] | None = None) -> int:
    """Run a CLI's command and return its exit status; Ctrl-C and the `handled` errors (after `translate`,
    which may turn a library's error into a one-line VsegError) are `report`ed as one line."""
    try:
        return command()
    except KeyboardInterrupt as e:
        return report(e, log)
    except handled as e:
        return report(translate(e), log, codes=codes)
