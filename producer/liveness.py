"""The producer's sign of life while it streams a job's frames.

A streamed job is on the queue before its video is decoded, so a worker waits for frames that only a
running producer can write. While it decodes, the producer keeps `Keys.producer(job_id)` alive (SET
with an expiry of `ttl_s`, refreshed every `ttl_s / 3`); a worker that finds the key gone for longer
than a refresh interval knows the producer died (killed, crashed, machine lost) and fails the job at
once, instead of waiting out its stall timeout on every attempt (`worker/frames.py`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from types import TracebackType

import redis

log = logging.getLogger(__name__)


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
        while not self._stop.wait(interval):
            try:
                self.beat()
                interval = self.ttl_s / 3
            except redis.RedisError as e:
                log.warning("cannot refresh %s (%s); retrying", self.key, e)
                interval = min(0.5, self.ttl_s / 3)

    def __enter__(self) -> ProducerHeartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.client.delete(self.key)
        except redis.RedisError as e:  # it expires on its own
            log.warning("cannot delete %s (%s); it expires in %.0f s", self.key, e, self.ttl_s)
