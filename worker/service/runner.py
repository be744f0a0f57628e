"""One attempt at one validated job: frames in, the model, results out, the MP4, the terminal entry.

The runner takes a ValidJob (worker/service/job.py): nothing here checks the job again. It opens the
job's frame source, publishes `started`, runs the model on this thread while the sink's thread
publishes and renders (worker/output/sink.py), then closes the MP4 and writes `completed`. Every frame
the model yields and every batch the sink publishes is the job's progress (its lease's renewal).

How it ends: completed; cancelled (the cancel flag came back with a write); failed (a permanent error:
the job's `failed` entry); or it raises, for the caller to retry (a transient error) or to stop (a lost
lease, a shutdown, a broken worker). Whatever stops it, a half-written MP4 is removed.

`check` is the job's view of everything that may stop it: its lease, its cancel flag, the worker's
shutdown. The model's thread, the frame source's waits and the sink's waits all run it.
"""

from __future__ import annotations

import logging
import time

from schemas import messages
from schemas.errors import VsegError
from schemas.names import JobState
from worker.broker.publish import JobCancelled, ResultPublisher
from worker.model.labels import check_labeller
from worker.model.session import Session
from worker.output.hls import HlsWriter
from worker.output.render import MaskVideoWriter
from worker.output.render_policy import remove_stale_partials, render_preset, render_threads
from worker.output.sink import ResultSink
from worker.service.auto_objects import JobObjects
from worker.service.context import WorkerContext
from worker.service.control import ControlFeed
from worker.service.job import ValidJob
from worker.service.job_kinds import kind_of
from worker.service.outcomes import STOPPED, Outcome, outcome_of
from worker.service.resume import Resume, render_published, resume_point, start_text
from worker.sources.frames import FrameSource

log = logging.getLogger(__name__)


