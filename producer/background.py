"""Decoding ahead in a background thread of lowered priority, so it never slows a worker's model on
the same machine, while the caller's thread stays free to take Ctrl-C."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from runtime.priority import lower_this_thread

T = TypeVar("T")


def in_background_thread(fn: Callable[[], T], stop: threading.Event | None = None) -> T:
    """Run `fn` in a thread of lowered priority (it and the threads it starts: FFmpeg's, the JPEG pool),
    so that decoding ahead never slows a worker's model on the same machine. Re-raises its error.
    Interrupted while waiting, sets `stop` (which `fn` must heed soon) and waits up to 10 s for it."""
    box: dict[str, Any] = {}
    finished = threading.Event()

    def run() -> None:
        lower_this_thread()
        try:
            box["value"] = fn()
        except BaseException as e:  # handed back to the caller's thread
            box["error"] = e
        finally:
            finished.set()

    threading.Thread(target=run, name="decode", daemon=True).start()
    # Waited for with an Event, not Thread.join: a join interrupted by Ctrl-C marks a still-running thread
    # as stopped (CPython 3.11's bpo-45274 handling), so a second join would not wait.
    try:
        finished.wait()
    except BaseException:  # Ctrl-C while waiting: have the thread stop, and wait for it. A daemon thread still
        if stop is not None:  # inside OpenCV when the interpreter exits is unwound through C++ and aborts it.
            stop.set()
        finished.wait(timeout=10)
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]
