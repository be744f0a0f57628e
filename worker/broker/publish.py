"""Writing a job's results: frame entries with ids derived from the frame index, lifecycle events,
state. Every write is fenced by the worker's lease (worker/broker/lease.py): once the lease is lost,
nothing this worker writes lands (the fencing scripts, run by EVALSHA, are in worker/broker/scripts.py).

Infrastructure faults while writing (`retry_redis`): a refused or hung Redis is retried with backoff
for as long as the lease may still be ours; past that the lease is suspended (presumed lost) and
nothing is sent until the heartbeat's renewal confirms the job is still ours (the write goes on) or
finds it lost (LeaseLost); a full Redis (maxmemory, noeviction: the lease still renews) is retried for up to
`stall_s`, the job counting as progressing meanwhile, then RedisFull fails the attempt (retried with
backoff); Redis without the jobs stream or group (restarted empty) is JobVanished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import numpy as np
import redis

from runtime.faults import is_redis_full, redis_full_message
from schemas import messages
from schemas.errors import RedisFull
from schemas.names import EVENTS_MAXLEN, STARTED_ENTRY_ID, TERMINAL_ENTRY_ID, JobState, Keys, frame_entry_id
from schemas.rle import encode_mask, mask_bbox_xyxy
from worker.broker.lease import JobVanished, Lease, is_nogroup, vanished_message
from worker.broker.scripts import run_pipeline
from worker.model.segment import FrameMasks

log = logging.getLogger(__name__)
T = TypeVar("T")
LOG_EVERY_S = 5.0

TERMINAL_STATE = {
    messages.Completed: JobState.COMPLETED,
    messages.Failed: JobState.FAILED,
    messages.Cancelled: JobState.CANCELLED,
    messages.Dead: JobState.DEAD,
}


def object_result(obj_id: int, mask: np.ndarray, score: float, label: str = "",
                  label_score: float | None = None) -> messages.ObjectResult:
    """One object's RLE mask, box, area and score (pure)."""
    dense = np.asarray(mask, dtype=bool)
    return messages.ObjectResult(obj_id=int(obj_id), mask=encode_mask(dense), bbox_xyxy=mask_bbox_xyxy(dense),
                                 area=int(np.count_nonzero(dense)), score=float(score), label=label,
                                 label_score=None if label_score is None else round(float(label_score), 4))


def frame_result(job_id: str, out: FrameMasks, *, random_weights: bool) -> messages.FrameResult:
    """RLE-encode every object's mask on one frame (pure)."""
    labels = out.labels or {}
    objects = [object_result(obj_id, mask, score, *labels.get(int(obj_id), ("", None)))
               for obj_id, mask, score in zip(out.obj_ids, out.masks, out.scores)]
    return messages.FrameResult(job_id=job_id, frame_idx=out.frame_idx, objects=tuple(objects), random_weights=random_weights)


def _flat(fields: dict[str, bytes]) -> list[Any]:
    return [x for kv in fields.items() for x in kv]


class JobCancelled(Exception):
    """The job's cancel flag was set: stop and write the cancelled terminal entry."""


def no_interrupt() -> None:
    return None


