"""The worker's Redis client: bounded socket timeouts, so that a hung Redis never holds a thread past
the lease it guards; the worker's own loops (lease, fenced writes, the main loop) do the retrying."""

from __future__ import annotations

import redis

from runtime.connection import connect
from runtime.settings import Settings


def worker_socket_timeout_s(settings: Settings) -> float:
    """The worker's Redis calls give up after this: never longer than a third of a lease, never shorter
    than a blocking read plus a second."""
    return min(settings.socket_timeout_s, max(settings.block_ms / 1000 + 1.0, settings.lease_s / 3))


def worker_client(settings: Settings) -> redis.Redis:
    """A client for the worker (and its model process): those timeouts and one quick reconnect."""
    timeout_s = worker_socket_timeout_s(settings)
    return connect(settings, retries=1, socket_timeout_s=timeout_s, connect_timeout_s=min(5.0, timeout_s))
