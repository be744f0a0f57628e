"""A worker's lease on a job, and the fenced writes that only land while the lease holds.

The lease is the fence in the job's own hash: `owner` (the consumer name of the worker that holds the
job) and `lease_until` (ms, by the TIME of the job hash's Redis node). A worker takes a job once its entry
is claimed (`take`, worker/broker/claim.py): refused while another worker's lease still runs. A heartbeat
thread renews it every lease_s / 3 with a Lua script that checks the owner and moves `lease_until` on in
one atomic step, then resets the entry's idle time in the consumer group's pending list (XCLAIM ...
JUSTID, a separate command: the jobs stream is a shared key, on another slot of a cluster). The pending
list is how a job whose worker stopped renewing is found: another worker takes the entry (XAUTOCLAIM)
once it has been idle for lease_s, i.e. only after its owner stopped renewing: crashed, frozen
(SIGSTOP), or cut off; and its `take` then moves the fence.

Every write a worker makes for a job goes through a script (worker/broker/scripts.py) that first checks
that the worker still owns the job, so a stale worker that wakes up after losing its lease writes nothing.

A lease is renewed only for a job that makes progress (BullMQ's stalled-job checker is the model):
the job calls `progress()` for every frame the model yields and every batch the result path
publishes. With no progress for `stall_s` the heartbeat stops renewing and abandons the job (its owner
becomes a placeholder and its entry is handed to a placeholder consumer, idle for ten leases, so any
worker's XAUTOCLAIM takes it at once and this worker's fenced writes are refused), and `on_stall` is told
why. The job's threads learn how their lease stands from `check()`, which never waits on Redis:
  - lost (another worker owns it), stalled (abandoned), vanished (Redis lost the job's hash, or the
    stream or group: restarted empty): LeaseLost, and the job stops writing;
  - suspended (presumed lost): no renewal has been confirmed for a whole lease (Redis refused, hung
    or unreachable), so another worker may own the job by now. `check()` does not raise, but every
    write waits (`writable()` is False) and nothing but the heartbeat's owner-checked renewal is
    sent. When Redis is back the renewal settles it: still ours (the job hash's owner is still this
    worker) and the job resumes where it paused, every queued write resent with its fixed id;
    taken by another worker (XAUTOCLAIM and `take` after the lease) and it is lost, so this worker stops
    and the other reruns it, Redis rejecting the frames already published. A suspension longer than
    stall_s is a stall like any other;
  - the heartbeat thread itself died: WorkerBroken, and the worker exits for its supervisor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from runtime.faults import is_redis_full
from runtime.logs import ContextThread
from schemas.errors import WorkerBroken
from schemas.names import JobState, Keys
from worker.broker.scripts import Scripts

log = logging.getLogger(__name__)

ABANDONED_CONSUMER = "abandoned"  # holds stalled jobs' entries until a worker's XAUTOCLAIM takes them


class LeaseLost(Exception):
    """This worker no longer owns the job (another worker took it, or may have: Redis was out of reach
    for a whole lease; or the job stalled and was abandoned). Stop and write nothing."""


class JobVanished(LeaseLost):
    """Redis no longer has the jobs stream or the consumer group (restarted empty, or failed over to a
    replica without them): the job's entry is gone and cannot be recovered here."""


class JobStalled(LeaseLost):
    """The job made no progress for stall_s: its lease was abandoned so that it can be taken again."""


def is_nogroup(error: BaseException) -> bool:
    return isinstance(error, redis.ResponseError) and "NOGROUP" in str(error)


def vanished_message(job: str, keys: Keys) -> str:
    return (f"job {job} vanished: Redis no longer has its hash {keys.job(job)}, or the stream {keys.jobs} or its group "
            f"{keys.group} (restarted without persistence, or failed over to a replica without them); its entry "
            f"cannot be recovered here: submit it again")


