"""What a worker says about itself: its counters, its health key, the group's housekeeping, its memory.

The health key (`Keys.worker_health(name)`, a JSON value with a TTL of HEALTH_TTL_S) is refreshed every
second by the worker's heartbeat thread while it serves, with the status the loop and the job's runner
set (idle, or busy with a job and its frames done); `python -m worker check` reads it, and the metrics
endpoint's /healthz asks whether that thread still runs (`alive`), /readyz whether its last write
reached Redis (`redis_ok`). A worker whose own
machinery failed writes `"state": "broken"` and the reason before it exits, so that check reports it
even beside live workers. Housekeeping (every `housekeeping_s`) removes consumers of dead workers that hold
nothing and trims the events stream, so neither grows without bound.
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from schemas.names import EVENTS_MAXLEN, Keys
from worker.broker.claim import ensure_group, is_group_gone
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
    redis_errors: int = 0  # Redis down, hung or full while the loop waited for work (job-level ones: redis_faults)
    duplicates_rejected: int = 0
    consumers_removed: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


class Health:
    """This worker's health key and the heartbeat thread that refreshes it. `broken` says why the worker
    cannot go on, once it cannot; `redis_answering` is False once a call on the way out found Redis not
    answering (the key is then left to expire rather than waited on)."""

    def __init__(self, client: redis.Redis, keys: Keys, name: str, stats: WorkerStats, *, period_s: float = 1.0,
                 stale_s: float = 10.0, model: str = "", capabilities: tuple[str, ...] = ()) -> None:
        self.client = client
        self.model = model  # what this worker serves, in its key for `submit`'s check (producer/capabilities.py)
        self.capabilities = capabilities
        self.key = keys.worker_health(name)
        self.name = name
        self.stats = stats
        self.period_s = period_s
        self.stale_s = stale_s  # a heartbeat older than this (a write blocked past it) is not alive
        self.broken: str | None = None
        self.redis_answering = True
        self._status: dict[str, Any] = {"state": "idle"}
        self._jobs: dict[str, int] = {}  # the jobs held now (a worker with concurrency > 1 holds several): frames done
        self._jobs_lock = threading.Lock()
        self._tick_at: float | None = None  # when the heartbeat last went round (monotonic)
        self._written_at: float | None = None  # when a write last reached Redis
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def value(self, **status: Any) -> str:
        return json.dumps({"worker": self.name, "host": socket.gethostname(), "at": time.time(),
                           "jobs_done": self.stats.jobs_done, "model": self.model,
                           "capabilities": list(self.capabilities), **status})

    def beat(self, **status: Any) -> None:
        """What the key says from now on (the heartbeat thread writes it within a second)."""
        self._status = dict(status)

    def job(self, job_id: str, frames_done: int) -> None:
        """A held job's progress: the key says `busy`, with every held job's frames done under `jobs` (and
        the latest one's as `job_id`/`frames_done`, as a single-job worker says it)."""
        with self._jobs_lock:
            self._jobs[job_id] = frames_done
            self._status = {"state": "busy", "job_id": job_id, "frames_done": frames_done, "jobs": dict(self._jobs)}

    def job_left(self, job_id: str) -> None:
        """A job is no longer held: `idle` once none is."""
        with self._jobs_lock:
            self._jobs.pop(job_id, None)
            if self._jobs:
                self._status = {"state": "busy", "jobs": dict(self._jobs)}
            else:
                self._status = {"state": "idle"}

    def start(self) -> None:
        """Start the heartbeat thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="worker-heartbeat")
        self._thread.start()

    def stop(self, join_s: float = 1.0) -> None:
        """Stop the heartbeat thread: nothing more is written by it (a write in flight may still land)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(join_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._tick_at = time.monotonic()
            try:  # best effort: Redis gone or full is readiness, not health; the lease is what matters for jobs
                self.client.set(self.key, self.value(**self._status), ex=HEALTH_TTL_S)
                self._written_at = time.monotonic()
            except redis.RedisError:
                pass
            self._stop.wait(self.period_s)

    def alive(self) -> tuple[bool, str]:
        """Whether the heartbeat thread runs and went round within `stale_s` (/healthz)."""
        if self.broken is not None:
            return False, f"broken: {self.broken}"
        if self._thread is None or not self._thread.is_alive():
            return False, "the heartbeat thread is not running"
        age = time.monotonic() - (self._tick_at or 0.0)
        if age > self.stale_s:
            return False, f"the heartbeat is {age:.0f} s old"
        return True, f"heartbeat {age:.1f} s ago, {self._status.get('state', 'idle')}"

    def redis_ok(self) -> tuple[bool, str]:
        """Whether the heartbeat's last write reached Redis within `stale_s` (part of /readyz)."""
        if self._written_at is None:
            return False, "Redis has not answered yet"
        age = time.monotonic() - self._written_at
        if age > self.stale_s:
            return False, f"Redis has not answered for {age:.0f} s"
        return True, "Redis answers"

    def mark_broken(self, reason: str, timeout_s: float) -> None:
        """Say in the key that this worker is broken (`python -m worker check` reports it), waiting at most
        `timeout_s` for a Redis that may not answer."""
        self.broken = reason
        self.stop(join_s=0)  # it must not write over the broken state
        log.critical("worker %s is broken: %s; exiting so that its supervisor restarts it", self.name, reason)
        value = self.value(state="broken", reason=reason)
        call_bounded(lambda: self.client.set(self.key, value, ex=HEALTH_TTL_S), timeout_s,
                     "marking the health key broken")

    def remove(self, timeout_s: float) -> None:
        """On a clean exit, remove the key; a broken worker's stays (to be reported), and with Redis not
        answering it is left to expire."""
        self.stop(join_s=min(0.1, timeout_s))  # a write blocked on a hung Redis is not waited for
        if self.broken is None and self.redis_answering:
            call_bounded(lambda: self.client.delete(self.key), timeout_s, "removing the health key")


class Housekeeping:
    """Every `every_s` (the `housekeeping_s` setting): remove the group's consumers that hold nothing and were
    idle for three leases (workers that died; XGROUP DELCONSUMER drops a consumer's pending entries, so only
    ever when it holds none), and trim the events stream to about EVENTS_MAXLEN entries.

    A jobs stream or group that has vanished (Redis restarted empty, a failover to a replica without them)
    is recreated here, logged once until it is seen again, and nothing else is done that round: there are
    no consumers to remove in a group just made. Housekeeping never raises for it."""

    def __init__(self, client: redis.Redis, keys: Keys, name: str, *, every_s: float, lease_s: float,
                 stats: WorkerStats) -> None:
        self.client = client
        self.keys = keys
        self.name = name
        self.every_s = every_s
        self.lease_s = lease_s
        self.stats = stats
        self.groups_recreated = 0
        self._done_at: float | None = None
        self._missing_logged = False

    def due(self) -> bool:
        return self._done_at is None or time.monotonic() - self._done_at >= self.every_s

    def run(self, *, force: bool = False) -> None:
        if not force and not self.due():
            return
        self._done_at = time.monotonic()
        self.client.xtrim(self.keys.events, maxlen=EVENTS_MAXLEN, approximate=True)  # a missing stream: 0
        try:
            consumers = self.client.xinfo_consumers(self.keys.jobs, self.keys.group)
        except redis.ResponseError as e:
            if not is_group_gone(e):
                raise
            self._recreate(e)
            return
        self._missing_logged = False
        idle_ms = 3 * int(self.lease_s * 1000)
        for c in consumers:
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            if name == self.name or c["pending"] != 0 or c["idle"] <= idle_ms:
                continue
            try:
                removed = self.client.xgroup_delconsumer(self.keys.jobs, self.keys.group, name)
            except redis.ResponseError as e:  # the group went between the two calls
                if not is_group_gone(e):
                    raise
                self._recreate(e)
                return
            if removed == 0:
                self.stats.consumers_removed += 1
                log.info("removed idle consumer %s (held nothing)", name)

    def _recreate(self, error: redis.ResponseError) -> None:
        """The jobs stream or its group is gone: make them again (an empty stream, the group from its start)."""
        if not self._missing_logged:
            log.warning("housekeeping: the jobs stream %s or its group %s is gone (%s: Redis restarted empty?); "
                        "recreating them", self.keys.jobs, self.keys.group, error)
            self._missing_logged = True
        ensure_group(self.client, self.keys)
        self.groups_recreated += 1


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
