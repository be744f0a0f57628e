"""The worker's Redis client: bounded socket timeouts, so that a hung Redis never holds a thread past
the lease it guards; the worker's own loops (lease, fenced writes, the main loop) do the retrying.
`call_bounded` is for the few calls a worker makes on its way out, which must not wait for Redis at all."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import redis

from runtime.connection import connect
from runtime.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


def worker_socket_timeout_s(settings: Settings) -> float:
    """The worker's Redis calls give up after this: never longer than a third of a lease, never shorter
    than a blocking read plus a second."""
    return min(settings.socket_timeout_s, max(settings.block_ms / 1000 + 1.0, settings.lease_s / 3))


def worker_client(settings: Settings) -> redis.Redis:
    """A client for the worker (and its model process): those timeouts and one quick reconnect."""
    timeout_s = worker_socket_timeout_s(settings)
    return connect(settings, retries=1, socket_timeout_s=timeout_s, connect_timeout_s=min(5.0, timeout_s))


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
