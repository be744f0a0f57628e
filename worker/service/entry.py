"""One entry of the jobs stream, from its decoding to its end, whatever it holds.

Decoded and validated once, here: an entry that does not decode is poison (vseg:dead at once); a job
that fails validation (worker/service/job.py) is `failed` without running; a valid one runs under a
lease (worker/broker/lease.py) with its attempts counted (worker/broker/attempts.py): a transient
error retries it with backoff, past max_attempts it is dead-lettered with its last error.

How an entry's handling stops: a lost lease (nothing more is written; a stalled one is abandoned to
the group), a shutdown (HandBack: the job is handed back, claimable at once, its attempt not counted;
ForcedExit: the same, waiting at most two seconds, then the worker exits), a broken worker (handed
back, then the worker exits), or Redis failing under it (the entry stays pending and is taken again
once Redis can take it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import redis

from runtime.faults import redis_fault
from runtime.logs import ContextThread, job_log_context
from schemas import messages
from schemas.errors import InfrastructureError, SchemaError
from schemas.names import JobState
from worker.broker.attempts import count_attempt, note_retry, read_record, retry_delay_s
from worker.broker.claim import drop_ended, drop_entry, take
from worker.broker.claim import hand_back as hand_back_entry
from worker.broker.dead_letter import add_dead_entry, peek
from worker.broker.lease import (
    JobStalled,
    JobVanished,
    Lease,
    is_nogroup,
    vanished_message,
    wait_with_lease,
)
from worker.broker.publish import ResultPublisher
from worker.broker.redis_client import call_bounded
from worker.service.context import WorkerContext
from worker.service.job import ValidJob, validate_job
from worker.service.outcomes import Outcome, outcome_of
from worker.service.runner import JobRunner

log = logging.getLogger(__name__)

STALL_NUDGE_S = 2.0  # a stalled job's thread not back by then: stop its model (kill a model process)


def handle(ctx: WorkerContext, entry_id: str, fields: dict[Any, Any]) -> str:
    """Process one entry; leaves the worker running unless it is broken or told to exit. Returns "redis"
    when Redis failed under the job (it stays pending), else "ok"."""
    seen = peek(fields)
    taken: list[bool] = []  # the job hash's fence (worker/broker/claim.py take); False: nothing to run
    status = _guarded(ctx, seen.job_id or entry_id, lambda: taken.append(take(
        ctx.client, ctx.scripts, ctx.keys, entry_id, seen.job_id, ctx.name, int(ctx.settings.lease_s * 1000))))
    if status != "ok" or not taken[0]:
        return status
    msg = _decode(ctx, fields)
    if isinstance(msg, SchemaError):
        error = msg
        return _guarded(ctx, seen.job_id or entry_id, lambda: dead_letter(
            ctx, entry_id, fields, error, job_id=seen.job_id, num_frames=seen.num_frames))
    job = msg
    with job_log_context(job_id=job.job_id):  # every record about the job, from its threads too, names it
        return _guarded(ctx, job.job_id, lambda: JobEntry(ctx, entry_id, fields, job).run())


def _decode(ctx: WorkerContext, fields: dict[Any, Any]) -> messages.JobMessage | SchemaError:
    """The entry's job message, or why it is poison."""
    try:
        msg = messages.decode(fields)
    except SchemaError as e:
        return e
    if not isinstance(msg, messages.JobMessage):
        return SchemaError(f"expected a job entry on {ctx.keys.jobs}, got a {msg.TYPE.value} entry")
    return msg