def retry_redis(fn: Callable[[], T], *, lease: Lease, what: str, redis_url: str = "",
                full_patience_s: float | None = None, patience_s: float | None = None,
                interrupt: Callable[[], None] = no_interrupt) -> T:
    """Run `fn` (a fenced write), waiting out infrastructure faults (see the module doc): connection
    errors are retried while the lease may still be ours, then the write waits for the lease to be
    confirmed again or lost; Redis full is retried for up to `full_patience_s` (default: the lease's
    stall_s), then RedisFull. `patience_s` (if given) bounds the waiting for Redis to answer.
    Every try first checks the lease and runs `interrupt` (a shutdown deadline, an aborted sink), so
    nothing is sent once the lease is lost, and a waiting write can always be stopped."""
    started = time.monotonic()
    full_since: float | None = None
    full_patience = lease.stall_s if full_patience_s is None else full_patience_s
    backoff_s = 0.05
    logged_at = -1e9  # one warning every LOG_EVERY_S while a fault lasts
    while True:
        lease.check()
        interrupt()
        if not lease.writable():  # suspended: another worker may own the job; wait for the heartbeat
            if patience_s is not None and time.monotonic() - started > patience_s:
                raise redis.ConnectionError(f"{what}: Redis has not confirmed the lease for a whole lease")
            time.sleep(0.1)
            continue
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if patience_s is not None and time.monotonic() - started > patience_s:
                raise
            if time.monotonic() - logged_at >= LOG_EVERY_S:
                logged_at = time.monotonic()
                log.warning("Redis unavailable during %s (%s); retrying while the lease lasts (%.1f s left)", what, e,
                            max(0.0, lease.remaining_s()))
        except redis.ResponseError as e:
            if is_nogroup(e):
                lease.mark_lost(vanished_message(lease.job, lease.keys), vanished=True)
                raise JobVanished(lease.reason) from None
            if not is_redis_full(e):
                raise
            now = time.monotonic()
            full_since = now if full_since is None else full_since
            if now - full_since >= full_patience:
                raise RedisFull(f"{redis_full_message(redis_url or 'REDIS_URL')} ({what} refused for "
                                f"{now - full_since:.0f} s)") from None
            if now - logged_at >= LOG_EVERY_S:
                logged_at = now
                log.warning("%s; %s waits (up to %.0f s) and retries", redis_full_message(redis_url or "REDIS_URL"),
                            what, full_patience)
            lease.progress()  # writes retrying on a full Redis: the job is waiting on the operator, not stuck
        time.sleep(backoff_s)
        backoff_s = min(backoff_s * 2, 1.0)