def reset_idle(client: redis.Redis, keys: Keys, entry_id: str, consumer: str, idle_ms: int | None = None) -> None:
    """XCLAIM the entry for `consumer` (JUSTID): its idle time starts again (or is set to `idle_ms`, so that any
    worker's XAUTOCLAIM takes it at once). Sent only after the job hash said the job is this worker's. A
    missing group or stream raises NOGROUP (Redis restarted empty)."""
    client.xclaim(keys.jobs, keys.group, consumer, 0, [entry_id], idle=idle_ms, justid=True)


class Lease:
    """Ownership of one job entry, renewed by a background thread while the job makes progress."""

    def __init__(self, client: redis.Redis, keys: Keys, entry_id: str, consumer: str, lease_s: float, *,
                 stall_s: float | None = None, job: str = "", on_stall: Callable[[str], None] | None = None,
                 scripts: Scripts | None = None) -> None:
        self.client = client
        self.scripts = scripts if scripts is not None else Scripts(client)
        self.keys = keys
        self.entry_id = entry_id
        self.consumer = consumer
        self.lease_s = lease_s
        self.stall_s = stall_s if stall_s is not None else 10 * lease_s
        self.job = job or entry_id
        self.on_stall = on_stall
        self.lost = threading.Event()
        self.reason = ""  # why the lease is lost, once it is
        self.vanished = False  # lost because Redis lost the stream or group
        self.stalled = False  # lost because the job made no progress for stall_s
        self.crashed: BaseException | None = None  # the heartbeat thread's own failure
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.renewals = 0
        now = time.monotonic()
        self.renewed_at = now  # when the last confirmed renewal was sent (the claim itself counts)
        self.progress_at = now
        self._suspended_since: float | None = None

    def args(self) -> list[Any]:
        """The fenced scripts' first ARGV: this worker's consumer name (worker/broker/scripts.py)."""
        return [self.consumer]

    @property
    def job_key(self) -> str:
        return self.keys.job(self.job)

    def lost_reply(self, status: int, what: str) -> LeaseLost:
        """A fenced script's -1 (another worker owns the job) or -2 (its hash is gone): the lease marked lost,
        and the error to raise."""
        if status == -2:
            self.mark_lost(vanished_message(self.job, self.keys), vanished=True)
            return JobVanished(self.reason)
        self.mark_lost(f"job {self.job}: lease lost; {what}")
        return LeaseLost(self.reason)

    def progress(self) -> None:
        """The job moved on (a frame processed or published): keep renewing."""
        self.progress_at = time.monotonic()

    def mark_lost(self, reason: str, *, vanished: bool = False, stalled: bool = False) -> None:
        if not self.lost.is_set():
            self.reason = reason
            self.vanished = vanished
            self.stalled = stalled
            self.lost.set()

    @property
    def suspended(self) -> bool:
        """No renewal confirmed for a whole lease: the job may be another worker's by now, so nothing is
        written until a renewal confirms it is still ours (or the lease is lost)."""
        return not self.lost.is_set() and self.remaining_s() <= 0

    def writable(self) -> bool:
        return not self.lost.is_set() and self.remaining_s() > 0

    def renew(self) -> bool:
        sent_at = time.monotonic()
        status = self.scripts.renew(keys=[self.job_key], args=[*self.args(), int(self.lease_s * 1000)])
        ok = status >= 1  # 2: confirmed, Redis full (worker/broker/scripts.py RENEW_LUA)
        if status == -2:
            reset_idle(self.client, self.keys, self.entry_id, self.consumer)  # NOGROUP if the stream is gone too
            self.mark_lost(vanished_message(self.job, self.keys), vanished=True)
            return False
        if ok:
            reset_idle(self.client, self.keys, self.entry_id, self.consumer)
            self.renewals += 1
            if self._suspended_since is not None:
                log.warning("lease on job %s confirmed again after %.1f s without Redis: still ours, writes resume",
                            self.job, time.monotonic() - self._suspended_since)
                self._suspended_since = None
            self.renewed_at = max(self.renewed_at, sent_at)
        else:
            self.mark_lost(f"lease lost on job entry {self.entry_id}: another worker owns it now")
        return ok

    def _abandon(self) -> None:
        """No progress for stall_s: stop renewing and make the job claimable at once (best effort: if Redis
        does not answer, the lease simply runs out)."""
        idle_s = time.monotonic() - self.progress_at
        reason = (f"job {self.job} stalled: no frame processed or published for {idle_s:.0f} s (stall_s "
                  f"{self.stall_s:g}); abandoned by worker {self.consumer} so that it can be taken again")
        self.mark_lost(reason, stalled=True)
        log.error("%s", reason)
        try:
            if self.scripts.abandon(keys=[self.job_key],
                                    args=[*self.args(), ABANDONED_CONSUMER, reason, JobState.RETRYING.value]) == 1:
                reset_idle(self.client, self.keys, self.entry_id, ABANDONED_CONSUMER, int(10 * self.lease_s * 1000))
        except redis.RedisError as e:
            log.warning("could not hand the stalled job %s back at once (%s); it is claimable after its lease",
                        self.job, e)
        if self.on_stall is not None:
            self.on_stall(reason)

    def _run(self) -> None:
        interval = self.lease_s / 3
        try:
            while not self._stop.wait(interval):
                if self.lost.is_set():
                    return
                if time.monotonic() - self.progress_at > self.stall_s:
                    self._abandon()
                    return
                if self.suspended and self._suspended_since is None:
                    self._suspended_since = time.monotonic()
                    log.warning("lease on job %s presumed lost: no renewal confirmed for %.1f s, longer than the lease "
                                "(%g s; Redis unreachable or not answering, or this worker frozen), so another worker "
                                "may own the job by now: writes paused until Redis answers", self.job,
                                time.monotonic() - self.renewed_at, self.lease_s)
                try:
                    was_lost = self.lost.is_set()
                    if self._stop.is_set():
                        return
                    if not self.renew():
                        if not was_lost:
                            log.warning("%s", self.reason)
                        return
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    log.warning("could not renew the lease on %s (%s); retrying", self.entry_id, e)
                except redis.ResponseError as e:
                    if is_nogroup(e):
                        self.mark_lost(vanished_message(self.job, self.keys), vanished=True)
                        log.error("%s", self.reason)
                        return
                    if not is_redis_full(e):  # renewal writes nothing new: it should pass even when full
                        raise
                    log.warning("could not renew the lease on %s (Redis is full: %s); retrying", self.entry_id, e)
        except BaseException as e:  # noqa: BLE001 - reported to the job's threads by check()
            self.crashed = e
            log.exception("the lease thread of job %s died", self.job)

    def __enter__(self) -> Lease:
        self._thread = ContextThread(target=self._run, daemon=True, name=f"lease-{self.entry_id}")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, join_s: float = 1.0) -> None:
        """Stop renewing; wait up to `join_s` for a renewal in flight (one stuck on a hung Redis ends by its
        socket timeout, and then renews nothing more). Stopped already (before a hand-back): not waited for
        again, since a renewal still stuck on a hung Redis is one the first wait gave up on."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=join_s)

    def remaining_s(self) -> float:
        """Seconds until the lease is presumed lost, unless a renewal is confirmed before then."""
        return self.renewed_at + self.lease_s - time.monotonic()

    def check(self) -> None:
        """Raise if the job must stop: LeaseLost (lost, stalled, vanished) or WorkerBroken (the heartbeat
        thread died). A suspended lease does not raise: writes wait for it (see `writable`)."""
        if self.crashed is not None:
            raise WorkerBroken(f"the lease thread of job {self.job} died ({type(self.crashed).__name__}: "
                               f"{self.crashed}): nothing renews the lease")
        if self.lost.is_set():
            if self.vanished:
                raise JobVanished(self.reason)
            raise JobStalled(self.reason) if self.stalled else LeaseLost(self.reason)
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            raise WorkerBroken(f"the lease thread of job {self.job} is gone: nothing renews the lease")


def _no_check() -> None:
    return None


def wait_with_lease(seconds: float, lease: Lease, check: Callable[[], None] = _no_check) -> None:
    """Sleep (e.g. a retry backoff) while the lease thread keeps the job ours (waiting as told is progress).
    `check` (the worker's shutdown check) ends the wait by raising."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        lease.check()
        check()
        lease.progress()
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
