"""Logging set-up for the command-line entry points (library code only uses named loggers)."""

from __future__ import annotations

import logging
import os

from schemas.errors import ConfigError, InputError, VsegError


def configure_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else getattr(logging, os.environ.get("VSEG_LOG_LEVEL", "INFO").upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def exit_code(error: VsegError) -> int:
    """The command-line exit status for an error: 2 for bad settings or input (the caller's to fix), else 1."""
    return 2 if isinstance(error, (ConfigError, InputError)) else 1
