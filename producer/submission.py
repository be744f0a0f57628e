"""Submitting a video job: decode to frames under STORAGE_ROOT, check prompts, enqueue exactly once.

One path for every submit (`_decode_and_enqueue`), streamed or not; what differs between the two is a
hand-off object: `producer.streaming.StreamingEnqueue` (enqueue after the first frames, announce the
rest) or `producer.handoff.EnqueueWhenDecoded` (`--no-stream`: decode everything, then enqueue)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis
from redis.exceptions import LockError
from redis.lock import Lock

from producer.capabilities import require_worker
from producer.decode import VideoHeader, VideoInfo, extract_frames, probe_header
from producer.enqueue import enqueue
from producer.enqueue import job_exists as enqueue_job_exists
from producer.handoff import EnqueueWhenDecoded, Handoff, OnEnqueued, OnFrames
from producer.job_dir import frames_dir_of, make_fresh
from producer.streaming import StreamingEnqueue
from producer.zones import NO_ZONES, ZoneSet
from runtime.connection import connect
from runtime.layout import ensure_layout
from runtime.limits import check_job_limits
from runtime.settings import Settings
from schemas import messages
from schemas.errors import PromptError
from schemas.names import POINTS, TEXT, Keys, validate_job_id
from schemas.prompts import ObjectPrompt, validate_prompts

log = logging.getLogger(__name__)

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
    return enqueue_job_exists(client, keys, job_id)


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
    resume: bool = True,
    auto: messages.AutoOptions | None = None,
    labels: Sequence[str] = (),
    on_enqueued: OnEnqueued | None = None,
    zones: ZoneSet | None = None,
    text: Sequence[str] = (),
) -> Submitted:
    """Decode `video`, validate `prompts` against it and enqueue one job; returns its id.

    With `stream` (the default) the job is enqueued as soon as the frames up to the last prompted one
    are on disk, and the remaining frames are announced on vseg:frames:{job_id} as they are decoded, so
    the worker starts at once; otherwise the whole video is decoded first. Either way this returns when
    decoding is done. The same `job_id` twice gives one job: the second call returns `created=False`.
    `render=False` asks for masks only: no MP4 is drawn (less work for the worker). `auto`: the worker finds
    objects itself on keyframes (prompts may then be empty); `labels`: every object gets one of these. `resume=False` asks that
    an attempt after a crash run again from frame 0 (the exact masks of an uninterrupted run) instead of
    going on after the last published frame.
    Raises VideoError / PromptError / JobIdError / LimitError before anything is enqueued (a video that
    turns out corrupt after a streamed job was enqueued fails that job, and raises VideoError here).
    Redis errors are redis-py's (the command line turns them into one line with
    `runtime.faults.redis_fault`): down or hung from the start, raised before anything is decoded; at
    maxmemory (OutOfMemoryError), the job is refused. Either way no half-made job remains, and the
    frames of a job that was never enqueued are removed. `on_enqueued` is told the job id as soon as the job
    is on the jobs stream (from the decoding thread), while decoding goes on: `producer.client` returns there.
    `zones`: the zones and lines its events are judged against (producer/alerts.py), checked against the
    displayed frame (ZoneError) before anything is decoded. `text`: phrases whose every instance is tracked (a
    SAM 3 worker takes the job; prompts may then be empty): NoCapableWorker, before anything is decoded, when no
    live worker takes text (producer/capabilities.py).
    """
    client = client or connect(settings)
    keys = settings.keys
    job_id = validate_job_id(job_id) if job_id else new_job_id()
    ensure_layout(client, keys, mark=False)  # the first Redis call, before any decoding: LayoutError on an old layout
    check_text(text, prompts, auto)
    require_worker(client, keys, TEXT if text else POINTS, url=settings.redis_url)
    if job_exists(client, keys, job_id):
        log.info("job %s already exists: not submitting it again", job_id)
        return Submitted(job_id, created=False)

    # One submitter per job id decodes; a concurrent duplicate waits for it and returns the same job.
    # (A Redis at maxmemory already refuses this lock: nothing is decoded for a job it cannot take.)
    lock = client.lock(keys.submit_lock(job_id), timeout=3600, blocking_timeout=3600)
    with holding_submit_lock(lock, job_id):
        if job_exists(client, keys, job_id):
            log.info("job %s was created concurrently by another client", job_id)
            return Submitted(job_id, created=False)
        clip = ClipOptions(max_frames=max_frames, stride=stride, start_s=start_s, end_s=end_s, progress=progress)
        return _decode_and_enqueue(client, settings, job_id, video, prompts, clip, stream=stream, render=render,
                                   resume=resume, auto=auto, labels=tuple(labels), on_enqueued=on_enqueued,
                                   zones=zones or ZoneSet(), text=tuple(p.strip() for p in text))


def check_text(text: Sequence[str], prompts: Sequence[ObjectPrompt], auto: messages.AutoOptions | None) -> None:
    """Refuse text prompts that a SAM 3 worker cannot take, before anything is written."""
    if not text:
        return
    if any(not isinstance(p, str) or not p.strip() for p in text):
        raise PromptError(f"--text has an empty phrase: {list(text)!r}; give phrases such as \"player, ball\"")
    if auto is not None:
        raise PromptError("--text and --auto are two ways of finding objects: give one of them")


def check_auto(auto: messages.AutoOptions | None, labels: Sequence[str], width: int, height: int) -> None:
    """Refuse automatic-prompt options that cannot work, before anything is written."""
    if auto is None:
        if labels and any(not label.strip() for label in labels):
            raise PromptError(f"--labels has an empty label: {','.join(labels)!r}")
        return
    if auto.keep and not labels:
        raise PromptError("--auto-keep keeps automatic objects by label: give the labels with --labels too")
    if unknown := [k for k in auto.keep if k not in labels]:
        raise PromptError(f"--auto-keep names {', '.join(unknown)}, not among --labels {','.join(labels)}")
    if auto.roi is not None:
        x0, y0, x1, y1 = auto.roi
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise PromptError(f"--roi {x0:g},{y0:g},{x1:g},{y1:g} must be X0,Y0,X1,Y1 inside the {width}x{height} frame "
                              "with X1 > X0 and Y1 > Y0")


def _validate_displayed(prompts: Sequence[ObjectPrompt], header: VideoHeader, max_frames: int,
                        allow_none: bool = False) -> None:
    """validate_prompts against the video's header (frame indexes up to the job limit: the count is
    checked once decoded); for a turned video, a point outside says in which picture it was looked for."""
    try:
        validate_prompts(prompts, width=header.width, height=header.height, num_frames=max_frames,
                         allow_none=allow_none)
    except PromptError as e:
        if header.orientation.upright or not _outside(prompts, header.width, header.height):
            raise
        raise PromptError(
            f"{e}; prompt pixels are in the video as players and ffmpeg show it, {header.width}x{header.height}: "
            f"it is stored {header.stored_width}x{header.stored_height} and {header.orientation.describe()} "
            "for display (its display matrix)") from e


def _outside(prompts: Sequence[ObjectPrompt], width: int, height: int) -> bool:
    points = [xy for p in prompts for xy in p.points_xy]
    points += [corner for p in prompts if p.box_xyxy is not None for corner in (p.box_xyxy[:2], p.box_xyxy[2:])]
    return any(not (0 <= x <= width and 0 <= y <= height) for x, y in points)


@contextmanager
def holding_submit_lock(lock: Lock, job_id: str) -> Iterator[None]:
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


def enqueue_job(client: redis.Redis, keys: Keys, job: messages.JobMessage,
                extra: Mapping[str, str] | None = None) -> bool:
    """The job's entry on the jobs stream, then its hash (producer/enqueue.py), with `extra` hash fields;
    False: it already existed."""
    return enqueue(client, keys, job, extra)


def _decode_and_enqueue(
    client: redis.Redis,
    settings: Settings,
    job_id: str,
    video: Path,
    prompts: Sequence[ObjectPrompt],
    clip: ClipOptions,
    *,
    stream: bool,
    render: bool,
    resume: bool,
    auto: messages.AutoOptions | None = None,
    labels: tuple[str, ...] = (),
    on_enqueued: OnEnqueued | None = None,
    zones: ZoneSet = NO_ZONES,
    text: tuple[str, ...] = (),
) -> Submitted:
    """The one enqueue path, streamed or not: check what the video's header tells, decode into a fresh
    frames directory, check again against what was decoded, enqueue once (`enqueue_job`), and on any error
    (Ctrl-C and SystemExit too: a started worker must not wait for frames) leave nothing half made. The
    hand-off (producer/handoff.py) decides how the video is decoded, when the job is enqueued and what a
    failure undoes."""
    header = probe_header(video)  # width and height as displayed: prompts are in the upright picture
    width, height, fps, estimate = header.width, header.height, header.fps, header.estimate
    check_job_limits(1, width, height, prompts, settings)  # refuse oversized frames before decoding
    _validate_displayed(prompts, header, settings.max_frames, allow_none=auto is not None or bool(text))
    check_auto(auto, labels, width, height)
    zones.check(width, height)
    expected = clip.expected_frames(estimate, fps)
    if stream:  # enqueued before the count is known: refuse from the header what the decode would refuse
        check_job_limits(expected, width, height, prompts, settings)
    frames_rel, frames_dir = frames_dir_of(settings, job_id)  # made below, where a failure removes it again
    job = messages.JobMessage(
        job_id=job_id, frames_dir=frames_rel, num_frames=max(1, min(expected or 1, settings.max_frames)),
        width=width, height=height, fps=fps / clip.stride, prompts=tuple(prompts), source=Path(video).name,
        render=render,
        resume=resume,
        auto=auto,
        labels=labels,
        text=text,
    )

    extra = {"source_path": str(Path(video).resolve()), **({"zones": zones.to_json()} if zones else {}),
             **({"start_s": f"{clip.start_s:.6g}"} if clip.start_s else {})}  # the viewer maps video time by it

    def enqueue(job: messages.JobMessage) -> bool:
        return enqueue_job(client, settings.keys, job, extra)

    handoff: Handoff = (StreamingEnqueue(client, settings, job, frames_dir, enqueue, on_enqueued) if stream
                        else EnqueueWhenDecoded(job, frames_dir, enqueue, on_enqueued))

    def extract(*, atomic: bool = True, on_frames: OnFrames | None = None) -> VideoInfo:
        return extract_frames(video, frames_dir, jpeg_quality=settings.jpeg_quality,
                              decode_threads=settings.decode_threads, atomic=atomic, on_frames=on_frames,
                              storage_root=settings.storage_root, **clip.capped(settings).decode_kwargs())

    with ExitStack() as running:
        try:
            make_fresh(settings, frames_dir)  # after the checks: a refused video leaves nothing on disk
            running.enter_context(handoff.running())
            info = handoff.decode(extract)
            check_job_limits(info.num_frames, info.width, info.height, prompts, settings)
            validate_prompts(prompts, width=info.width, height=info.height, num_frames=info.num_frames,
                             allow_none=auto is not None or bool(text))
            created = handoff.decoded(info)
        except BaseException as e:
            handoff.abandon(e)
            raise
        handoff.finish(info)
    return Submitted(job_id, created=created, video=info)
