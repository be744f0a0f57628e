"""Submitting a video job: decode to frames under STORAGE_ROOT, check prompts, enqueue exactly once."""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import redis
from redis.exceptions import LockError
from redis.lock import Lock

from producer.decode import VideoInfo, extract_frames, probe_video
from producer.liveness import ProducerHeartbeat, redis_unavailable
from runtime.cleanup import job_ended, remove_frames
from runtime.connection import connect
from runtime.faults import SUBMIT_AGAIN, disk_fault
from runtime.limits import check_job_limits
from runtime.priority import lower_this_thread
from runtime.settings import Settings
from schemas import messages
from schemas.errors import JobFailed, VideoError
from schemas.names import JobState, Keys, frame_entry_id, frames_end_entry_id, validate_job_id
from schemas.prompts import ObjectPrompt, validate_prompts
from schemas.storage import job_frames_rel, resolve_inside

log = logging.getLogger(__name__)
T = TypeVar("T")

# Creates the job's state hash and appends the job to the jobs stream in one atomic step, so the same
# job id submitted twice (a client retry after a timeout, two racing clients) gives exactly one job.
# KEYS: job hash, jobs stream. ARGV: entry type, entry data, num_frames, submitted_at, source, state
# (JobState.QUEUED). 1 enqueued, 0 the job already exists (nothing written).
_ENQUEUE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[6], 'attempt', 0, 'frames_done', 0,
           'num_frames', ARGV[3], 'submitted_at', ARGV[4], 'source', ARGV[5])
local id = redis.call('XADD', KEYS[2], '*', 'type', ARGV[1], 'data', ARGV[2])
redis.call('HSET', KEYS[1], 'entry_id', id)
return 1
"""


@dataclass(frozen=True)
class ClipOptions:
    """Which frames of the video to keep (see producer/decode.py)."""

    max_frames: int | None = None
    stride: int = 1
    start_s: float | None = None
    end_s: float | None = None
    progress: bool = False

    def capped(self, settings: Settings) -> ClipOptions:
        """Decode at most one frame past the job limit: enough to know a job is too long."""
        limit = settings.max_frames + 1
        return replace(self, max_frames=limit if self.max_frames is None else min(self.max_frames, limit))

    def decode_kwargs(self) -> dict[str, Any]:
        return {"max_frames": self.max_frames, "stride": self.stride, "start_s": self.start_s, "end_s": self.end_s,
                "progress": self.progress}

    def expected_frames(self, estimate: int, fps: float) -> int:
        """Frames the decode will keep, from the header's estimate (0 if unknown); checked again at the end."""
        if not estimate or fps <= 0:
            return 0
        span_s = max(0.0, (self.end_s if self.end_s is not None else estimate / fps) - (self.start_s or 0.0))
        expected = int(span_s * fps) // max(self.stride, 1)
        return min(expected, self.max_frames) if self.max_frames is not None else expected


@dataclass(frozen=True)
class Submitted:
    job_id: str
    created: bool  # False: a job with this id already existed, nothing was done
    video: VideoInfo | None = None


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


def job_exists(client: redis.Redis, keys: Keys, job_id: str) -> bool:
    return bool(client.exists(keys.job(job_id)))