def _guarded(ctx: WorkerContext, job_id: str, run: Callable[[], None]) -> str:
    """Run `run` (one entry's handling), turning Redis failing under it into "redis" (see `handle`)."""
    try:
        run()
    except JobVanished as e:
        ctx.stats.jobs_vanished += 1
        log.error("%s", e)
        return "redis"
    except (redis.RedisError, InfrastructureError) as e:
        if isinstance(e, redis.ResponseError) and is_nogroup(e):
            ctx.stats.jobs_vanished += 1
            log.error("%s", vanished_message(job_id, ctx.keys))
            return "redis"
        fault = redis_fault(e, ctx.settings.redis_url)
        if fault is None:  # a Redis reply we do not expect: say so, keep the job pending, keep serving
            log.exception("job %s: unexpected Redis error; the job stays pending and is retried", job_id)
            return "redis"
        ctx.stats.redis_faults += 1
        log.warning("job %s: %s; this attempt stops here and the job stays pending: it is taken again once "
                    "Redis can take it", job_id, fault)
        return "redis"
    return "ok"


class JobEntry:
    """A decoded job entry and everything about it: its validated job (or why it is invalid), its lease,
    its publisher, and whether its thread has left it (for the stall watch)."""

    def __init__(self, ctx: WorkerContext, entry_id: str, fields: dict[Any, Any], msg: messages.JobMessage) -> None:
        self.ctx = ctx
        self.entry_id = entry_id
        self.fields = fields
        self.msg = msg
        self.job: ValidJob | None = None
        self.invalid: Exception | None = None  # why the job cannot run: it ends `failed`, never retried
        try:
            self.job = validate_job(msg, ctx.settings, ctx.segmenter.capability)
        except Exception as e:  # noqa: BLE001 - a PermanentError saying what is wrong, or a bug (logged in full)
            self.invalid = e
        self.left = threading.Event()  # set once this job's thread has left the job
        self.lease = ctx.lease(entry_id, msg.job_id, on_stall=self._on_stall)
        self.pub = ctx.publisher(msg.job_id, msg.num_frames, self.lease)

    def run(self) -> None:
        ctx, lease, job_id = self.ctx, self.lease, self.msg.job_id
        with lease:
            try:
                self._attempts()
            except BaseException as e:  # what it means is worker/service/outcomes.py's; the lease is acted on here
                outcome = outcome_of(e)
                if outcome is Outcome.LEASE_LOST:
                    if isinstance(e, JobStalled):
                        ctx.stats.jobs_abandoned += 1
                    ctx.stats.leases_lost += 1
                    log.warning("job %s: %s; stopping without writing anything more", job_id, e)
                    return
                if outcome in (Outcome.FORCED_EXIT, Outcome.HAND_BACK, Outcome.BROKEN):
                    lease.stop(join_s=0.5)  # no renewal may land after the hand-back (it would hide the job a lease)
                    forced = outcome is Outcome.FORCED_EXIT
                    hand_back(ctx, self.entry_id, job_id, lease,
                              timeout_s=min(2.0, ctx.settings.lease_s) if forced else None)
                    if outcome is Outcome.HAND_BACK:
                        return
                raise
            finally:
                self.left.set()
                ctx.stats.duplicates_rejected += self.pub.duplicates_rejected

    def _attempts(self) -> None:
        ctx, pub, job_id = self.ctx, self.pub, self.msg.job_id
        while True:
            record = read_record(ctx.client, ctx.keys, job_id)
            if record.finished:  # finished, but its entry was left behind
                log.info("job %s is already %s; dropping its entry", job_id, record.state)
                drop_ended(ctx.client, ctx.keys, self.entry_id, job_id)
                return
            if record.cancel:
                ctx.finish(pub, messages.Cancelled(job_id, record.frames_done), JobState.CANCELLED)
                return
            attempt = count_attempt(ctx.client, ctx.keys, job_id)
            if attempt > ctx.settings.max_attempts:
                error = RuntimeError(record.error or "the worker died while running it")
                dead_letter(ctx, self.entry_id, self.fields, error, job_id=job_id, num_frames=self.msg.num_frames,
                            attempts=attempt - 1, pub=pub)
                return
            if self.job is None:
                assert self.invalid is not None
                ctx.fail(pub, job_id, self.invalid)
                return
            try:
                with job_log_context(attempt=attempt):
                    JobRunner(ctx, self.job, pub, attempt).run()
                return
            except Exception as e:
                if outcome_of(e) is not Outcome.RETRY:  # Redis gone: the job stays pending (handle)
                    raise
                note_retry(pub, e)
                wait_s = retry_delay_s(ctx.settings.retry_backoff_s, attempt)
                log.warning("job %s attempt %d: transient %s: %s; retrying in %.1f s", job_id, attempt,
                            type(e).__name__, e, wait_s)
                wait_with_lease(wait_s, pub.lease, check=ctx.shutdown.check)

    def _on_stall(self, reason: str) -> None:
        """Called by a stalled job's lease thread once it has abandoned the job. The job's thread learns it
        at its next check and normally leaves within a step; if it has not within STALL_NUDGE_S, the
        model is stopped (a model process is killed, so the thread comes back at once); if it still has
        not come back a lease later, it is wedged: this worker cannot serve again and exits, after handing
        back the other jobs it holds (their sessions wait for turns on the wedged model, and leave at their
        next check: worker/model/turns.py)."""
        ctx = self.ctx
        wait_s = max(ctx.settings.lease_s, 2.0)

        def watch() -> None:
            if self.left.wait(STALL_NUDGE_S):
                return
            ctx.segmenter.interrupt(reason)
            if self.left.wait(wait_s):
                return
            why = (f"the job's thread did not come back {wait_s:g} s after its job was abandoned ({reason}); the "
                   f"model is wedged")
            ctx.health.mark_broken(why, min(2.0, ctx.settings.lease_s))
            others = ctx.shutdown.held - 1
            if others > 0:  # jobs beside it (concurrency > 1) are handed back first, not left to their leases
                log.error("%s; handing back the %d other job(s) held before exiting", why, others)
                ctx.shutdown.force()
                if not ctx.shutdown.wait_held(1, wait_s):
                    log.error("%d job(s) were not handed back within %g s: they are taken again after their "
                              "leases", ctx.shutdown.held - 1, wait_s)
            call_bounded(ctx.segmenter.close, 5.0, "closing the model process")
            ctx.on_fatal(why)

        ContextThread(target=watch, daemon=True, name="stall-watch").start()