class ResultPublisher:
    """Publishes one job's entries under `lease`. Frame k goes to id (k+1)-0, so Redis rejects a duplicate."""

    def __init__(self, client: redis.Redis, keys: Keys, job_id: str, num_frames: int, lease: Lease,
                 *, patience_s: float | None = None, redis_url: str = "", maxlen: int = 0,
                 interrupt: Callable[[], None] = no_interrupt) -> None:
        self.client = client
        self.keys = keys
        self.job_id = job_id
        self.num_frames = num_frames
        self.lease = lease
        self.patience_s = patience_s  # None: retry connection errors while the lease lasts
        self.redis_url = redis_url
        self.stream = keys.results(job_id)
        self.maxlen = maxlen  # 0: the result stream is kept whole; a live job's is trimmed to about this many
        self.duplicates_rejected = 0
        self.cancel_requested = False
        self.interrupt = interrupt  # the worker's: raises past a shutdown deadline

    def _retry(self, fn: Callable[[], T], what: str, interrupt: Callable[[], None] | None = None) -> T:
        """`interrupt`: the caller's own stop (an aborted sink), run with the worker's deadline check."""

        def stop() -> None:
            if interrupt is not None:
                interrupt()
            self.interrupt()

        return retry_redis(fn, lease=self.lease, what=what, redis_url=self.redis_url, patience_s=self.patience_s,
                           interrupt=stop)

    def _xadd(self, stream: str, entry_id: str, msg: messages.Message,
              interrupt: Callable[[], None] | None = None) -> bool:
        return self._fenced_xadds(stream, [(entry_id, None, msg)], interrupt) == 1

    def _fenced_xadds(self, stream: str, entries: Sequence[tuple[str, tuple[str, str | int] | None, messages.Message]],
                      interrupt: Callable[[], None] | None = None) -> int:
        """Add (entry id, (job hash field, value) to set with it or None, message) entries to `stream`, in
        order, in one round trip (a Redis pipeline of fenced XADDs; the result stream trimmed to `maxlen`
        when set). Returns how many were new; the others were duplicates Redis rejected. Raises LeaseLost
        if the lease was lost: the entries before that point landed, none after it. A connection error
        resends them all, which is safe because every id is fixed."""
        maxlen = self.maxlen if stream == self.stream and self.maxlen else ""
        encoded = [(entry_id, hset or ("", ""), _flat(messages.encode(msg)), msg) for entry_id, hset, msg in entries]

        keys = [self.keys.job(self.job_id), stream]  # one job's keys: one slot
        calls = [(keys, [*self.lease.args(), entry_id, *hset, maxlen, *flat]) for entry_id, hset, flat, _ in encoded]

        def call() -> list[Any]:
            return run_pipeline(self.client, self.lease.scripts.fenced_xadd, calls)

        replies = self._retry(call, f"write to {stream}", interrupt)
        written = 0
        for (entry_id, _, _, msg), (status, cancel) in zip(encoded, replies):
            if status < 0:
                raise self.lease.lost_reply(status, f"{msg.TYPE.value} entry {entry_id} (and any after it) not written")
            self.cancel_requested = self.cancel_requested or cancel == 1
            if status == 0:
                self.duplicates_rejected += 1
                log.info("job %s: entry %s already on %s; Redis rejected the duplicate", self.job_id, entry_id, stream)
            written += status == 1
        return written

    def set_state(self, *, best_effort: bool = False, **fields: Any) -> None:
        """Fenced HSET of the job's state hash; `best_effort`: one try (no waiting on a full or gone Redis)."""
        flat = [x for k, v in fields.items() for x in (k, str(v))]

        def call() -> Any:
            return self.lease.scripts.fenced_hset(keys=[self.keys.job(self.job_id)], args=[*self.lease.args(), *flat])

        if best_effort:
            status = retry_redis(call, lease=self.lease, what="job state update", redis_url=self.redis_url,
                                 full_patience_s=0, patience_s=0, interrupt=self.interrupt)
        else:
            status = self._retry(call, "job state update")
        if status < 0:
            raise self.lease.lost_reply(status, "state not updated")

    def event(self, msg: messages.Message, interrupt: Callable[[], None] | None = None) -> None:
        """A lifecycle event on vseg:events (trimmed to about EVENTS_MAXLEN). The events stream is a shared key,
        so no script writes it with the job's keys: the job hash's owner is checked (OWNS_LUA), then the entry
        added, one round trip after the other."""
        fields = messages.encode(msg)

        def call() -> None:
            status, cancel = self.lease.scripts.owns(keys=[self.keys.job(self.job_id)], args=self.lease.args())
            if status < 0:
                raise self.lease.lost_reply(status, f"{msg.TYPE.value} event not written")
            self.cancel_requested = self.cancel_requested or cancel == 1
            self.client.xadd(self.keys.events, cast(Any, fields), maxlen=EVENTS_MAXLEN, approximate=True)

        self._retry(call, f"write to {self.keys.events}", interrupt)

    def started(self, msg: messages.Started) -> None:
        self.set_state(state=JobState.RUNNING.value, worker=msg.worker, started_at=msg.at)
        self._xadd(self.stream, STARTED_ENTRY_ID, msg)
        self.event(msg)

    def frame(self, result: messages.FrameResult) -> bool:
        return self.frames([result]) == 1

    def frames(self, results: Sequence[messages.FrameResult], interrupt: Callable[[], None] | None = None) -> int:
        """Write several frames' entries in one round trip (see `_fenced_xadds`); returns how many were new.
        `interrupt` stops a write that waits out Redis (the sink's abort)."""
        if not results:
            return 0
        return self._fenced_xadds(
            self.stream, [(frame_entry_id(r.frame_idx), ("frames_done", r.frame_idx + 1), r) for r in results],
            interrupt)

    def object_change(self, entry_id: str, change: messages.ObjectChange, command_id: str = "",
                      interrupt: Callable[[], None] | None = None) -> bool:
        """An object change on the result stream at its fixed id (the sink keeps it in order with the frames)
        and, when new, on the events stream; False: an earlier attempt wrote it. `command_id`: the control
        stream entry it answers, recorded as the job's `control_done` (a trimmed live stream may lose the
        change, not what was applied)."""
        done = ("control_done", command_id) if command_id else None
        new = self._fenced_xadds(self.stream, [(entry_id, done, change)], interrupt) == 1
        if new:
            self.event(change, interrupt)
        return new

    def update(self, entry_id: str, update: messages.FrameUpdate, interrupt: Callable[[], None] | None = None) -> bool:
        """An `update` entry at its fixed id (the sink keeps it in order); False: an earlier attempt wrote it."""
        return self._fenced_xadds(self.stream, [(entry_id, None, update)], interrupt) == 1

    def progress(self, frames_done: int, fps: float, interrupt: Callable[[], None] | None = None,
                 **figures: Any) -> None:
        """A progress event; a live job's carries its skips, latency and source outages, an --auto job's its
        keyframes' figures (messages.Progress), also kept on the job's hash for `producer status`."""
        self.event(messages.Progress(self.job_id, frames_done, self.num_frames, fps=round(fps, 3), **figures),
                   interrupt)
        if figures:  # the source's own fields in the hash are its producer's, written as they happen
            self.set_state(**{k: v for k, v in figures.items() if v is not None and k not in SOURCE_FIELDS})

    def terminal(self, msg: messages.Terminal, *, ttl_s: int, error: str = "") -> bool:
        """The job's one terminal step: entry, state and expiry in one atomic script on the job's slot; then,
        as plain commands, the entry's copy on vseg:events (if the script says it is due) and XACK + XDEL of
        the job entry (shared keys). A crash between leaves the job entry pending: the worker that claims it
        next finds the job ended, writes the copy if it is still due and drops the entry
        (worker/broker/claim.py `take`), so the copy on vseg:events is written at least once."""
        if isinstance(msg, messages.Completed):
            self.set_state(render_path=msg.render_path)
        fields = messages.encode(msg)
        written, copy = self._retry(
            lambda: self.lease.scripts.finish(
                keys=[self.keys.job(self.job_id), self.stream],
                args=[*self.lease.args(), TERMINAL_ENTRY_ID, ttl_s, TERMINAL_STATE[type(msg)].value, error,
                      len(fields), *_flat(fields)],
            ),
            "terminal write",
        )
        if written < 0:
            raise self.lease.lost_reply(written, f"terminal {msg.TYPE.value} not written")

        def after() -> None:
            if copy == 1:
                self.client.xadd(self.keys.events, cast(Any, fields), maxlen=EVENTS_MAXLEN, approximate=True)
                self.client.hset(self.keys.job(self.job_id), "event_copied", "1")
            self.client.xack(self.keys.jobs, self.keys.group, self.lease.entry_id)
            self.client.xdel(self.keys.jobs, self.lease.entry_id)

        self._retry(after, "terminal copy and acknowledgement")
        return written == 1


# a live job's hash fields its producer writes as things happen (the worker's events carry its own view)
SOURCE_FIELDS = frozenset({"source_state", "source_down_since", "source_outages", "source_down_s",
                           "dropped_at_ingest"})


def last_published_frame(client: redis.Redis, keys: Keys, job_id: str) -> messages.FrameResult | None:
    """The job's last `frame` entry, or None. Frames are written in order by fenced pipelines (a lost
    connection leaves a prefix), so frames 0..its frame_idx are all there."""
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrevrange(
        keys.results(job_id), max=f"({TERMINAL_ENTRY_ID}", min=frame_entry_id(0), count=1))
    for _entry_id, fields in entries:
        msg = messages.decode(fields)
        if isinstance(msg, messages.FrameResult):
            return msg
    return None
