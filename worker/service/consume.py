"""The worker loop: claim jobs from the consumer group, segment, publish, render, acknowledge.

Each job runs under a lease (worker/broker/lease.py) renewed by a heartbeat thread; every write is fenced by
it. The loop first takes over jobs whose lease expired (their worker died: XAUTOCLAIM), then reads
new ones. A job entry is acknowledged and deleted (vseg:jobs holds only jobs in flight) in the same
atomic step that writes its one terminal entry: completed, failed, cancelled or dead.

Failures: a message that does not decode is poison (vseg:dead at once). Permanent errors (bad input,
missing frames) fail the job at once. Transient errors (Redis gone longer than our patience, CUDA out
of memory, RetryableError) retry with exponential backoff. Each run counts as an attempt, including a
run whose worker crashed; past max_attempts the job goes to vseg:dead with its last error.

Signals: the first SIGTERM/SIGINT stops taking jobs and gives the current one grace_s to finish, then
hands it back (claimable at once, the attempt not counted; the attempt to hand back waits at most a
lease); a second one hands back and exits at once. An idle worker exits at once, whatever Redis does.

Infrastructure faults (README "Guarantees"): the worker waits for Redis at start and whenever it is
gone, with backoff, logging where it tries. A job whose lease cannot be renewed for a whole lease
(Redis refused or hung) stops writing until the lease's renewal says whether the job is still this
worker's (it resumes) or another's (it stops; worker/broker/lease.py). A job
with no progress for stall_s is abandoned by its lease (worker/broker/lease.py); if the job's thread does
not come back within a lease after that (a wedged model), the worker exits with EXIT_BROKEN. Redis
restarted empty: the job is logged as vanished, the group recreated, and the worker goes on. Redis
full or a full disk: retried with backoff (RetryableError), the job's input kept until its attempts
are spent. A broken worker (its lease thread died, its model process cannot be restarted) hands its
job back, marks its health key broken and exits non-zero.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar, cast

import msgpack
import redis

from runtime.cleanup import producer_finished, remove_frames
from runtime.faults import redact_url, redis_fault, redis_full_message
from runtime.limits import check_job_limits
from runtime.logs import EXIT_BROKEN
from runtime.settings import Settings
from schemas import messages
from schemas.errors import (
    InfrastructureError,
    PermanentError,
    RedisFull,
    RetryableError,
    SchemaError,
    VsegError,
    WorkerBroken,
)
from schemas.names import EVENTS_MAXLEN, TERMINAL_STATES, JobState, validate_job_id
from schemas.prompts import object_ids, validate_prompts
from schemas.storage import job_render_rel, resolve_inside
from worker.broker.lease import (
    HAND_BACK_LUA,
    JobStalled,
    JobVanished,
    Lease,
    LeaseLost,
    is_nogroup,
    vanished_message,
    wait_with_lease,
)
from worker.broker.publish import JobCancelled, ResultPublisher
from worker.model.segment import Segmenter
from worker.output.render import MaskVideoWriter, partial_path
from worker.output.sink import ResultSink
from worker.sources.frames import DirFrames, FrameSource, StreamedFrames

log = logging.getLogger(__name__)
T = TypeVar("T")

HEALTH_TTL_S = 30
STALL_NUDGE_S = 2.0  # a stalled job's thread not back by then: stop its model (kill a model process)


class HandBack(Exception):
    """Shutdown: give the current job back to the group for another worker."""


class ForcedExit(HandBack):
    """Second signal: hand back and exit now."""


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


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


class Backoff:
    """Exponential backoff for the main loop's waits on Redis: `next_s` doubles after each `sleep`, up to
    `cap_s`; `reset` when Redis answers again."""

    def __init__(self, first_s: float, cap_s: float = 5.0) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self.next_s = first_s

    def sleep(self) -> None:
        time.sleep(self.next_s)
        self.next_s = min(self.next_s * 2, self.cap_s)

    def reset(self) -> None:
        self.next_s = self.first_s


def exit_now(reason: str) -> None:
    """The worker is wedged (a thread that cannot be stopped): leave now, for the supervisor to restart it."""
    logging.shutdown()
    os._exit(EXIT_BROKEN)


def is_transient(error: BaseException) -> bool:
    if isinstance(error, (RetryableError, redis.ConnectionError, redis.TimeoutError)):
        return True
    try:
        import torch

        return isinstance(error, torch.cuda.OutOfMemoryError)
    except ImportError:  # pragma: no cover
        return False


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


class Worker:
    def __init__(self, *, settings: Settings, segmenter: Segmenter, client: redis.Redis, name: str | None = None,
                 on_fatal: Callable[[str], None] = exit_now) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.segmenter = segmenter
        self.client = client
        self.name = name or default_worker_name()
        self.stats = WorkerStats()
        self._health_at = 0.0
        self._housekeeping_at = 0.0
        self.stopping = False
        self.stop_deadline: float | None = None
        self.on_fatal = on_fatal  # called from a helper thread when the job's thread is wedged
        self.broken: str | None = None  # why this worker cannot go on, once it cannot
        self._idle = False  # waiting for work or for Redis, holding no job: a signal may end the wait at once
        self._redis_answering = True  # False once a bounded call on the way out found Redis not answering
        self._url = redact_url(settings.redis_url)

    @property
    def jobs_done(self) -> int:
        return self.stats.jobs_done

    @property
    def lease_ms(self) -> int:
        return int(self.settings.lease_s * 1000)

    # ---- signals ------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._idle:  # no job held: leave at once, even from a read that a hung Redis never answers
            self.stopping = True
            log.warning("%s: idle, exiting now", name)
            raise ForcedExit()
        if self.stopping:
            log.warning("second %s: handing back the current job and exiting now", name)
            raise ForcedExit()
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.settings.grace_s
        log.warning("%s: finishing the current job (up to %.0f s), then exiting", name, self.settings.grace_s)

    # ---- group, health, housekeeping ----------------------------------------------------------
    def ensure_group(self) -> None:
        """Create the consumer group (from the stream's start, so jobs queued before any worker count)."""
        try:
            self.client.xgroup_create(self.keys.jobs, self.keys.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.keys.group, self.keys.jobs)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def heartbeat(self, **status: Any) -> None:
        """Refresh this worker's health key (at most once a second)."""
        now = time.monotonic()
        if now - self._health_at < 1.0:
            return
        self._health_at = now
        try:
            self.client.set(self.keys.worker_health(self.name), self._health_value(**status), ex=HEALTH_TTL_S)
        except redis.RedisError:
            pass  # health is best effort (Redis gone or full); the lease is what matters

    def _health_value(self, **status: Any) -> str:
        return json.dumps({"worker": self.name, "host": socket.gethostname(), "at": time.time(),
                           "jobs_done": self.stats.jobs_done, **status})

    def _report_broken(self, reason: str) -> None:
        """Mark this worker broken in its health key (`python -m worker check` reports it), best effort."""
        self.broken = reason
        log.critical("worker %s is broken: %s; exiting so that its supervisor restarts it", self.name, reason)
        value = self._health_value(state="broken", reason=reason)
        call_bounded(lambda: self.client.set(self.keys.worker_health(self.name), value, ex=HEALTH_TTL_S),
                     min(2.0, self.settings.lease_s), "marking the health key broken")

    def housekeeping(self, *, force: bool = False) -> None:
        """Remove consumers of dead workers that hold nothing; trim the events log. Every lease_s."""
        now = time.monotonic()
        if not force and now - self._housekeeping_at < self.settings.lease_s:
            return
        self._housekeeping_at = now
        for c in self.client.xinfo_consumers(self.keys.jobs, self.keys.group):
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            if name != self.name and c["pending"] == 0 and c["idle"] > 3 * self.lease_ms:
                # XGROUP DELCONSUMER drops the consumer's pending entries: only ever when it holds none
                if self.client.xgroup_delconsumer(self.keys.jobs, self.keys.group, name) == 0:
                    self.stats.consumers_removed += 1
                    log.info("removed idle consumer %s (held nothing)", name)
        self.client.xtrim(self.keys.events, maxlen=EVENTS_MAXLEN, approximate=True)

    # ---- main loop ----------------------------------------------------------------------------
    def wait_for_redis(self) -> None:
        """Until Redis answers and the consumer group exists (or is made): wait with backoff, saying where
        it tries; the worker is not ready (no health key) meanwhile."""
        backoff = Backoff(0.2)
        tries = 0
        self._idle = True  # no job held: a signal ends the wait at once, even inside a call Redis never answers
        try:
            while not self.stopping:
                tries += 1
                try:
                    self.client.ping()
                    self.ensure_group()
                    if tries > 1:
                        log.info("Redis at %s answers again (after %d tries)", self._url, tries)
                    return
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    log.warning("waiting for Redis at %s (try %d: %s); retrying in %.1f s", self._url, tries, e,
                                backoff.next_s)
                except redis.ResponseError as e:
                    if redis_fault(e, self.settings.redis_url) is None:
                        raise
                    log.warning("%s; retrying in %.1f s", redis_full_message(self.settings.redis_url), backoff.next_s)
                backoff.sleep()
        finally:
            self._idle = False

    def run(self, *, burst: bool = False) -> int:
        """Process jobs until stopped (or, with burst, until none is left to claim). Returns jobs handled."""
        backoff = Backoff(0.1)
        try:
            self.wait_for_redis()
            log.info("worker %s ready (model %s%s, lease %.1f s, stall %.0f s)", self.name, self.segmenter.name,
                     ", RANDOM WEIGHTS" if self.segmenter.random_weights else "", self.settings.lease_s,
                     self.settings.stall_s)
            while not self.stopping:
                entry = None
                self.segmenter.ensure_started()  # a model process that died is restarted before a job is taken
                self._idle = True
                try:
                    self.heartbeat(state="idle")
                    self.housekeeping()
                    entry = self.claim_expired() or self.read_new(block=not burst)
                    backoff.reset()
                    self._redis_answering = True
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    self._redis_answering = False
                    log.warning("Redis at %s unavailable (%s); retrying in %.1f s", self._url, e, backoff.next_s)
                    backoff.sleep()
                    continue
                except redis.ResponseError as e:
                    if is_nogroup(e):  # stream or group gone (Redis restarted empty): recreate and go on
                        log.warning("consumer group missing (%s); recreating it", e)
                        self._idle = False
                        self.wait_for_redis()
                        continue
                    if redis_fault(e, self.settings.redis_url) is None:
                        raise
                    log.warning("%s; retrying in %.1f s", redis_full_message(self.settings.redis_url), backoff.next_s)
                    backoff.sleep()
                    continue
                finally:
                    self._idle = False
                if entry is None:
                    if burst:
                        log.info("nothing left to claim: burst mode exits after %d jobs", self.stats.jobs_done)
                        break
                    continue
                if self.handle(*entry) == "redis":  # Redis failed under the job: back off before the next try
                    self._idle = True
                    try:
                        backoff.sleep()
                    finally:
                        self._idle = False
        except ForcedExit:
            log.warning("exiting at once")
        except WorkerBroken as e:
            self._report_broken(str(e))
            raise
        finally:
            if self.broken is None and self._redis_answering:  # else the key expires by itself
                call_bounded(lambda: self.client.delete(self.keys.worker_health(self.name)),
                             min(0.5, self.settings.lease_s), "removing the health key")
            log.info("worker %s exiting: %s; peak RSS %.0f MiB", self.name, self.stats, peak_rss_mib())
        return self.stats.jobs_done

    def claim_expired(self) -> tuple[str, dict[Any, Any]] | None:
        """Take over one job whose lease expired (its worker stopped renewing)."""
        _cursor, claimed, *_ = self.client.xautoclaim(
            self.keys.jobs, self.keys.group, self.name, min_idle_time=self.lease_ms, start_id="0-0", count=1
        )
        for entry_id, fields in claimed:
            entry = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            if not fields:  # deleted while pending: nothing to do but acknowledge
                self.client.xack(self.keys.jobs, self.keys.group, entry)
                continue
            self.stats.reclaimed += 1
            log.warning("reclaimed job entry %s: its lease expired", entry)
            return entry, fields
        return None

    def read_new(self, *, block: bool) -> tuple[str, dict[Any, Any]] | None:
        reply = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]],
                     self.client.xreadgroup(self.keys.group, self.name, {self.keys.jobs: ">"}, count=1,
                                            block=self.settings.block_ms if block else None))
        if not reply or not reply[0][1]:
            return None
        entry_id, fields = reply[0][1][0]
        return (entry_id.decode() if isinstance(entry_id, bytes) else entry_id), fields

    # ---- one entry ----------------------------------------------------------------------------
    def handle(self, entry_id: str, fields: dict[Any, Any]) -> str:
        """Process one entry of the jobs stream, whatever it holds; leaves the worker running unless it is
        broken or told to exit. Returns "redis" when Redis failed under the job (it stays pending), else "ok"."""
        job_id = _job_id_of(fields) or entry_id
        try:
            self._handle(entry_id, fields)
        except JobVanished as e:
            self.stats.jobs_vanished += 1
            log.error("%s", e)
            return "redis"
        except (redis.RedisError, InfrastructureError) as e:
            if isinstance(e, redis.ResponseError) and is_nogroup(e):
                self.stats.jobs_vanished += 1
                log.error("%s", vanished_message(job_id, self.keys))
                return "redis"
            fault = redis_fault(e, self.settings.redis_url)
            if fault is None:  # a Redis reply we do not expect: say so, keep the job pending, keep serving
                log.exception("job %s: unexpected Redis error; the job stays pending and is retried", job_id)
                return "redis"
            self.stats.redis_faults += 1
            log.warning("job %s: %s; this attempt stops here and the job stays pending: it is taken again once "
                        "Redis can take it", job_id, fault)
            return "redis"
        return "ok"

    def _handle(self, entry_id: str, fields: dict[Any, Any]) -> None:
        try:
            msg = messages.decode(fields)
            if not isinstance(msg, messages.JobMessage):
                raise SchemaError(f"expected a job entry on {self.keys.jobs}, got a {msg.TYPE.value} entry")
        except SchemaError as e:
            self.dead_letter(entry_id, fields, e, job_id=_job_id_of(fields), num_frames=_num_frames_of(fields))
            return
        left = threading.Event()  # set once this job's thread has left the job
        lease = Lease(self.client, self.keys, entry_id, self.name, self.settings.lease_s, stall_s=self.settings.stall_s,
                      job=msg.job_id, on_stall=lambda reason: self._on_stall(reason, left))
        pub = ResultPublisher(self.client, self.keys, msg.job_id, msg.num_frames, lease,
                              redis_url=self.settings.redis_url)
        pub.interrupt = self._check_deadline  # a write waiting out Redis still hands back at the deadline
        with lease:
            try:
                self._run_with_retries(msg, entry_id, fields, pub)
            except JobVanished:
                raise
            except LeaseLost as e:
                if isinstance(e, JobStalled):
                    self.stats.jobs_abandoned += 1
                self.stats.leases_lost += 1
                log.warning("job %s: %s; stopping without writing anything more", msg.job_id, e)
            except ForcedExit:
                lease.stop(join_s=0.5)  # no renewal may land after the hand-back (it would hide the job a lease)
                self.hand_back(entry_id, msg.job_id, lease, timeout_s=min(2.0, self.settings.lease_s))
                raise
            except HandBack:
                lease.stop(join_s=0.5)
                self.hand_back(entry_id, msg.job_id, lease)
            except WorkerBroken:
                lease.stop(join_s=0.5)
                self.hand_back(entry_id, msg.job_id, lease)
                raise
            finally:
                left.set()
                self.stats.duplicates_rejected += pub.duplicates_rejected

    def _on_stall(self, reason: str, left: threading.Event) -> None:
        """Called by a stalled job's lease thread once it has abandoned the job. The job's thread learns it
        at its next check and normally leaves within a step; if it has not within STALL_NUDGE_S, the
        model is stopped (a model process is killed, so the thread comes back at once); if it still has
        not come back a lease later, it is wedged: this worker cannot serve again and exits."""
        wait_s = max(self.settings.lease_s, 2.0)

        def watch() -> None:
            if left.wait(STALL_NUDGE_S):
                return
            self.segmenter.interrupt(reason)
            if left.wait(wait_s):
                return
            why = (f"the job's thread did not come back {wait_s:g} s after its job was abandoned ({reason}); the "
                   f"model is wedged")
            self._report_broken(why)
            call_bounded(self.segmenter.close, 5.0, "closing the model process")
            self.on_fatal(why)

        threading.Thread(target=watch, daemon=True, name="stall-watch").start()

    def _run_with_retries(self, job: messages.JobMessage, entry_id: str, fields: dict[Any, Any],
                          pub: ResultPublisher) -> None:
        while True:
            state = {k.decode(): v.decode()
                     for k, v in cast(dict[bytes, bytes], self.client.hgetall(self.keys.job(job.job_id))).items()}
            if state.get("state") in TERMINAL_STATES:  # finished, but its entry was left behind
                log.info("job %s is already %s; dropping its entry", job.job_id, state["state"])
                self.client.xack(self.keys.jobs, self.keys.group, entry_id)
                self.client.xdel(self.keys.jobs, entry_id)
                return
            if state.get("cancel") == "1":
                self._finish(pub, messages.Cancelled(job.job_id, int(state.get("frames_done", 0))), JobState.CANCELLED)
                return
            attempt = int(self.client.hincrby(self.keys.job(job.job_id), "attempt", 1))
            if attempt > self.settings.max_attempts:
                error = state.get("error", "the worker died while running it")
                self.dead_letter(entry_id, fields, RuntimeError(error), job_id=job.job_id,
                                 num_frames=job.num_frames, attempts=attempt - 1, pub=pub)
                return
            try:
                self.run_job(job, pub, attempt)
                return
            except (LeaseLost, HandBack, JobCancelled, WorkerBroken):
                raise
            except Exception as e:
                if not is_transient(e):
                    raise
                if isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
                    raise  # Redis itself is gone: the job stays pending (handle), taken again when it is back
                self._note_retry(pub, e)
                wait_s = self.settings.retry_backoff_s * 2 ** (attempt - 1)
                log.warning("job %s attempt %d: transient %s: %s; retrying in %.1f s", job.job_id, attempt,
                            type(e).__name__, e, wait_s)
                wait_with_lease(wait_s, pub.lease)

    @staticmethod
    def _note_retry(pub: ResultPublisher, error: BaseException) -> None:
        """Record the error in the job's state, best effort: with Redis full the record itself is refused, and
        the retry must not wait on it."""
        try:
            pub.set_state(error=f"{type(error).__name__}: {error}", state=JobState.RETRYING.value, best_effort=True)
        except (redis.RedisError, RedisFull) as e:
            log.warning("job %s: could not record the error (%s)", pub.job_id, e)

    def _finish(self, pub: ResultPublisher, msg: messages.Terminal, outcome: JobState, error: str = "") -> None:
        pub.terminal(msg, ttl_s=self.settings.results_ttl_s, error=error)
        self.stats.jobs_done += 1
        self.stats.outcomes[outcome.value] = self.stats.outcomes.get(outcome.value, 0) + 1
        self._release_frames(msg.job_id)

    def _release_frames(self, job_id: str) -> None:
        """After the job's terminal state: its frames stream expires with its results, and its frames go if
        the producer has finished too; otherwise the producer removes them when it does (runtime/cleanup.py)."""
        try:
            self.client.expire(self.keys.frames(job_id), self.settings.results_ttl_s)
            if producer_finished(self.client, self.settings, job_id):
                remove_frames(self.settings, job_id)
        except (redis.RedisError, VsegError, OSError) as e:  # disk space, not correctness: log and go on
            log.warning("could not remove the frames of job %s (%s)", job_id, e)

    def hand_back(self, entry_id: str, job_id: str, lease: Lease | None = None, *, timeout_s: float | None = None) -> None:
        """Give the job back: claimable by another worker at once, the attempt not counted. One try, waiting
        at most a lease (or `timeout_s`); with the lease lost or presumed lost (Redis unreachable) there is
        nothing to hand back: the job stays pending and is reclaimed after its lease."""
        if lease is not None and not lease.writable():
            log.warning("job %s not handed back: its lease is lost or presumed lost (%s); it is reclaimed after its "
                        "lease", job_id, lease.reason or "Redis not answering")
            self._redis_answering = lease.lost.is_set()
            return
        wait_s = self.settings.lease_s if timeout_s is None else timeout_s
        if lease is not None:  # past the lease's end the job is not ours to hand back
            wait_s = min(wait_s, max(0.1, lease.remaining_s()))
        done = call_bounded(
            lambda: self.client.eval(HAND_BACK_LUA, 2, self.keys.jobs, self.keys.job(job_id), self.keys.group, entry_id,
                                     self.name, 10 * self.lease_ms, JobState.QUEUED.value),
            wait_s, f"handing job {job_id} back")
        if done == 1:
            self.stats.handed_back += 1
            log.warning("job %s handed back to the group", job_id)
        else:
            self._redis_answering = False
            log.error("could not hand job %s back; it is reclaimed after its lease expires", job_id)

    def dead_letter(self, entry_id: str, fields: dict[Any, Any], error: BaseException, *, job_id: str | None,
                    num_frames: int, attempts: int = 0, pub: ResultPublisher | None = None) -> None:
        """Move a message to vseg:dead with the reason; give its job (if it names one) a `dead` entry."""
        log.error("dead-lettering entry %s of %s%s: %s", entry_id, self.keys.jobs,
                  f" (job {job_id}, {attempts} attempts)" if job_id else "", error)
        dead: dict[Any, Any] = dict(fields)
        dead.update({"error": str(error), "error_type": type(error).__name__, "source_stream": self.keys.jobs,
                     "source_id": entry_id, "attempts": str(attempts), "worker": self.name, "at": str(time.time())})
        self.client.xadd(self.keys.dead, dead)
        self.stats.dead_lettered += 1
        if job_id is None:
            self.client.xack(self.keys.jobs, self.keys.group, entry_id)
            self.client.xdel(self.keys.jobs, entry_id)
            return
        if pub is None:
            with Lease(self.client, self.keys, entry_id, self.name, self.settings.lease_s,
                       stall_s=self.settings.stall_s, job=job_id) as lease:
                pub = ResultPublisher(self.client, self.keys, job_id, num_frames, lease,
                                      redis_url=self.settings.redis_url)
                self._finish(pub, messages.Dead(job_id, str(error), attempts), JobState.DEAD, error=str(error))
        else:
            self._finish(pub, messages.Dead(job_id, str(error), attempts), JobState.DEAD, error=str(error))

    # ---- one job ------------------------------------------------------------------------------
    def run_job(self, job: messages.JobMessage, pub: ResultPublisher, attempt: int) -> None:
        """Segment, publish and render one job, ending in its terminal entry (or raising to retry)."""
        t0 = time.monotonic()
        log.info("job %s attempt %d: %d frames %dx%d, %d prompts", job.job_id, attempt, job.num_frames,
                 job.width, job.height, len(job.prompts))
        writer: MaskVideoWriter | None = None
        pub.lease.progress()
        job_check = lambda: self._check_stop(pub)  # noqa: E731 - the frames' and the sink's view of the job
        try:
            check_job_limits(job.num_frames, job.width, job.height, job.prompts, self.settings)
            frames_dir = resolve_inside(self.settings.storage_root, job.frames_dir)
            frames: FrameSource
            if job.frames_stream:
                frames = StreamedFrames(self.client, self.keys.frames(job.job_id), frames_dir,
                                        block_ms=self.settings.block_ms, stall_s=self.settings.stall_s,
                                        producer_key=self.keys.producer(job.job_id),
                                        producer_ttl_s=job.producer_ttl_s, check=job_check)
                validate_prompts(job.prompts, width=job.width, height=job.height, num_frames=10**9)
            else:
                frames = DirFrames(frames_dir, job.num_frames, check=job_check)
                validate_prompts(job.prompts, width=job.width, height=job.height, num_frames=job.num_frames)
            pub.started(messages.Started(
                job_id=job.job_id, worker=self.name, num_frames=job.num_frames, obj_ids=tuple(object_ids(job.prompts)),
                model=self.segmenter.name, attempt=attempt, random_weights=self.segmenter.random_weights,
            ))
            render_target = resolve_inside(self.settings.storage_root, job_render_rel(job.job_id))
            self._remove_stale_partials(render_target, job.job_id)
            render_rel = job_render_rel(job.job_id) if job.render else ""
            if job.render:
                writer = MaskVideoWriter(render_target,
                                         fps=job.fps, width=job.width, height=job.height,
                                         preset=self._render_preset(), threads=self._render_threads(),
                                         partial_tag=self.name, storage_root=self.settings.storage_root)
            timings, num_frames = self._propagate(job, frames, pub, writer, t0, job_check)
            pub.lease.check()
            pub.lease.progress()
            t_render = time.monotonic()
            if writer is not None:
                writer.close()
            writer = None
            timings["render_close_s"] = time.monotonic() - t_render
            timings["total_s"] = time.monotonic() - t0
            self._finish(pub, messages.Completed(
                job_id=job.job_id, render_path=render_rel, num_frames=num_frames,
                num_objects=len(object_ids(job.prompts)), timings_s={k: round(v, 4) for k, v in timings.items()},
                random_weights=self.segmenter.random_weights,
            ), JobState.COMPLETED)
            log.info("job %s completed in %.1f s (%.2f frames/s)", job.job_id, timings["total_s"],
                     num_frames / max(timings["total_s"], 1e-9))
        except JobCancelled:
            if writer is not None:
                writer.abort()
            log.warning("job %s cancelled", job.job_id)
            frames_done = int(self.client.hget(self.keys.job(job.job_id), "frames_done") or 0)
            self._finish(pub, messages.Cancelled(job.job_id, frames_done), JobState.CANCELLED)
        except (LeaseLost, HandBack, WorkerBroken):
            if writer is not None:
                writer.abort()
            raise
        except Exception as e:
            if writer is not None:
                writer.abort()
            if is_transient(e) and not isinstance(e, PermanentError):
                raise
            level = logging.WARNING if isinstance(e, VsegError) else logging.ERROR
            log.log(level, "job %s failed: %s: %s", job.job_id, type(e).__name__, e, exc_info=level == logging.ERROR)
            self._finish(pub, messages.Failed(job.job_id, str(e), type(e).__name__), JobState.FAILED,
                         error=f"{type(e).__name__}: {e}")

    def _remove_stale_partials(self, target: Path, job_id: str) -> None:
        """Delete half-written MP4s that earlier owners of this job left behind (a worker killed with
        -9 cannot clean up). This worker owns the job now; a frozen earlier owner that wakes up finds
        its lease gone before it could rename its file into place."""
        for stale in target.parent.glob(f".{target.name}.*.partial"):
            if stale != partial_path(target, self.name):
                log.info("removing %s, left by an earlier run of job %s", stale.name, job_id)
                stale.unlink(missing_ok=True)

    def _model_on_cuda(self) -> bool:
        return self.segmenter.device.startswith("cuda")

    def _render_preset(self) -> str:
        """x264 preset: as set, or (auto) `ultrafast` while the model runs on the CPU, where every core
        the encoder takes is taken from the model (half the encoding CPU of `superfast`, a larger
        file), else `superfast`."""
        if self.settings.render_preset != "auto":
            return self.settings.render_preset
        return "superfast" if self._model_on_cuda() else "ultrafast"

    def _render_threads(self) -> int:
        """x264 threads: as set, or one while the model runs on the CPU (x264's own choice, a thread per
        core and more, would preempt the model's OpenMP threads and stall them), else x264's choice."""
        if self.settings.render_threads:
            return self.settings.render_threads
        return 0 if self._model_on_cuda() else 1

    def _check_deadline(self) -> None:
        if self.stop_deadline is not None and time.monotonic() > self.stop_deadline:
            raise HandBack()

    def _check_stop(self, pub: ResultPublisher) -> None:
        pub.lease.check()
        if pub.cancel_requested:
            raise JobCancelled()
        self._check_deadline()

    def _propagate(
        self, job: messages.JobMessage, frames: FrameSource, pub: ResultPublisher, writer: MaskVideoWriter | None,
        t0: float, job_check: Callable[[], None]
    ) -> tuple[dict[str, float], int]:
        """Run the model on this thread; publishing and rendering happen in the sink's thread. Every frame
        the model yields and every frame the sink publishes is the job's progress (its lease's renewal)."""

        def published(n: int) -> None:
            pub.lease.progress()
            self.heartbeat(state="busy", job_id=job.job_id, frames_done=n)

        sink = ResultSink(pub, writer, frames, random_weights=self.segmenter.random_weights,
                          progress_every=self.settings.progress_every, on_frame=published, check=job_check)
        expected = 0
        segment_s = 0.0
        try:
            t_seg = time.monotonic()
            for out in self.segmenter.segment(frames, job.prompts, width=job.width, height=job.height):
                segment_s += time.monotonic() - t_seg
                pub.lease.progress()
                job_check()
                if out.frame_idx != expected:
                    raise VsegError(f"segmenter yielded frame {out.frame_idx}, expected {expected}")
                sink.put(out)
                expected += 1
                t_seg = time.monotonic()
            sink.close()
        except (LeaseLost, HandBack, JobCancelled, WorkerBroken):
            sink.abort()  # nothing more may be written
            raise
        except BaseException:
            try:
                sink.close()  # publish what the model produced before it failed
            except Exception:
                sink.abort()
            raise
        job_check()
        total = frames.total if frames.total is not None else expected
        if expected != total:
            raise VsegError(f"segmenter stopped after {expected} of {total} frames")
        timings = {
            "first_result_s": (sink.first_result_at or time.monotonic()) - t0,
            "segment_s": segment_s,
            "publish_s": sink.publish_s,
            "render_s": sink.render_s,
        }
        return timings, total


def _raw_data(fields: dict[Any, Any]) -> dict[Any, Any] | None:
    raw = fields.get(b"data", fields.get("data"))
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=False) if isinstance(raw, bytes) else None
    except Exception:
        return None
    return data if isinstance(data, dict) else None


def _job_id_of(fields: dict[Any, Any]) -> str | None:
    data = _raw_data(fields)
    try:
        return validate_job_id(data["job_id"]) if data else None
    except (KeyError, VsegError):
        return None


def _num_frames_of(fields: dict[Any, Any]) -> int:
    data = _raw_data(fields) or {}
    n = data.get("num_frames")
    return n if isinstance(n, int) and n > 0 else 0
