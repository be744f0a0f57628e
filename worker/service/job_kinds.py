"""A job's kind, chosen once from its ValidJob (`kind_of`): a file job (`FileJob`) or a live one (`LiveJob`).

What differs between the two is said here, once, and the runner (worker/service/runner.py) runs the same
steps for both: its log line; the result stream's trimming; the render (an MP4, or a rolling HLS); the frames
the session reads (the whole video, or the frames a live job picks, numbered 0, 1, ...: worker/sources/live.py)
and how a session frame maps back to the job's (with the frames passed over published as skipped); when
`started` is written (at once, or at the first frame processed, which it names); the first prompts (a live
job's all on its first frame processed); whether a prompt on a frame already published is propagated
backwards (a file job's only: a live job's frames are not kept); what an earlier attempt's progress counts;
and how many frames the job had at its end.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import msgspec

from runtime.settings import Settings
from schemas import messages
from schemas.errors import VsegError
from schemas.names import JobState
from worker.broker.publish import ResultPublisher
from worker.model.frame_masks import FrameMasks
from worker.model.session import Prompt, Session
from worker.output.hls import HlsWriter
from worker.output.render import MaskVideoWriter
from worker.output.sink import ResultSink
from worker.service.context import WorkerContext
from worker.service.job import FrameSourceKind, ValidJob
from worker.service.resume import Resume
from worker.sources.frames import DirFrames, FrameSource, StreamedFrames
from worker.sources.live import LiveFrames, LiveResults

log = logging.getLogger(__name__)


class FileJob:
    """A video file's job: every frame segmented, in order; prompts on any frame."""

    live = False
    backfills = True  # a prompt on a frame already published is propagated backwards (update entries)

    def __init__(self, ctx: WorkerContext, job: ValidJob, *, check: Callable[[], None],
                 turn_wait: Callable[[], None]) -> None:
        self.ctx = ctx
        self.job = job
        self.check = check
        self.turn_wait = turn_wait
        self.results: LiveResults | None = None  # a live job's side of its frames (after `session_frames`)

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    def start(self, pub: ResultPublisher, started: messages.Started) -> messages.Started | None:
        """Publish `started` now; a live job holds it (returned) until its first frame processed, which it names."""
        pub.started(started)
        return None

    def first_processed(self, pub: ResultPublisher, started: messages.Started, k: int, last: int) -> None:
        """A held `started` published at the first frame processed (a live job's; a file job holds none)."""
        return None

    def timings(self, sink: ResultSink, session: Session | None, *, t0: float, segment_s: float) -> dict[str, float]:
        """`completed`'s timings_s, but the render's close and the total."""
        timings = {"first_result_s": (sink.first_result_at or time.monotonic()) - t0, "segment_s": segment_s,
                   "publish_s": sink.publish_s, "render_s": sink.render_s}
        if session is not None and "waited_s" in session.stats:  # the model's wait for frames, when known
            timings["frames_waited_s"] = session.stats["waited_s"]
        return timings

    def describe(self, attempt: int) -> str:
        job = self.job
        return (f"job {job.job_id} attempt {attempt}: {job.num_frames} frames {job.width}x{job.height}, "
                f"{len(job.prompts)} prompts")

    @property
    def results_maxlen(self) -> int:
        """About how many entries its result stream keeps (0: all)."""
        return 0

    def writer(self, preset: str, threads: int) -> MaskVideoWriter | HlsWriter:
        job = self.job
        return MaskVideoWriter(job.render_target, fps=job.fps, width=job.width, height=job.height, preset=preset,
                               threads=threads, partial_tag=self.ctx.name, storage_root=self.settings.storage_root)

    def frames(self) -> FrameSource:
        """The job's frames: a finished directory, or one its producer still fills (announced on a stream)."""
        job = self.job
        if job.source is FrameSourceKind.STREAM:
            return self.streamed()
        return DirFrames(job.frames_dir, job.num_frames, check=self.check, turn_wait=self.turn_wait)

    def streamed(self) -> StreamedFrames:
        job, settings = self.job, self.settings
        return StreamedFrames(self.ctx.client, self.ctx.keys.frames(job.job_id), job.frames_dir,
                              block_ms=settings.block_ms, stall_s=self.stall_s, producer_key=self.ctx.keys.producer(job.job_id),
                              producer_ttl_s=job.producer_ttl_s, check=self.check, live_source=self.live,
                              turn_wait=self.turn_wait)  # waiting for a turn on a shared model is not a stall

    @property
    def stall_s(self) -> float:
        return self.settings.stall_s

    def session_frames(self, frames: FrameSource, resume: Resume) -> FrameSource:
        """What the session reads."""
        return frames

    def first_session_frame(self, resume: Resume) -> int:
        return resume.first_frame

    def must_run(self, frames: FrameSource, expected: int) -> bool:
        """Whether a session is needed (a resumed file job whose frames were all published needs none)."""
        return frames.total is None or expected < frames.total

    def first_prompts(self, resume: Resume) -> Sequence[Prompt]:
        """What the session starts with: a resumed job's seeds, else the job's prompts."""
        return resume.prompts if resume.prompts or resume.no_objects else self.job.prompts

    def dropped_before(self, resume: Resume) -> int:
        """Frames earlier attempts skipped (a live job's progress counts them all)."""
        return 0

    def place(self, out: FrameMasks) -> FrameMasks:
        """The session's frame as the job's frame (its index already is)."""
        return out

    def passed_over(self, last: int, k: int, sink: ResultSink) -> None:
        """Publish the frames after `last` and before `k` that the session passed over (none here)."""
        return None

    def total(self, last: int, expected: int, frames: FrameSource) -> int:
        """The job's frame count at its end; raises if the session stopped short."""
        total = frames.total if frames.total is not None else expected
        if expected != total:
            raise VsegError(f"segmenter stopped after {expected} of {total} frames")
        return total

    def completed_line(self, total_s: float, num_frames: int, skipped: int) -> str:
        return f"job {self.job.job_id} completed in {total_s:.1f} s ({num_frames / max(total_s, 1e-9):.2f} frames/s)"


