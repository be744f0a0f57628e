"""The streaming hand-off: the job is enqueued as soon as the frames up to its last prompted one are on
disk, and each further frame is announced on `vseg:frames:{job_id}` as it is decoded (frame k at id
`(k+1)-0`, then an end marker with the total, or an error marker), so a worker starts at once. While it
decodes, the producer keeps its liveness key alive (`producer.liveness`); a failure tells the worker,
so a started job fails now instead of waiting for frames that never come."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import cast

import redis
from msgspec.structs import replace

from producer.announce import FrameAnnouncer
from producer.background import in_background_thread
from producer.decode import VideoInfo
from producer.handoff import Enqueue, Extract, Handoff, OnEnqueued
from producer.job_dir import remove_job_dir
from producer.liveness import redis_unavailable
from runtime.cleanup import job_ended, remove_frames
from runtime.limits import check_job_limits
from runtime.settings import Settings
from schemas.errors import JobFailed, VideoError
from schemas.messages import JobMessage

log = logging.getLogger(__name__)

DECODING = ("its video was being decoded", "decoding")  # what stops when the worker closes the frames stream
ENDED_CHECK_S = 1.0  # how often, once enqueued, the decode asks whether the job has ended (cancelled, failed)


class StreamingEnqueue(Handoff):
    """One streamed submit. `on_frames` is called from the decoding thread whenever frames 0..n-1 are all
    on disk: it announces the new ones, enqueues the job once the prompted frames are there, and stops
    the decode (by raising) once the job has ended or the worker closed its frames stream. The caller's
    thread sets `interrupted` when it is interrupted while waiting; the decode then stops at its next
    frames, so nothing is announced after the error marker."""

    def __init__(self, client: redis.Redis, settings: Settings, job: JobMessage, frames_dir: Path,
                 enqueue: Enqueue, on_enqueued: OnEnqueued | None = None) -> None:
        keys = settings.keys
        super().__init__(replace(job, frames_stream=keys.frames(job.job_id), producer_ttl_s=settings.producer_ttl_s),
                         frames_dir, enqueue, on_enqueued)
        self.client: redis.Redis = client
        self.settings: Settings = settings
        self.need: int = max((p.frame_idx for p in job.prompts), default=0) + 1  # frames on disk before it starts
        self.announced: int = 0
        self.announcer = FrameAnnouncer(client, settings, job.job_id)
        self.checked_at: float = time.monotonic()
        self.interrupted: threading.Event = threading.Event()

    @property
    def frames_stream(self) -> str:
        return self.job.frames_stream

    def running(self) -> AbstractContextManager[None]:
        """A fresh frames stream and the producer's liveness key (producer/announce.py)."""
        return self.announcer.running()

    def decode(self, extract: Extract) -> VideoInfo:
        return in_background_thread(lambda: extract(atomic=False, on_frames=self.on_frames), stop=self.interrupted)

    def on_frames(self, available: int) -> None:
        if self.interrupted.is_set():
            raise VideoError("submit was interrupted: decoding stopped")
        if self.enqueued and time.monotonic() - self.checked_at >= ENDED_CHECK_S:
            self.checked_at = time.monotonic()
            self._stop_if_ended()
        if available > self.settings.max_frames:
            check_job_limits(available, self.job.width, self.job.height, self.job.prompts, self.settings)
        self._announce(available)
        if not self.enqueued and available >= self.need:
            self.enqueue(self.job)
            log.info("job %s enqueued after %d frames; decoding goes on", self.job.job_id, available)

    def _announce(self, available: int) -> None:
        at = f"{time.time():.6f}"  # when the frames were on disk: a live frame's latency runs from here
        self.announcer.announce({k: {"at": at} for k in range(self.announced, available)}, DECODING)
        self.announced = available

    def decoded(self, info: VideoInfo) -> bool:
        if not self.enqueued:  # a short video whose frames all fit before the last prompt's: now or never
            self.enqueue(self.job)
        return True

    def abandon(self, error: BaseException) -> None:
        abandon(self.client, self.settings, self.job.job_id, self.frames_dir, error, maybe_enqueued=self.tried_enqueue)

    def finish(self, info: VideoInfo) -> None:
        """The end marker (with the total the worker waits for), then remove the frames if the worker
        finished first."""
        self.announcer.end(info.num_frames)
        log.info("submitted job %s (%d frames streamed, %d prompts)", self.job.job_id, info.num_frames,
                 len(self.job.prompts))

    def _stop_if_ended(self) -> None:
        """Raise JobFailed if the job has already ended (failed, cancelled): its frames are not needed."""
        job_id = self.job.job_id
        if job_ended(self.client, self.settings, job_id):
            state, error = cast(list[bytes | None], self.client.hmget(self.settings.keys.job(job_id), ["state", "error"]))
            raise JobFailed(job_id, f"it ended {(state or b'expired').decode()} while its video was being decoded, so "
                                    f"decoding stopped ({(error or b'no error recorded').decode()})")

def abandon(client: redis.Redis, settings: Settings, job_id: str, frames_dir: Path, error: BaseException,
            *, maybe_enqueued: bool = True) -> None:
    """After a failed streamed decode: tell a worker (so the job fails now instead of waiting for
    frames), or, if the job was never enqueued, remove what was written. Whether it was is asked of Redis,
    not of a flag, which an interrupt can land before (the enqueue done, its result not yet stored);
    `maybe_enqueued` False (no enqueue was ever tried) settles it without Redis.

    When Redis itself is what failed (unreachable, hung), it is not asked again: that would only wait
    out more retries before the one-line error. The liveness key then expires, and a worker that holds
    the job fails it, closes the frames stream and removes the frames."""
    keys = settings.keys
    frames_stream = keys.frames(job_id)
    reason = str(error) or ("the producer was interrupted" if isinstance(error, KeyboardInterrupt) else "no detail")
    if redis_unavailable(error):
        if maybe_enqueued:
            log.debug("not closing %s: Redis does not answer (%s)", frames_stream, error)
            return  # a worker may be reading the frames: leave them
        remove_job_dir(frames_dir)
        return
    try:
        if client.exists(keys.job(job_id)):  # this call holds the submit lock: the job is ours
            client.xadd(frames_stream, {"error": f"{type(error).__name__}: {reason}"})
            client.expire(frames_stream, settings.results_ttl_s)
            if job_ended(client, settings, job_id):  # after the error marker: the worker may have finished first
                remove_frames(settings, job_id)
            return
        client.delete(frames_stream)
    except redis.RedisError as e:  # the original error matters more; the worker's liveness check covers this
        if not maybe_enqueued:
            remove_job_dir(frames_dir)
            return
        log.warning("cannot mark %s as failed (%s)", frames_stream, e)
        return  # a worker may be reading the frames: leave them
    remove_job_dir(frames_dir)
