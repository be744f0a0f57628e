"""The worker's run loop: wait for Redis, claim a job entry, hand it to its handling, repeat; shut down.

Each job runs under a lease (worker/broker/lease.py) renewed by a heartbeat thread; every write is fenced
by it. The loop first takes over entries whose lease expired (their worker died: XAUTOCLAIM), then reads
new ones (worker/broker/claim.py), while it has a free slot and the device has room for one more session
(worker/service/capacity.py); each entry is handled in a slot (worker/service/slots.py: on this thread with
one slot, on its own thread with `concurrency` > 1; worker/service/entry.py: decode, validate, attempts,
dead letters) and runs as one job (worker/service/runner.py). A job entry is acknowledged and deleted
(vseg:jobs holds only jobs in flight) right after the fenced step that writes its one terminal entry:
completed, failed, cancelled or dead (a worker dying in between leaves the entry to the next claimer, which
finds the job ended and drops it).

Signals (worker/service/shutdown.py) are events: the handler only records them, nothing is raised into
the code it interrupts. The first SIGTERM/SIGINT stops taking jobs and gives the jobs held grace_s to
finish, then hands them back (claimable at once, the attempt not counted; the hand-back waits at most a
lease); a second one hands back and exits at once; the job learns of both at its next check. An idle
worker exits at once, whatever Redis does: every call an idle worker makes to Redis runs on a thread the
loop abandons on a signal.

Infrastructure faults (README "Guarantees"): the worker waits for Redis at start and whenever it is
gone, with backoff, logging where it tries. A job whose lease cannot be renewed for a whole lease
(Redis refused or hung) stops writing until the lease's renewal says whether the job is still this
worker's (it resumes) or another's (it stops). A job with no progress for stall_s is abandoned by its
lease; if the job's thread does not come back within a lease after that (a wedged model), the worker
exits with EXIT_BROKEN. Redis restarted empty: the job is logged as vanished, the group recreated, and
the worker goes on. Redis full or a full disk: retried with backoff (RetryableError), the job's input
kept until its attempts are spent. A broken worker (its lease thread died, its model process cannot be
restarted) hands its job back, marks its health key broken and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import uuid
from collections.abc import Callable
from typing import TypeVar

import redis
from prometheus_client import CollectorRegistry

from runtime.connection import worker_socket_timeout_s
from runtime.faults import redact_url, redis_fault, redis_full_message
from runtime.logs import EXIT_BROKEN
from runtime.settings import Settings
from schemas.names import LANES, Keys
from worker.broker.claim import Entry, claim_expired, ensure_group, is_group_gone, read_new
from worker.broker.lease import Lease
from worker.broker.scripts import Scripts
from worker.model.host import ModelHost
from worker.model.segment import Segmenter
from worker.service import entry
from worker.service.capacity import pick_concurrency, refusal
from worker.service.context import WorkerContext
from worker.service.health import Health, Housekeeping, WorkerStats, peak_rss_mib
from worker.service.metrics import WorkerMetrics
from worker.service.outcomes import Outcome, outcome_of
from worker.service.shutdown import Shutdown, Stopped
from worker.service.slots import JobSlots

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_IMAGE_SIZE = 1024  # every SAM 2.1 preset's own input size (the image_size setting's None)


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


def exit_now(reason: str) -> None:
    """The worker is wedged (a thread that cannot be stopped): leave now, for the supervisor to restart it."""
    logging.shutdown()
    os._exit(EXIT_BROKEN)


class Backoff:
    """Exponential backoff for the loop's waits on Redis: `next_s` doubles after each `sleep`, up to
    `cap_s`; `reset` when Redis answers again. `wait` sleeps (the shutdown's: a request ends it)."""

    def __init__(self, first_s: float, wait: Callable[[float], None], cap_s: float = 5.0) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self.next_s = first_s
        self.wait = wait

    def sleep(self) -> None:
        self.wait(self.next_s)
        self.next_s = min(self.next_s * 2, self.cap_s)

    def reset(self) -> None:
        self.next_s = self.first_s


class Worker:
    """One worker: the model loaded once, a Redis client, and the loop. What its parts share is in `ctx`;
    each entry's state is the entry's own (worker/service/entry.py)."""

    def __init__(self, *, settings: Settings, segmenter: Segmenter | ModelHost, client: redis.Redis,
                 name: str | None = None, on_fatal: Callable[[str], None] = exit_now,
                 registry: CollectorRegistry | None = None) -> None:
        """`segmenter`: the model host (worker/model/host.py `ModelHost.load`), or a segmenter made elsewhere
        (tests, plug-ins), whose host `ModelHost.of` tells."""
        self.settings = settings
        host = ModelHost.of(settings, segmenter)
        self.segmenter = segmenter = host.first
        self.client = client
        self.name = name or default_worker_name()
        self.stats = WorkerStats()
        self.shutdown = Shutdown(settings.grace_s)
        self.lane = LANES[segmenter.capability]  # the jobs stream of what its model can do
        self.health = Health(client, settings.keys, self.name, self.stats,
                             stale_s=max(10.0, 2 * worker_socket_timeout_s(settings) + 1.0), model=segmenter.name,
                             capabilities=(segmenter.capability,))
        self.metrics = WorkerMetrics(
            self.stats, model=segmenter.name, image_size=settings.image_size or DEFAULT_IMAGE_SIZE,
            device=segmenter.device, random_weights=segmenter.random_weights,
            gpu_memory=segmenter.gpu_memory_bytes if segmenter.device.startswith("cuda") else None, registry=registry)
        self._housekeeping = Housekeeping(client, self.keys, self.name, every_s=settings.housekeeping_s,
                                          lease_s=settings.lease_s, stats=self.stats)
        self.ctx = WorkerContext(settings=settings, client=client, scripts=Scripts(client), segmenter=segmenter,
                                 name=self.name, stats=self.stats, health=self.health, shutdown=self.shutdown,
                                 on_fatal=on_fatal, metrics=self.metrics, lane=self.lane)
        self._url = redact_url(settings.redis_url)
        self.host = host
        self.concurrency, why = pick_concurrency(settings, host)
        log.info("worker %s holds up to %d job(s) at once: %s; the model runs %s", self.name, self.concurrency,
                 why, host.form)
        self.models = host.slots(self.concurrency)
        self.slots = JobSlots([dataclasses.replace(self.ctx, segmenter=m) for m in self.models])
        self._refused: str | None = None  # why admission last refused a job for memory (logged when it changes)

    @property
    def keys(self) -> Keys:
        return self.settings.keys.for_lane(self.lane)

    @property
    def jobs_done(self) -> int:
        return self.stats.jobs_done

    @property
    def lease_ms(self) -> int:
        return int(self.settings.lease_s * 1000)

    @property
    def stopping(self) -> bool:
        """A shutdown was asked for: no more jobs are taken."""
        return self.shutdown.requested

    @stopping.setter
    def stopping(self, value: bool) -> None:
        """`stopping = True` (from any thread): take no more jobs, let the current one finish."""
        if value:
            self.shutdown.stop()

    def ready(self) -> tuple[bool, str]:
        """/readyz: the model loaded (a model process alive), Redis answering, and not shutting down."""
        if self.shutdown.requested:
            return False, "shutting down: taking no more jobs"
        if self.health.broken is not None:
            return False, f"broken: {self.health.broken}"
        ok, why = self.health.redis_ok()
        if not ok:
            return False, why
        return True, f"model {self.segmenter.name} loaded, {why}"

    def install_signal_handlers(self) -> None:
        self.shutdown.install()

    def housekeeping(self, *, force: bool = False) -> None:
        self._housekeeping.run(force=force)

    def hand_back(self, entry_id: str, job_id: str, lease: Lease | None = None, *, timeout_s: float | None = None) -> None:
        entry.hand_back(self.ctx, entry_id, job_id, lease, timeout_s=timeout_s)

    def _idle(self, fn: Callable[[], T], what: str) -> T:
        """`fn` on a thread that a shutdown request abandons (Stopped): see Shutdown.call."""
        with self.shutdown.idling():
            return self.shutdown.call(fn, what)

    def _connect(self) -> None:
        self.client.ping()
        ensure_group(self.client, self.keys)

    def wait_for_redis(self) -> None:
        """Until Redis answers and the consumer group exists (or is made): wait with backoff, saying where
        it tries; the worker is not ready (no health key) meanwhile. Returns early on a shutdown request."""
        backoff = Backoff(0.2, self.shutdown.sleep)
        tries = 0
        with self.shutdown.idling():
            while not self.shutdown.requested:
                tries += 1
                try:
                    self._idle(self._connect, "connect")
                    if tries > 1:
                        log.info("Redis at %s answers again (after %d tries)", self._url, tries)
                    return
                except Stopped:
                    return
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    log.warning("waiting for Redis at %s (try %d: %s); retrying in %.1f s", self._url, tries, e,
                                backoff.next_s)
                except redis.ResponseError as e:
                    if redis_fault(e, self.settings.redis_url) is None:
                        raise
                    log.warning("%s; retrying in %.1f s", redis_full_message(self.settings.redis_url), backoff.next_s)
                backoff.sleep()

    def _claim(self, *, burst: bool) -> Entry | None:
        """One claiming step: housekeeping, then an expired entry or a new one. An expired entry one of this
        worker's slots still holds (its lease ran out under a Redis outage) is not started twice."""
        self.housekeeping()
        claimed = claim_expired(self.client, self.keys, self.name, self.lease_ms)
        if claimed is not None and not self.slots.holds(claimed[0]):
            self.stats.reclaimed += 1
            return claimed
        block_ms = None if burst or self.slots.busy else self.settings.block_ms  # a busy worker comes back soon
        return read_new(self.client, self.keys, self.name, block_ms)

    def _admitted(self) -> bool:
        """A free slot and room on the device for one more session (worker/service/capacity.py); waits a
        little when not."""
        slots = self.slots
        if slots.free_slot() is None:
            slots.wait_for_change(0.5)
            return False
        why = refusal([m.gpu_budget() for m in self.models], slots.busy, slots.unopened())
        if why != self._refused:
            log.info("admission: %s", why or "room for another job again")
        self._refused = why
        if why:
            slots.wait_for_change(0.5)
        return why is None

    def run(self, *, burst: bool = False) -> int:
        """Process jobs until stopped (or, with burst, until none is left to claim). Returns jobs handled."""
        backoff = Backoff(0.1, self.shutdown.sleep)
        self.health.start()
        try:
            self.wait_for_redis()
            if not self.shutdown.requested:
                log.info("worker %s ready (model %s%s, %s jobs from %s, lease %.1f s, stall %.0f s)", self.name,
                         self.segmenter.name, ", RANDOM WEIGHTS" if self.segmenter.random_weights else "",
                         self.segmenter.capability, self.keys.jobs, self.settings.lease_s, self.settings.stall_s)
            while not self.shutdown.requested:
                if not self._admitted():
                    continue
                slot = self.slots.free_slot()
                assert slot is not None
                self.models[slot].ensure_started()  # a model process that died is restarted before a job is taken
                try:
                    claimed = self._idle(lambda: self._claim(burst=burst), "claim")
                    backoff.reset()
                    self.health.redis_answering = True
                except Stopped:
                    break
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    self.health.redis_answering = False
                    self.stats.redis_errors += 1
                    log.warning("Redis at %s unavailable (%s); retrying in %.1f s", self._url, e, backoff.next_s)
                    self._idle_sleep(backoff)
                    continue
                except redis.ResponseError as e:
                    if is_group_gone(e):  # stream or group gone (Redis restarted empty): recreate and go on
                        log.warning("consumer group missing (%s); recreating it", e)
                        self.wait_for_redis()
                        continue
                    if redis_fault(e, self.settings.redis_url) is None:
                        raise
                    self.stats.redis_errors += 1
                    log.warning("%s; retrying in %.1f s", redis_full_message(self.settings.redis_url), backoff.next_s)
                    self._idle_sleep(backoff)
                    continue
                if claimed is None:
                    if burst and not self.slots.busy:
                        log.info("nothing left to claim: burst mode exits after %d jobs", self.stats.jobs_done)
                        break
                    if self.slots.busy:
                        self.slots.wait_for_change(0.2 if burst else 0.05)
                    continue
                if self.shutdown.requested:  # read as the shutdown came: left pending, reclaimed after its lease
                    break
                self.slots.start(slot, *claimed)  # on this thread with one slot; else its own thread
                if self.slots.take_redis_failed():  # Redis failed under a job: back off before claiming again
                    self._idle_sleep(backoff)
            self._leave_slots()
        except BaseException as e:  # what it means: worker/service/outcomes.py
            outcome = outcome_of(e)
            if outcome is Outcome.FORCED_EXIT:
                self._leave_slots()
                log.warning("exiting at once")
            elif outcome is Outcome.BROKEN:
                self.shutdown.force()  # every other job held is handed back
                self._leave_slots(raise_trouble=False)
                self.health.mark_broken(str(e), min(2.0, self.settings.lease_s))
                raise
            else:
                raise
        finally:
            self.health.remove(min(0.5, self.settings.lease_s))
            for model in self.models[1:]:  # the model processes this worker started for its other slots
                model.close()
            log.info("worker %s exiting: %s; peak RSS %.0f MiB", self.name, self.stats, peak_rss_mib())
        return self.stats.jobs_done

    def _leave_slots(self, *, raise_trouble: bool = True) -> None:
        """Wait for every job held to finish or be handed back; then a slot's trouble is the worker's."""
        if self.slots.busy:
            log.info("waiting for %d job(s) held to finish or be handed back", self.slots.busy)
        self.slots.join()
        if self.slots.trouble is not None and raise_trouble:
            raise self.slots.trouble

    def _idle_sleep(self, backoff: Backoff) -> None:
        with self.shutdown.idling():
            backoff.sleep()