class LiveJob(FileJob):
    """A live source's job: unbounded, real time; the session takes the newest frame each time, the frames
    in between are published as skipped; rolling HLS; its result stream trimmed."""

    live = True
    backfills = False

    def __init__(self, ctx: WorkerContext, job: ValidJob, *, check: Callable[[], None],
                 turn_wait: Callable[[], None]) -> None:
        super().__init__(ctx, job, check=check, turn_wait=turn_wait)
        self.picks: LiveFrames | None = None

    def start(self, pub: ResultPublisher, started: messages.Started) -> messages.Started | None:
        pub.set_state(state=JobState.RUNNING.value, worker=self.ctx.name, started_at=started.at)
        return started

    def first_processed(self, pub: ResultPublisher, started: messages.Started, k: int, last: int) -> None:
        """The first frame processed, `k`: its `started` now, naming it (its prompts applied there)."""
        pub.started(msgspec.structs.replace(started, first_frame=k))
        log.info("live job %s: first frame processed %d (frames %d..%d passed over); its prompts apply there",
                 self.job.job_id, k, last + 1, k - 1)

    def timings(self, sink: ResultSink, session: Session | None, *, t0: float, segment_s: float) -> dict[str, float]:
        return {**super().timings(sink, session, t0=t0, segment_s=segment_s), "frames_skipped": float(sink.dropped)}

    def describe(self, attempt: int) -> str:
        job = self.job
        return (f"live job {job.job_id} attempt {attempt}: {job.width}x{job.height} at {job.fps:.2f} fps, "
                f"{len(job.prompts)} prompts")

    @property
    def results_maxlen(self) -> int:
        return self.settings.live_results_maxlen  # a consumer keeps up by XREAD from its last id

    def writer(self, preset: str, threads: int) -> MaskVideoWriter | HlsWriter:
        job, settings = self.job, self.settings
        return HlsWriter(job.render_target, fps=job.fps, width=job.width, height=job.height,
                         segment_s=settings.live_segment_s, window=settings.live_playlist_size, preset=preset,
                         threads=threads, storage_root=settings.storage_root)

    @property
    def stall_s(self) -> float:
        """A live source may be reconnecting: its producer fails the job past source_outage_s."""
        return max(self.settings.stall_s, self.settings.source_outage_s + 4 * self.job.producer_ttl_s)

    def session_frames(self, frames: FrameSource, resume: Resume) -> FrameSource:
        """The frames the session picks (worker/sources/live.py), and the results' side of them."""
        settings = self.settings
        start_after = resume.first_frame - 1
        self.picks = LiveFrames(self.streamed(), max_latency_s=settings.max_latency_s, start_after=start_after,
                                at_edge=start_after >= 0, max_cond_frames=settings.live_max_cond_frames)
        self.results = LiveResults(self.streamed(), start_after=start_after, remove=settings.keep_frames != "on")
        return self.picks.view

    def first_session_frame(self, resume: Resume) -> int:
        return 0  # the session's own numbering: the first frame it picks

    def must_run(self, frames: FrameSource, expected: int) -> bool:
        return True

    def first_prompts(self, resume: Resume) -> Sequence[Prompt]:
        """All on its first frame processed (the producer takes a live job's prompts on frame 0 only)."""
        return [dataclasses.replace(p, frame_idx=0) for p in super().first_prompts(resume)]

    def dropped_before(self, resume: Resume) -> int:
        if not resume.first_frame:
            return 0
        return int(self.ctx.client.hget(self.ctx.keys.job(self.job.job_id), "dropped") or 0)

    def place(self, out: FrameMasks) -> FrameMasks:
        """The frame of the source the session's frame is."""
        assert self.picks is not None
        k = out.source_idx if out.source_idx is not None else self.picks.source_index(out.frame_idx)
        return dataclasses.replace(out, frame_idx=k)

    def passed_over(self, last: int, k: int, sink: ResultSink) -> None:
        """The frames picked over, published as skipped (after `started`: its id comes first)."""
        sink.put_skipped(range(last + 1, k))

    def total(self, last: int, expected: int, frames: FrameSource) -> int:
        return last + 1  # every frame of the source has its entry, processed or skipped

    def completed_line(self, total_s: float, num_frames: int, skipped: int) -> str:
        processed = num_frames - skipped  # frames/s counts what the model processed
        return (f"live job {self.job.job_id} completed after {total_s:.1f} s: processed {processed} of {num_frames} "
                f"frames announced ({processed / max(total_s, 1e-9):.2f} frames/s), {skipped} skipped to keep up")


def kind_of(ctx: WorkerContext, job: ValidJob, *, check: Callable[[], None],
            turn_wait: Callable[[], None]) -> FileJob:
    """The job's kind, chosen once."""
    return (LiveJob if job.live else FileJob)(ctx, job, check=check, turn_wait=turn_wait)
