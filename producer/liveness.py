"""The producer's sign of life while it streams a job's frames.

A streamed job is on the queue before its video is decoded, so a worker waits for frames that only a
running producer can write. While it decodes, the producer keeps `Keys.producer(job_id)` alive (SET
with an expiry of `ttl_s`, refreshed every `ttl_s / 3`); a worker that finds the key gone for longer
than a refresh interval knows the producer died (killed, crashed, machine lost) and fails the job at
once, instead of waiting out its stall timeout on every attempt (`worker/sources/frames.py`).

A producer cut off from Redis (down, hung, partitioned) cannot delete its key, and does not wait for
Redis to say goodbye: the key expires on its own, which is the signal the worker acts on.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from types import TracebackType

import redis

from schemas.errors import RedisUnavailable

log = logging.getLogger(__name__)

# How long leaving the block waits for a refresh in flight when the block failed (a hung Redis can hold
# one for retries × the socket timeout): a refresh landing later only keeps the key until it expires.
EXIT_WAIT_S = 2.0


def redis_unavailable(error: BaseException | None) -> bool:
    """The error is Redis not answering (refused, reset, hung past the socket timeout), not a refusal."""
    return isinstance(error, (redis.ConnectionError, redis.TimeoutError, RedisUnavailable))


class ProducerHeartbeat:
    """Keeps `key` alive from a daemon thread for the duration of a `with` block, then deletes it.

    The first refresh happens in `__enter__`, so the key exists before anything the block enqueues.
    A refresh that fails (Redis restarting) is retried every half second until it succeeds."""

    def __init__(self, client: redis.Redis, key: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, but got {ttl_s}")
        self.client = client
        self.key = key
        self.ttl_s = ttl_s
        self.value = f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="producer-heartbeat", daemon=True)

    def beat(self) -> None:
        self.client.set(self.key, self.value, px=max(1, int(self.ttl_s * 1000)))

    def _run(self) -> None:
        interval = self.ttl_s / 3
        failing = False
        while not self._stop.wait(interval):
            try:
                self.beat()
                if failing:
                    log.info("refreshed %s again", self.key)
                failing = False
                interval = self.ttl_s / 3
            except redis.RedisError as e:  # said once per outage, not every half second
                (log.debug if failing else log.warning)("cannot refresh %s (%s); retrying", self.key, e)
                failing = True
                interval = min(0.5, self.ttl_s / 3)

    def __enter__(self) -> ProducerHeartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=None if exc is None else EXIT_WAIT_S)
        if redis_unavailable(exc):  # asking again would only wait out more retries: it expires on its own
            log.debug("not deleting %s: Redis does not answer; it expires in %.0f s", self.key, self.ttl_s)
            return
        try:
            self.client.delete(self.key)
        except redis.RedisError as e:  # it expires on its own
            (log.debug if exc is not None else log.warning)("cannot delete %s (%s); it expires in %.0f s",
                                                            self.key, e, self.ttl_s)
