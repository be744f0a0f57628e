"""`call_bounded`: for the few calls a worker makes on its way out, which must not wait for Redis at all.
(The worker's client itself, with its bounded socket timeouts, is runtime/connection.py's `worker_client`.)"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def call_bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T | None:
    """Run `fn` on a daemon thread and wait at most `timeout_s` for it (a hung Redis answers nothing,
    and a worker on its way out must not wait for it). None if it did not finish in time or failed."""
    result: list[T] = []

    def run() -> None:
        try:
            result.append(fn())
        except Exception as e:  # noqa: BLE001 - reported here, the caller goes on without it
            log.warning("%s failed: %s", what, e)

    thread = threading.Thread(target=run, daemon=True, name=f"bounded-{what}")
    thread.start()
    thread.join(max(0.0, timeout_s))
    if thread.is_alive():
        log.warning("%s did not finish within %.1f s; going on without it", what, timeout_s)
        return None
    return result[0] if result else None
