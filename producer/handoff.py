"""How a submit hands its job to the workers: the part of the one enqueue path (`producer.submit`) that
differs between a streamed submit (`producer.streaming.StreamingEnqueue`) and `--no-stream`
(`EnqueueWhenDecoded`): how the video is decoded, when the job is enqueued, and what a failure undoes.

The enqueue path calls a hand-off in this order, so every submit has the same shape:

    with handoff.running():             # streaming: a fresh frames stream and the liveness key
        info = handoff.decode(extract)  # streaming: `on_frames` per decoded batch, from the decoding thread
        ...checks against what was decoded...
        created = handoff.decoded(info)  # enqueue now, unless that was done already
        (on any error: handoff.abandon(error), then the error goes on)
        handoff.finish(info)            # streaming: the end marker
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Protocol

from msgspec.structs import replace

from producer.decode import VideoInfo
from producer.job_dir import remove_job_dir
from producer.liveness import redis_unavailable
from schemas.messages import JobMessage

log = logging.getLogger(__name__)

OnFrames = Callable[[int], None]
Enqueue = Callable[[JobMessage], bool]  # the atomic enqueue: True enqueued, False the job already existed
OnEnqueued = Callable[[str], None]  # told the job id once the job is on the jobs stream (from the decoding thread)


class Extract(Protocol):
    """`producer.decode.extract_frames` for this job's video, frames directory and clip options."""

    def __call__(self, *, atomic: bool = True, on_frames: OnFrames | None = None) -> VideoInfo: ...


class Handoff(ABC):
    """What every hand-off keeps: the job as known before decoding (from the video's header), its frames
    directory, and whether the enqueue was tried: set before the attempt, because an error (or an
    interrupt) may leave it done on the server without its result stored here."""

    def __init__(self, job: JobMessage, frames_dir: Path, enqueue: Enqueue,
                 on_enqueued: OnEnqueued | None = None) -> None:
        self.job: JobMessage = job
        self.frames_dir: Path = frames_dir
        self.enqueued: bool = False
        self.tried_enqueue: bool = False
        self._enqueue = enqueue
        self._on_enqueued = on_enqueued

    def enqueue(self, job: JobMessage) -> bool:
        self.tried_enqueue = True
        self.enqueued = self._enqueue(job)
        if self.enqueued and self._on_enqueued is not None:
            self._on_enqueued(job.job_id)
        return self.enqueued

    def running(self) -> AbstractContextManager[object]:
        """What must last from before the decode until the job is handed off or abandoned."""
        return nullcontext()

    @abstractmethod
    def decode(self, extract: Extract) -> VideoInfo:
        """Decode the video into `frames_dir` with `extract`."""

    @abstractmethod
    def decoded(self, info: VideoInfo) -> bool:
        """The video is decoded and checked: enqueue the job unless that was done already. False: a job
        with this id already existed (only possible if the submit lock expired)."""

    @abstractmethod
    def abandon(self, error: BaseException) -> None:
        """After a failure anywhere in the path: undo what must not outlive this submit."""

    @abstractmethod
    def finish(self, info: VideoInfo) -> None:
        """After a successful hand-off, still inside `running`."""


class EnqueueWhenDecoded(Handoff):
    """`--no-stream`: the whole video is decoded first (in this thread, into a hidden directory renamed
    when complete), then the job is enqueued with the exact frame count, size and rate."""

    def decode(self, extract: Extract) -> VideoInfo:
        started = time.monotonic()
        info = extract()
        log.info("decoded %s: %d frames %dx%d at %.3f fps in %.1f s", info.source, info.num_frames, info.width,
                 info.height, info.fps, time.monotonic() - started)
        return info

    def decoded(self, info: VideoInfo) -> bool:
        job = replace(self.job, num_frames=info.num_frames, width=info.width, height=info.height, fps=info.fps,
                      submitted_at=time.time())
        if not self.enqueue(job):  # cannot happen while the lock is held, unless the lock expired
            log.warning("job %s appeared while its submit lock was held", job.job_id)
        return self.enqueued

    def abandon(self, error: BaseException) -> None:
        """Refused (bad prompts, a limit, Redis full, a full disk): the job was never enqueued, so its frames
        go. Unless the enqueue was tried and may have been done (Redis stopped answering mid-call, or an
        interrupt): then the job may be queued with every frame it needs, and they stay."""
        if self.tried_enqueue and (redis_unavailable(error) or not isinstance(error, Exception)):
            log.warning("job %s may have been enqueued (%s): its frames stay", self.job.job_id,
                        type(error).__name__)
            return
        remove_job_dir(self.frames_dir)

    def finish(self, info: VideoInfo) -> None:
        if self.enqueued:
            log.info("submitted job %s (%d frames, %d prompts)", self.job.job_id, info.num_frames,
                     len(self.job.prompts))