def submit(
    video: Path,
    prompts: Sequence[ObjectPrompt],
    *,
    settings: Settings,
    client: redis.Redis | None = None,
    job_id: str | None = None,
    max_frames: int | None = None,
    stride: int = 1,
    start_s: float | None = None,
    end_s: float | None = None,
    progress: bool = False,
    stream: bool = True,
    render: bool = True,
) -> Submitted:
    """Decode `video`, validate `prompts` against it and enqueue one job; returns its id.

    With `stream` (the default) the job is enqueued as soon as the frames up to the last prompted one
    are on disk, and the remaining frames are announced on vseg:frames:{job_id} as they are decoded, so
    the worker starts at once; otherwise the whole video is decoded first. Either way this returns when
    decoding is done. The same `job_id` twice gives one job: the second call returns `created=False`.
    `render=False` asks for masks only: no MP4 is drawn (less work for the worker).
    Raises VideoError / PromptError / JobIdError / LimitError before anything is enqueued (a video that
    turns out corrupt after a streamed job was enqueued fails that job, and raises VideoError here).
    Redis errors are redis-py's (the command line turns them into one line with
    `runtime.faults.redis_fault`): down or hung from the start, raised before anything is decoded; at
    maxmemory (OutOfMemoryError), the job is refused. Either way no half-made job remains, and the
    frames of a job that was never enqueued are removed.
    """
    client = client or connect(settings)
    keys = settings.keys
    job_id = validate_job_id(job_id) if job_id else new_job_id()
    if job_exists(client, keys, job_id):  # the first Redis call, before any decoding
        log.info("job %s already exists: not submitting it again", job_id)
        return Submitted(job_id, created=False)

    # One submitter per job id decodes; a concurrent duplicate waits for it and returns the same job.
    # (A Redis at maxmemory already refuses this lock: nothing is decoded for a job it cannot take.)
    lock = client.lock(keys.submit_lock(job_id), timeout=3600, blocking_timeout=3600)
    with _holding(lock, job_id):
        if job_exists(client, keys, job_id):
            log.info("job %s was created concurrently by another client", job_id)
            return Submitted(job_id, created=False)
        run = _stream_and_enqueue if stream else _decode_and_enqueue
        return run(
            client, settings, job_id, video, prompts,
            ClipOptions(max_frames=max_frames, stride=stride, start_s=start_s, end_s=end_s, progress=progress),
            render,
        )


@contextmanager
def _holding(lock: Lock, job_id: str) -> Iterator[None]:
    """Hold the submit lock for the block. A release that fails never hides the block's own error (nor
    fails a submit that succeeded): the lock then expires on its own."""
    if not lock.acquire():
        raise LockError(f"timed out waiting for another submit of job {job_id} to finish")
    failed = True
    try:
        yield
        failed = False
    finally:
        try:
            lock.release()
        except redis.RedisError as e:
            (log.debug if failed else log.warning)("cannot release the submit lock of job %s (%s); it expires in 1 h",
                                                   job_id, e)


def _enqueue(client: redis.Redis, keys: Keys, job: messages.JobMessage) -> bool:
    fields = messages.encode(job)
    return bool(client.eval(
        _ENQUEUE_LUA, 2, keys.job(job.job_id), keys.jobs,
        fields["type"], fields["data"], job.num_frames, job.submitted_at, job.source, JobState.QUEUED.value,
    ))


def _fresh_frames_dir(settings: Settings, job_id: str) -> tuple[str, Path]:
    frames_rel = job_frames_rel(job_id)
    frames_dir = resolve_inside(settings.storage_root, frames_rel)
    try:
        if frames_dir.exists():  # left by an earlier submit that died before enqueueing: no worker reads it
            shutil.rmtree(frames_dir)
        frames_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        full = disk_fault(e, frames_dir.parent, settings.storage_root, then=SUBMIT_AGAIN)
        if full is None:
            raise
        raise full from e
    return frames_rel, frames_dir


def _in_background_thread(fn: Callable[[], T], stop: threading.Event | None = None) -> T:
    """Run `fn` in a thread of lowered priority (it and the threads it starts: FFmpeg's, the JPEG pool),
    so that decoding ahead never slows a worker's model on the same machine. Re-raises its error.
    Interrupted while waiting, sets `stop` (which `fn` must heed soon) and waits up to 10 s for it."""
    box: dict[str, Any] = {}
    finished = threading.Event()

    def run() -> None:
        lower_this_thread()
        try:
            box["value"] = fn()
        except BaseException as e:  # handed back to the caller's thread
            box["error"] = e
        finally:
            finished.set()

    threading.Thread(target=run, name="decode", daemon=True).start()
    # Waited for with an Event, not Thread.join: a join interrupted by Ctrl-C marks a still-running thread
    # as stopped (CPython 3.11's bpo-45274 handling), so a second join would not wait.
    try:
        finished.wait()
    except BaseException:  # Ctrl-C while waiting: have the thread stop, and wait for it. A daemon thread still
        if stop is not None:  # inside OpenCV when the interpreter exits is unwound through C++ and aborts it.
            stop.set()
        finished.wait(timeout=10)
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]


