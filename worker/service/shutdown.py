"""Shutdown as events: signals are recorded, and the loop and the job's checks act on the record.

The signal handler only writes the signal's number to a self-pipe (one `os.write`: no lock taken,
nothing raised into whatever code the signal interrupted); the `signals` thread reads it and records
what it means:
  - while idle (no job held; a worker holding several jobs is idle only once it holds none): stop at once; the loop abandons any wait on Redis, however hung;
  - the first while a job runs: stop taking jobs; the job gets grace_s, then it is handed back;
  - the second: hand the job back and exit now.
The loop waits in `wait` and `call`, which a request ends at once. The job's threads learn of a shutdown
from `check()` (HandBack past the grace deadline, ForcedExit after a second signal), among the checks that
also stop a job whose lease is lost or which was cancelled.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar, cast

log = logging.getLogger(__name__)
T = TypeVar("T")


class HandBack(Exception):
    """Shutdown: give the current job back to the group for another worker."""


class ForcedExit(HandBack):
    """Second signal: hand back and exit now."""


class Stopped(Exception):
    """A wait of the loop's ended by a shutdown request (raised by the loop's own waits, never by a handler)."""


class Shutdown:
    """What has been asked of this worker: `requested` (take no more jobs), `forced` (leave now) and the
    current job's `deadline`. `idle` is the loop's: set while it holds no job."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.requested = False
        self.forced = False
        self.deadline: float | None = None
        self.idle = False
        self.held = 0  # jobs held now (a worker with concurrency > 1 holds several while its loop claims more)
        self._cond = threading.Condition()

    def install(self) -> None:
        """Route SIGTERM and SIGINT here (from the main thread, as Python requires)."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            try:
                os.write(write_fd, bytes([signum]))
            except BlockingIOError:  # the pipe is full of signals not yet read: one more adds nothing
                pass

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        threading.Thread(target=self._read_signals, args=(read_fd,), daemon=True, name="signals").start()

    def _read_signals(self, read_fd: int) -> None:
        while True:
            for signum in os.read(read_fd, 64):
                self.on_signal(signal.Signals(signum).name)

    def on_signal(self, name: str) -> None:
        """Record one SIGTERM or SIGINT (on the `signals` thread, never in the handler itself)."""
        with self._cond:
            if self.idle and not self.held:
                self.requested = self.forced = True
                log.warning("%s: idle, exiting now", name)
            elif self.requested:
                self.forced = True
                log.warning("second %s: handing back the current job and exiting now", name)
            else:
                self.requested = True
                self.deadline = time.monotonic() + self.grace_s
                log.warning("%s: finishing the current job (up to %.0f s), then exiting", name, self.grace_s)
            self._cond.notify_all()

    @contextmanager
    def idling(self) -> Iterator[None]:
        """While the loop holds no job: a signal then means leave at once."""
        was_idle, self.idle = self.idle, True
        try:
            yield
        finally:
            self.idle = was_idle

    def hold(self) -> None:
        """A job is held from now on: a signal means finish it (grace), not leave at once."""
        with self._cond:
            self.held += 1

    def release(self) -> None:
        with self._cond:
            self.held -= 1
            self._cond.notify_all()

    def force(self) -> None:
        """Hand back every job held and leave now (as a second signal does): a broken worker's way out."""
        with self._cond:
            self.requested = self.forced = True
            self._cond.notify_all()

    def stop(self) -> None:
        """Take no more jobs; the current one, if any, runs to its end (no deadline)."""
        with self._cond:
            self.requested = True
            self._cond.notify_all()

    def check(self) -> None:
        """For the job's threads: ForcedExit after a second signal, HandBack once the grace period is over."""
        if self.forced:
            raise ForcedExit()
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise HandBack()

    def wait(self, done: Callable[[], bool], timeout_s: float | None = None) -> bool:
        """Block until `done()` (looked at again on every `notify`), a shutdown request, or `timeout_s`.
        Returns `done()`."""
        with self._cond:
            self._cond.wait_for(lambda: done() or self.requested, timeout_s)
            return done()

    def wait_held(self, at_most: int, timeout_s: float) -> bool:
        """Block until at most `at_most` jobs are held, or `timeout_s`; whether they are."""
        with self._cond:
            return self._cond.wait_for(lambda: self.held <= at_most, timeout_s)

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def sleep(self, seconds: float) -> None:
        """Sleep (a backoff), ended early by a shutdown request."""
        self.wait(lambda: False, seconds)

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run `fn` (Redis calls that a hung Redis never answers) on a daemon thread, and return its result
        or raise its error; raise Stopped if a shutdown is requested first: the thread is left to end by
        its socket timeout, and an idle worker leaves at once."""
        if self.requested:
            raise Stopped(what)
        outcome: list[tuple[bool, Any]] = []

        def run() -> None:
            try:
                outcome.append((True, fn()))
            except BaseException as e:  # noqa: BLE001 - raised again on the waiting thread
                outcome.append((False, e))
            self.notify()

        threading.Thread(target=run, daemon=True, name=what).start()
        if not self.wait(lambda: bool(outcome)):
            raise Stopped(what)
        ok, value = outcome[0]
        if not ok:
            raise value
        return cast(T, value)