class JobRunner:
    def __init__(self, ctx: WorkerContext, job: ValidJob, pub: ResultPublisher, attempt: int) -> None:
        self.ctx, self.job, self.pub, self.attempt = ctx, job, pub, attempt
        self.writer: MaskVideoWriter | HlsWriter | None = None
        self._started: messages.Started | None = None  # a live job's, until its first frame is processed
        self._tracked: int | None = None  # objects on the last frame this attempt published
        self.kind = kind_of(ctx, job, check=self.check, turn_wait=self._step)  # file or live (job_kinds.py)

    def check(self) -> None:
        """Raise if the job must stop: LeaseLost, JobCancelled, HandBack/ForcedExit (worker/service/shutdown.py)."""
        self.pub.lease.check()
        if self.pub.cancel_requested:
            raise JobCancelled()
        self.ctx.shutdown.check()

    def run(self) -> None:
        job, pub, ctx, kind = self.job, self.pub, self.ctx, self.kind
        t0 = time.monotonic()
        log.info("%s", kind.describe(self.attempt))
        pub.lease.progress()
        pub.maxlen = kind.results_maxlen
        try:
            if job.labels:  # a worker whose labeller cannot load fails the job now, in one line (not retried)
                check_labeller(ctx.settings)
            frames = kind.frames()
            resume = resume_point(ctx, job, self.attempt)
            self._started = kind.start(pub, messages.Started(  # a live job's: held until its first frame
                job_id=job.job_id, worker=ctx.name, num_frames=job.num_frames, obj_ids=job.obj_ids,
                model=ctx.segmenter.name, attempt=self.attempt, random_weights=ctx.segmenter.random_weights,
                resume_from=resume.first_frame))
            remove_stale_partials(job.render_target, ctx.name)
            if job.render:  # one MP4, or a live job's rolling HLS (a later attempt goes on with its playlist)
                device = ctx.segmenter.device
                self.writer = kind.writer(render_preset(ctx.settings, device), render_threads(ctx.settings, device))
            if isinstance(self.writer, MaskVideoWriter) and resume.first_frame:
                render_published(ctx, job, frames, self.writer, resume.first_frame, progress=self._step)
            timings, num_frames = self._propagate(frames, t0, resume)
            pub.lease.check()
            pub.lease.progress()
            t_render = time.monotonic()
            if self.writer is not None:
                self.writer.close()
            self.writer = None
            timings["render_close_s"] = time.monotonic() - t_render
            timings["total_s"] = time.monotonic() - t0
            ctx.finish(pub, messages.Completed(
                job_id=job.job_id, render_path=job.render_rel, num_frames=num_frames,
                num_objects=self._tracked if self._tracked is not None else len(job.obj_ids),
                timings_s={k: round(v, 4) for k, v in timings.items()}, random_weights=ctx.segmenter.random_weights,
            ), JobState.COMPLETED)
            log.info("%s", kind.completed_line(timings["total_s"], num_frames, int(timings.get("frames_skipped", 0))))
        except BaseException as e:  # what it means is worker/service/outcomes.py's; the job's end is written here
            self._abort_render()
            outcome = outcome_of(e)
            if outcome is Outcome.CANCELLED:
                ctx.cancelled(pub, job.job_id)
            elif outcome is Outcome.FAIL:
                assert isinstance(e, Exception)
                ctx.fail(pub, job.job_id, e)
            else:
                raise

    def _step(self) -> None:
        """Progress outside the model's loop (the lease's renewal), and a point where the job may stop."""
        self.pub.lease.progress()
        self.check()

    def _abort_render(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None

    def _propagate(self, frames: FrameSource, t0: float, resume: Resume) -> tuple[dict[str, float], int]:
        """Run the model on this thread; publishing and rendering happen in the sink's thread. A live job's
        session sees only the frames it picks, numbered 0, 1, ... (worker/sources/live.py): each result is
        mapped back to its frame of the source, and the frames passed over are published as skipped."""
        job, pub, ctx, kind = self.job, self.pub, self.ctx, self.kind
        metrics = ctx.metrics.job(resume.first_frame)
        session_frames = kind.session_frames(frames, resume)
        live = kind.results

        def published(n: int, skipped: int, latencies: list[float]) -> None:
            pub.lease.progress()
            ctx.health.job(job.job_id, n)
            metrics.published(n, frames.announced_at, skipped=skipped, latencies=latencies)

        feed = ControlFeed(ctx.client, ctx.keys, ctx.settings, job.job_id, reachable=pub.lease.writable,
                           live=kind.live, backfills=kind.backfills)
        objects = JobObjects.of(ctx, job, frames, feed)
        sink = ResultSink(pub, self.writer, frames, random_weights=ctx.segmenter.random_weights,
                          progress_every=ctx.settings.progress_every, on_frame=published, check=self.check,
                          first_frame=resume.first_frame, live=live, dropped=kind.dropped_before(resume),
                          figures=objects.figures)  # its progress events carry the job's --auto figures
        expected = kind.first_session_frame(resume)  # the session's next frame
        last = resume.first_frame - 1  # the job's last frame put to the sink
        feed.load(resume.first_frame)
        feed.start()

        segment_s = 0.0
        session: Session | None = None
        try:
            t_seg = time.monotonic()
            if kind.must_run(frames, expected):  # else all published before
                session = ctx.segmenter.open_session(session_frames, kind.first_prompts(resume), width=job.width,
                                                     height=job.height, start_frame=resume.seed_frame)
                metrics.session_opened()
                ctx.slot.session_open = True
                start_text(session, job, self.attempt)  # a text job's phrases, from its first frame (SAM 3)
                feed.apply(session)  # prompts sent while the job was queued, replays
            for out in session or ():
                assert session is not None
                if out.frame_idx < expected:  # a resumed session's seed frame: published by an earlier attempt
                    feed.apply(session)
                    t_seg = time.monotonic()
                    continue
                frame_s = time.monotonic() - t_seg
                segment_s += frame_s
                metrics.frame_segmented(frame_s, len(out.obj_ids))
                pub.lease.progress()
                self.check()
                if out.frame_idx != expected:
                    raise VsegError(f"segmenter yielded frame {out.frame_idx}, expected {expected}")
                out = kind.place(out)  # the job's frame
                k = out.frame_idx
                if self._started is not None:  # a live job's first frame processed: where its prompts applied
                    kind.first_processed(pub, self._started, k, last)
                    self._started = None
                kind.passed_over(last, k, sink)  # a live job's frames before it, published as skipped
                full, out, key = objects.see(out, expected, live)  # labels, automatic objects' lifecycle
                feed.flush(expected, k, sink)  # changes taking effect here go just before it
                sink.put(out)
                self._tracked = len(out.obj_ids)  # objects tracked on the last frame: `completed`'s num_objects
                last = k
                expected += 1
                objects.after(session, full, key)  # automatic objects ended, or new ones on a keyframe
                feed.apply(session)  # the job's control stream, between two frames
                t_seg = time.monotonic()
            feed.flush(expected, last + 1, sink)  # changes after the last frame
            if session is not None:
                session.close()
            sink.close()
        except BaseException as e:
            if outcome_of(e) in STOPPED:
                sink.abort()  # nothing more may be written
                raise
            try:
                sink.close()  # publish what the model produced before it failed
            except Exception:
                sink.abort()
            raise
        finally:
            feed.stop()
            metrics.close()
            if session is not None:
                session.close()  # the session's state and loaders go whatever ended it
        self.check()
        return kind.timings(sink, session, t0=t0, segment_s=segment_s), kind.total(last, expected, frames)