def _stream_and_enqueue(
    client: redis.Redis,
    settings: Settings,
    job_id: str,
    video: Path,
    prompts: Sequence[ObjectPrompt],
    clip: ClipOptions,
    render: bool = True,
) -> Submitted:
    keys = settings.keys
    frames_stream = keys.frames(job_id)
    width, height, fps, estimate = probe_video(video)
    check_job_limits(1, width, height, prompts, settings)
    validate_prompts(prompts, width=width, height=height, num_frames=settings.max_frames)
    expected = clip.expected_frames(estimate, fps)
    check_job_limits(expected, width, height, prompts, settings)  # from the header, before anything is enqueued
    need = max(p.frame_idx for p in prompts) + 1  # frames on disk before the job can start
    frames_rel, frames_dir = _fresh_frames_dir(settings, job_id)  # after the checks: a bad video leaves nothing
    client.delete(frames_stream)
    job = messages.JobMessage(
        job_id=job_id, frames_dir=frames_rel, num_frames=max(1, min(expected or 1, settings.max_frames)),
        width=width, height=height, fps=fps / clip.stride, prompts=tuple(prompts), source=Path(video).name,
        frames_stream=frames_stream, render=render, producer_ttl_s=settings.producer_ttl_s,
    )
    announced = 0
    enqueued = False
    tried_enqueue = False  # set before the attempt: an error (or an interrupt) may leave it done on the server
    checked_at = time.monotonic()
    # Set when this thread is interrupted while waiting; the decoding thread then stops at its next frames,
    # and `_in_background_thread` waits for that, so nothing is announced after the error marker.
    interrupted = threading.Event()

    def enqueue() -> bool:
        nonlocal tried_enqueue
        tried_enqueue = True
        return _enqueue(client, keys, job)

    def on_frames(available: int) -> None:
        nonlocal announced, enqueued, checked_at
        if interrupted.is_set():
            raise VideoError("submit was interrupted: decoding stopped")
        if enqueued and time.monotonic() - checked_at >= 1.0:  # a job failed or cancelled: stop decoding
            checked_at = time.monotonic()
            _stop_if_ended(client, settings, job_id)
        if available > settings.max_frames:
            check_job_limits(available, width, height, prompts, settings)
        pipe = client.pipeline(transaction=False)
        for k in range(announced, available):
            pipe.xadd(frames_stream, {"frame_idx": k}, id=frame_entry_id(k))
        try:
            pipe.execute()
        except redis.ResponseError as e:
            _raise_if_closed(client, settings, job_id, e)
            raise
        announced = available
        if not enqueued and available >= need:
            enqueued = enqueue()
            log.info("job %s enqueued after %d frames; decoding goes on", job_id, available)

    # The liveness key exists before the job is enqueued and goes only after the end (or error) marker.
    with ExitStack() as beating:
        try:
            beating.enter_context(ProducerHeartbeat(client, keys.producer(job_id), settings.producer_ttl_s))
            info = _in_background_thread(lambda: extract_frames(
                video, frames_dir, jpeg_quality=settings.jpeg_quality, decode_threads=settings.decode_threads,
                atomic=False, on_frames=on_frames, storage_root=settings.storage_root,
                **clip.capped(settings).decode_kwargs(),
            ), stop=interrupted)
            check_job_limits(info.num_frames, info.width, info.height, prompts, settings)
            validate_prompts(prompts, width=info.width, height=info.height, num_frames=info.num_frames)
            if not enqueued:  # a short video whose frames all fit before the last prompt's: now or never
                enqueued = enqueue()
        except BaseException as e:  # Ctrl-C and SystemExit too: a started worker must not wait for frames
            _abandon(client, settings, job_id, frames_dir, e, maybe_enqueued=tried_enqueue)
            raise
        pipe = client.pipeline(transaction=False)
        pipe.xadd(frames_stream, {"end": info.num_frames}, id=frames_end_entry_id(info.num_frames))
        pipe.hset(keys.job(job_id), "num_frames", info.num_frames)
        pipe.expire(frames_stream, settings.results_ttl_s)
        pipe.execute()
    try:
        if job_ended(client, settings, job_id):  # after the end marker: the worker may have finished first
            remove_frames(settings, job_id)
    except (redis.RedisError, OSError) as e:  # disk space, not correctness: the submit itself succeeded
        log.warning("could not check whether job %s's frames can be removed (%s)", job_id, e)
    log.info("submitted job %s (%d frames streamed, %d prompts)", job_id, info.num_frames, len(prompts))
    return Submitted(job_id, created=True, video=info)


