"""Writing a job's results: frame entries with ids derived from the frame index, lifecycle events,
state. Every write is fenced by the worker's lease (worker/lease.py): once the lease is lost,
nothing this worker writes lands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import redis

from schemas import messages
from schemas.names import STARTED_ENTRY_ID, TERMINAL_ENTRY_ID, Keys, frame_entry_id
from schemas.rle import encode_mask, mask_bbox_xyxy
from worker.lease import FENCED_HSET_LUA, FENCED_XADD_LUA, FINISH_LUA, Lease, LeaseLost
from worker.segment import FrameMasks

log = logging.getLogger(__name__)
T = TypeVar("T")

TERMINAL_STATE = {
    messages.Completed: "completed",
    messages.Failed: "failed",
    messages.Cancelled: "cancelled",
    messages.Dead: "dead",
}


def frame_result(job_id: str, out: FrameMasks, *, random_weights: bool) -> messages.FrameResult:
    """RLE-encode every object's mask on one frame (pure)."""
    objects = []
    for obj_id, mask, score in zip(out.obj_ids, out.masks, out.scores):
        dense = np.asarray(mask, dtype=bool)
        objects.append(
            messages.ObjectResult(obj_id=int(obj_id), mask=encode_mask(dense), bbox_xyxy=mask_bbox_xyxy(dense),
                                  area=int(np.count_nonzero(dense)), score=float(score))
        )
    return messages.FrameResult(job_id=job_id, frame_idx=out.frame_idx, objects=tuple(objects), random_weights=random_weights)


def _flat(fields: dict[str, bytes]) -> list[Any]:
    return [x for kv in fields.items() for x in kv]


class JobCancelled(Exception):
    """The job's cancel flag was set: stop and write the cancelled terminal entry."""


def retry_redis(fn: Callable[[], T], *, patience_s: float, what: str) -> T:
    """Run `fn`, retrying connection errors with backoff for up to `patience_s` (a Redis restart)."""
    deadline = time.monotonic() + patience_s
    backoff_s = 0.05
    while True:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if time.monotonic() > deadline:
                raise
            log.warning("Redis unavailable during %s (%s); retrying in %.2f s", what, e, backoff_s)
            time.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 2.0)


class ResultPublisher:
    """Publishes one job's entries under `lease`. Frame k goes to id (k+1)-0, so Redis rejects a duplicate."""

    def __init__(self, client: redis.Redis, keys: Keys, job_id: str, num_frames: int, lease: Lease,
                 *, patience_s: float) -> None:
        self.client = client
        self.keys = keys
        self.job_id = job_id
        self.num_frames = num_frames
        self.lease = lease
        self.patience_s = patience_s
        self.stream = keys.results(job_id)
        self.duplicates_rejected = 0
        self.cancel_requested = False

    def _xadd(self, stream: str, entry_id: str, msg: messages.Message, frames_done: int | None = None) -> bool:
        return self._fenced_xadds(stream, [(entry_id, frames_done, msg)]) == 1

    def _fenced_xadds(self, stream: str, entries: Sequence[tuple[str, int | None, messages.Message]]) -> int:
        """Add (entry id, frames_done or None, message) entries to `stream`, in order, in one round trip
        (a Redis pipeline of fenced XADDs). Returns how many were new; the others were duplicates Redis
        rejected. Raises LeaseLost if the lease was lost: the entries before that point landed, none
        after it. A connection error resends them all, which is safe because every id is fixed."""
        encoded = [(entry_id, "" if done is None else done, _flat(messages.encode(msg)), msg)
                   for entry_id, done, msg in entries]

        def call() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            lease_args = self.lease.args()
            for entry_id, done, flat, _ in encoded:
                pipe.eval(FENCED_XADD_LUA, 3, self.keys.jobs, stream, self.keys.job(self.job_id), *lease_args,
                          entry_id, done, *flat)
            return pipe.execute()

        replies = retry_redis(call, patience_s=self.patience_s, what=f"write to {stream}")
        written = 0
        for (entry_id, _, _, msg), (status, cancel) in zip(encoded, replies):
            if status == -1:
                self.lease.lost.set()
                raise LeaseLost(f"job {self.job_id}: lease lost; {msg.TYPE.value} entry {entry_id} (and any after "
                                f"it) not written")
            self.cancel_requested = self.cancel_requested or cancel == 1
            if status == 0:
                self.duplicates_rejected += 1
                log.info("job %s: entry %s already on %s; Redis rejected the duplicate", self.job_id, entry_id, stream)
            written += status == 1
        return written

    def set_state(self, **fields: Any) -> None:
        flat = [x for k, v in fields.items() for x in (k, str(v))]
        status = retry_redis(
            lambda: self.client.eval(FENCED_HSET_LUA, 2, self.keys.jobs, self.keys.job(self.job_id),
                                     *self.lease.args(), *flat),
            patience_s=self.patience_s, what="job state update",
        )
        if status == -1:
            self.lease.lost.set()
            raise LeaseLost(f"job {self.job_id}: lease lost; state not updated")

    def event(self, msg: messages.Message) -> None:
        self._xadd(self.keys.events, "*", msg)  # trimmed by the worker's housekeeping (EVENTS_MAXLEN)

    def started(self, msg: messages.Started) -> None:
        self.set_state(state="running", worker=msg.worker, started_at=msg.at)
        self._xadd(self.stream, STARTED_ENTRY_ID, msg)
        self.event(msg)

    def frame(self, result: messages.FrameResult) -> bool:
        return self.frames([result]) == 1

    def frames(self, results: Sequence[messages.FrameResult]) -> int:
        """Write several frames' entries in one round trip (see `_fenced_xadds`); returns how many were new."""
        if not results:
            return 0
        return self._fenced_xadds(self.stream, [(frame_entry_id(r.frame_idx), r.frame_idx + 1, r) for r in results])

    def progress(self, frames_done: int, fps: float) -> None:
        self.event(messages.Progress(self.job_id, frames_done, self.num_frames, fps=round(fps, 3)))

    def terminal(self, msg: messages.Terminal, *, ttl_s: int, error: str = "") -> bool:
        """The job's one terminal step, atomic: entry, state, expiry, XACK + XDEL of the job entry."""
        if isinstance(msg, messages.Completed):
            self.set_state(render_path=msg.render_path)
        fields = messages.encode(msg)
        written = retry_redis(
            lambda: self.client.eval(
                FINISH_LUA, 4, self.keys.jobs, self.stream, self.keys.job(self.job_id), self.keys.events,
                *self.lease.args(),
                TERMINAL_ENTRY_ID, ttl_s, TERMINAL_STATE[type(msg)], error, len(fields),
                *_flat(fields),
            ),
            patience_s=self.patience_s, what="terminal write",
        )
        if written == -1:
            self.lease.lost.set()
            raise LeaseLost(f"job {self.job_id}: lease lost; terminal {msg.TYPE.value} not written")
        return written == 1