def hand_back(ctx: WorkerContext, entry_id: str, job_id: str, lease: Lease | None = None, *,
              timeout_s: float | None = None) -> None:
    """Give the job back (worker/broker/claim.py), waiting at most a lease (or `timeout_s`)."""
    wait_s = ctx.settings.lease_s if timeout_s is None else timeout_s
    if hand_back_entry(ctx.scripts, ctx.keys, entry_id, job_id, ctx.name, lease_s=ctx.settings.lease_s, lease=lease,
                       timeout_s=wait_s):
        ctx.stats.handed_back += 1
    else:  # a lease known lost means Redis answered; otherwise it is presumed not to
        ctx.health.redis_answering = lease is not None and lease.lost.is_set()


def dead_letter(ctx: WorkerContext, entry_id: str, fields: dict[Any, Any], error: BaseException, *,
                job_id: str | None, num_frames: int, attempts: int = 0, pub: ResultPublisher | None = None) -> None:
    """Move an entry to vseg:dead with the reason; give its job (if it names one) a `dead` terminal entry,
    under `pub`'s lease, or a lease of its own."""
    log.error("dead-lettering entry %s of %s%s: %s", entry_id, ctx.keys.jobs,
              f" (job {job_id}, {attempts} attempts)" if job_id else "", error)
    add_dead_entry(ctx.client, ctx.keys, entry_id, fields, error, attempts=attempts, worker=ctx.name)
    ctx.stats.dead_lettered += 1
    if job_id is None:
        drop_entry(ctx.client, ctx.keys, entry_id)
        return
    dead = messages.Dead(job_id, str(error), attempts)
    if pub is not None:
        ctx.finish(pub, dead, JobState.DEAD, error=str(error))
        return
    with ctx.lease(entry_id, job_id) as lease:
        ctx.finish(ctx.publisher(job_id, num_frames, lease, interruptible=False), dead, JobState.DEAD, error=str(error))