def _stop_if_ended(client: redis.Redis, settings: Settings, job_id: str) -> None:
    """Raise JobFailed if the streamed job has already ended (failed, cancelled): its frames are not needed."""
    if job_ended(client, settings, job_id):
        state, error = cast(list[bytes | None], client.hmget(settings.keys.job(job_id), ["state", "error"]))
        raise JobFailed(job_id, f"it ended {(state or b'expired').decode()} while its video was being decoded, so "
                                f"decoding stopped ({(error or b'no error recorded').decode()})")


def _raise_if_closed(client: redis.Redis, settings: Settings, job_id: str, error: redis.ResponseError) -> None:
    """A frame announcement refused because the stream ends with an error marker: the worker closed it
    (this producer's liveness key was gone: it was cut off from Redis or stalled). Raise JobFailed."""
    last = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrevrange(settings.keys.frames(job_id), count=1))
    if last and b"error" in last[0][1]:
        raise JobFailed(job_id, f"its frames stream was closed while its video was being decoded "
                                f"({last[0][1][b'error'].decode(errors='replace')}), so decoding stopped") from error


def _abandon(client: redis.Redis, settings: Settings, job_id: str, frames_dir: Path, error: BaseException,
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
        _remove_job_dir(frames_dir)
        return
    try:
        if job_exists(client, keys, job_id):  # this call holds the submit lock: the job is ours
            client.xadd(frames_stream, {"error": f"{type(error).__name__}: {reason}"})
            client.expire(frames_stream, settings.results_ttl_s)
            if job_ended(client, settings, job_id):  # after the error marker: the worker may have finished first
                remove_frames(settings, job_id)
            return
        client.delete(frames_stream)
    except redis.RedisError as e:  # the original error matters more; the worker's liveness check covers this
        if not maybe_enqueued:
            _remove_job_dir(frames_dir)
            return
        log.warning("cannot mark %s as failed (%s)", frames_stream, e)
        return  # a worker may be reading the frames: leave them
    _remove_job_dir(frames_dir)


def _remove_job_dir(frames_dir: Path) -> None:
    """Remove the frames of a job that was never enqueued, and the job's directory if that leaves it empty."""
    shutil.rmtree(frames_dir, ignore_errors=True)
    try:
        frames_dir.parent.rmdir()
    except OSError:  # not empty (another file of the job's), or already gone
        pass


def _decode_and_enqueue(
    client: redis.Redis,
    settings: Settings,
    job_id: str,
    video: Path,
    prompts: Sequence[ObjectPrompt],
    clip: ClipOptions,
    render: bool = True,
) -> Submitted:
    keys = settings.keys
    frames_rel, frames_dir = _fresh_frames_dir(settings, job_id)
    width, height, _, _ = probe_video(video)
    check_job_limits(1, width, height, prompts, settings)  # refuse oversized frames before decoding
    started = time.monotonic()
    info = extract_frames(video, frames_dir, jpeg_quality=settings.jpeg_quality, decode_threads=settings.decode_threads,
                          storage_root=settings.storage_root, **clip.capped(settings).decode_kwargs())
    log.info("decoded %s: %d frames %dx%d at %.3f fps in %.1f s", video, info.num_frames, info.width,
             info.height, info.fps, time.monotonic() - started)
    try:
        check_job_limits(info.num_frames, info.width, info.height, prompts, settings)
        validate_prompts(prompts, width=info.width, height=info.height, num_frames=info.num_frames)
        job = messages.JobMessage(
            job_id=job_id, frames_dir=frames_rel, num_frames=info.num_frames, width=info.width,
            height=info.height, fps=info.fps, prompts=tuple(prompts), source=Path(video).name, render=render,
        )
        created = _enqueue(client, keys, job)
    except Exception:  # refused (bad prompts, Redis full, ...): the job was never enqueued
        _remove_job_dir(frames_dir)
        raise
    if not created:  # cannot happen while the lock is held, unless the lock expired
        log.warning("job %s appeared while its submit lock was held", job_id)
        return Submitted(job_id, created=False, video=info)
    log.info("submitted job %s (%d frames, %d prompts)", job_id, info.num_frames, len(prompts))
    return Submitted(job_id, created=True, video=info)
