"""Unit tier: signals become events (worker/service/shutdown.py). The handler records a signal and raises
nothing into the code it interrupts; the loop's waits end at once on a request, however long the call
they wait for; the job learns of a shutdown from its checks."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from worker.service.shutdown import ForcedExit, HandBack, Shutdown, Stopped


@pytest.fixture
def handlers_restored() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def wait_until(predicate: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)
    assert predicate(), "timed out"  # type: ignore[operator]


def test_signals_are_recorded_and_raise_nothing_where_they_land(handlers_restored: None) -> None:
    shutdown = Shutdown(grace_s=0.0)
    shutdown.install()
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs in this thread, between two of its bytecodes
    busy_until = time.monotonic() + 0.2
    while time.monotonic() < busy_until:  # what a job does: no exception may land in here
        sum(range(100))
    wait_until(lambda: shutdown.requested)
    assert not shutdown.forced and shutdown.deadline is not None
    with pytest.raises(HandBack):
        shutdown.check()  # grace 0: the job learns it at its next check, and hands back
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt either
    wait_until(lambda: shutdown.forced)
    with pytest.raises(ForcedExit):
        shutdown.check()


def test_first_signal_gives_grace_second_forces_and_idle_leaves_at_once() -> None:
    busy = Shutdown(grace_s=60.0)
    busy.on_signal("SIGTERM")
    assert busy.requested and not busy.forced
    busy.check()  # within the grace period: the job goes on
    busy.on_signal("SIGTERM")
    with pytest.raises(ForcedExit):
        busy.check()
    idle = Shutdown(grace_s=60.0)
    with idle.idling():
        idle.on_signal("SIGTERM")
    assert idle.requested and idle.forced and not idle.idle


def test_stop_lets_the_current_job_finish() -> None:
    shutdown = Shutdown(grace_s=0.0)
    shutdown.stop()
    assert shutdown.requested and shutdown.deadline is None
    shutdown.check()


def test_a_call_returns_its_result_or_error_and_is_abandoned_on_a_request() -> None:
    shutdown = Shutdown(grace_s=1.0)
    assert shutdown.call(lambda: 42, "answer") == 42
    with pytest.raises(ZeroDivisionError):
        shutdown.call(lambda: 1 // 0, "error")
    hung = threading.Event()  # a Redis that never answers
    threading.Timer(0.2, shutdown.stop).start()
    t0 = time.monotonic()
    with pytest.raises(Stopped):
        shutdown.call(hung.wait, "hung read")
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(Stopped):  # once stopped, nothing more is started
        shutdown.call(lambda: 1, "after")
    hung.set()


def test_sleep_ends_early_on_a_request() -> None:
    shutdown = Shutdown(grace_s=1.0)
    threading.Timer(0.1, lambda: shutdown.on_signal("SIGTERM")).start()
    t0 = time.monotonic()
    shutdown.sleep(30)
    assert time.monotonic() - t0 < 5
