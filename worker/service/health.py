"""What a worker says about itself: its counters, its health key, the group's housekeeping, its memory.

The health key (`Keys.worker_health(name)`, a JSON value with a TTL of HEALTH_TTL_S) is refreshed at
most once a second while the worker serves; `python -m worker check` reads it. A worker whose own
machinery failed writes `"state": "broken"` and the reason before it exits, so that check reports it
even beside live workers. Housekeeping (every lease) removes consumers of dead workers that hold
nothing and trims the events stream, so neither grows without bound.
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from schemas.names import EVENTS_MAXLEN, Keys
from worker.broker.redis_client import call_bounded

log = logging.getLogger(__name__)

HEALTH_TTL_S = 30


@dataclass
class WorkerStats:
    jobs_done: int = 0
    reclaimed: int = 0
    handed_back: int = 0
    leases_lost: int = 0
    jobs_vanished: int = 0
    jobs_abandoned: int = 0
    redis_faults: int = 0
    dead_lettered: int = 0
    duplicates_rejected: int = 0
    consumers_removed: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


class Health:
    """This worker's health key. `broken` says why the worker cannot go on, once it cannot;
    `redis_answering` is False once a call on the way out found Redis not answering (the key is then
    left to expire rather than waited on)."""

    def __init__(self, client: redis.Redis, keys: Keys, name: str, stats: WorkerStats) -> None:
        self.client = client
        self.key = keys.worker_health(name)
        self.name = name
        self.stats = stats
        self.broken: str | None = None
        self.redis_answering = True
        self._beat_at = 0.0

    def value(self, **status: Any) -> str:
        return json.dumps({"worker": self.name, "host": socket.gethostname(), "at": time.time(),
                           "jobs_done": self.stats.jobs_done, **status})

    def beat(self, **status: Any) -> None:
        """Refresh the key (at most once a second), best effort: Redis gone or full, the lease is what matters."""
        now = time.monotonic()
        if now - self._beat_at < 1.0:
            return
        self._beat_at = now
        try:
            self.client.set(self.key, self.value(**status), ex=HEALTH_TTL_S)
        except redis.RedisError:
            pass

    def mark_broken(self, reason: str, timeout_s: float) -> None:
        """Say in the key that this worker is broken (`python -m worker check` reports it), waiting at most
        `timeout_s` for a Redis that may not answer."""
        self.broken = reason
        log.critical("worker %s is broken: %s; exiting so that its supervisor restarts it", self.name, reason)
        value = self.value(state="broken", reason=reason)
        call_bounded(lambda: self.client.set(self.key, value, ex=HEALTH_TTL_S), timeout_s,
                     "marking the health key broken")

    def remove(self, timeout_s: float) -> None:
        """On a clean exit, remove the key; a broken worker's stays (to be reported), and with Redis not
        answering it is left to expire."""
        if self.broken is None and self.redis_answering:
            call_bounded(lambda: self.client.delete(self.key), timeout_s, "removing the health key")


class Housekeeping:
    """Every `every_s`: remove the group's consumers that hold nothing and were idle for three leases
    (workers that died; XGROUP DELCONSUMER drops a consumer's pending entries, so only ever when it holds
    none), and trim the events stream to about EVENTS_MAXLEN entries."""

    def __init__(self, client: redis.Redis, keys: Keys, name: str, lease_s: float, stats: WorkerStats) -> None:
        self.client = client
        self.keys = keys
        self.name = name
        self.lease_s = lease_s
        self.stats = stats
        self._done_at = 0.0

    def run(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._done_at < self.lease_s:
            return
        self._done_at = now
        idle_ms = 3 * int(self.lease_s * 1000)
        for c in self.client.xinfo_consumers(self.keys.jobs, self.keys.group):
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            if name != self.name and c["pending"] == 0 and c["idle"] > idle_ms:
                if self.client.xgroup_delconsumer(self.keys.jobs, self.keys.group, name) == 0:
                    self.stats.consumers_removed += 1
                    log.info("removed idle consumer %s (held nothing)", name)
        self.client.xtrim(self.keys.events, maxlen=EVENTS_MAXLEN, approximate=True)


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from
    the process that forked this one (a benchmark holding a model would inflate the worker's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
