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
    3    the worker: its own machinery failed (WorkerBroken, EXIT_BROKEN); the producer: a live source cannot
         be opened, refuses us for good, or was lost past source_outage_s (SourceUnavailable, EXIT_SOURCE)
    130  interrupted (Ctrl-C)

Anything else is a bug, and keeps its traceback.

Log format (`log_format`, VSEG_LOG_FORMAT): `text`, one readable line a record, or `json`, one JSON object
a line: `ts` (UTC, ISO 8601, milliseconds), `level`, `logger`, `message`, `exc_info` (the traceback, when
there is one) and the job fields of the context the record was made in (`job_id`, `attempt`, `worker`).

Job fields ride on contextvars: inside `with job_log_context(job_id=..., attempt=...)` every record made
by this thread carries them (nested contexts add to the outer one's: `worker` for the whole run,
`job_id` and `attempt` per job). A new thread starts with an empty context, so a thread that works for
a job is started with `ContextThread` (a `threading.Thread` that runs in a copy of the context that
called `start()`), or its callable wrapped with `in_current_context` (for an executor):

    with job_log_context(worker=name):              # the worker's whole run
        ...
        with job_log_context(job_id=job.id, attempt=attempt):
            sink = ContextThread(target=sink_loop, name="result-sink", daemon=True)
            sink.start()                            # its records carry job_id, attempt and worker
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, ParamSpec, TypeVar

from runtime.settings import LOG_FORMATS
from schemas.errors import ConfigError, InputError, SourceUnavailable, VsegError

P = ParamSpec("P")
R = TypeVar("R")

EXIT_ERROR = 1
EXIT_USAGE = 2  # what argparse exits with for its own errors too
EXIT_BROKEN = 3  # a worker whose own machinery failed, for its supervisor to restart it
EXIT_SOURCE = 3  # a live submit whose source cannot be opened or was lost (for its supervisor to restart it)
EXIT_INTERRUPTED = 130


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
JOB_FIELDS = ("job_id", "attempt", "worker")  # what the worker puts on every record about a job

_NO_FIELDS: Mapping[str, object] = MappingProxyType({})
_job_fields: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar("vseg_job_fields", default=_NO_FIELDS)
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "vseg_fields"}


@contextlib.contextmanager
def job_log_context(**fields: object) -> Iterator[None]:
    """Every record made in this context (this thread, and threads started with `ContextThread`) carries
    `fields` (None values are left out), on top of those of an enclosing job_log_context."""
    clash = sorted(set(fields) & _RESERVED)
    if clash:
        raise ValueError(f"log fields {clash} would overwrite a LogRecord attribute")
    token = _job_fields.set(MappingProxyType({**_job_fields.get(), **{k: v for k, v in fields.items() if v is not None}}))
    try:
        yield
    finally:
        _job_fields.reset(token)


def job_log_fields() -> dict[str, object]:
    """The job fields of the current context."""
    return dict(_job_fields.get())


class ContextThread(threading.Thread):
    """A `threading.Thread` whose target runs in a copy of the context of the thread that calls `start()`,
    so its records carry that context's job fields (a plain Thread starts with an empty context)."""

    _vseg_context: contextvars.Context | None = None

    def start(self) -> None:
        self._vseg_context = contextvars.copy_context()
        super().start()

    def run(self) -> None:
        if self._vseg_context is None:  # run() called directly, not through start(): the caller's own context
            super().run()
        else:
            self._vseg_context.run(super().run)


def start_in_context(target: Callable[..., object], *args: Any, name: str | None = None,
                     daemon: bool = True) -> ContextThread:
    """Start `target(*args)` on a new thread in a copy of the current context; return the thread."""
    thread = ContextThread(target=target, args=args, name=name, daemon=daemon)
    thread.start()
    return thread


def in_current_context(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn`, bound to (a copy of) the current context: each call runs in its own copy of it, whichever
    thread makes it (for `executor.submit(in_current_context(fn), ...)`)."""
    context = contextvars.copy_context()

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return context.copy().run(fn, *args, **kwargs)

    return run


class JobFields(logging.Filter):
    """Puts the current context's job fields on each record (an explicit `extra=` of the same name wins).
    Attach it to a handler: `configure_logging` does, on its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _job_fields.get()
        for name, value in fields.items():
            if not hasattr(record, name):
                setattr(record, name, value)
        record.vseg_fields = tuple(fields)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a record, on one line (newlines in a message or traceback are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in (*JOB_FIELDS, *getattr(record, "vseg_fields", ())):
            if name not in out and hasattr(record, name):
                out[name] = getattr(record, name)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def make_formatter(log_format: str) -> logging.Formatter:
    """The formatter of `log_format` (text or json)."""
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(verbose: bool = False, log_format: str | None = None) -> None:
    """Log to stderr at INFO (VSEG_LOG_LEVEL; DEBUG with `verbose`) in `log_format` (default: VSEG_LOG_FORMAT,
    else text; a bad value logs as text here, and Settings.load reports it). Called again (with the loaded
    settings' log_format), it replaces its own handler. Leaves alone a logging that someone else set up
    (an application embedding the service, pytest)."""
    level = logging.DEBUG if verbose else getattr(logging, os.environ.get("VSEG_LOG_LEVEL", "INFO").upper(), logging.INFO)
    fmt = log_format if log_format is not None else os.environ.get("VSEG_LOG_FORMAT", "").strip() or "text"
    if fmt not in LOG_FORMATS:
        fmt = "text"
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "vseg_handler", False)]
    if root.handlers and not ours:
        return
    for handler in ours:
        root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(make_formatter(fmt))
    handler.addFilter(JobFields())
    handler.vseg_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)


def exit_code(error: BaseException) -> int:
    """The command-line exit status for an error: 2 for bad settings or input (the caller's to fix), 3 for a
    live source that cannot be opened or was lost, else 1."""
    if isinstance(error, SourceUnavailable):
        return EXIT_SOURCE
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
