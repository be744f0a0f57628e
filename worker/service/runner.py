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

import dataclasses
import logging
import time
from collections.abc import Sequence

import msgspec

from schemas import messages
from schemas.errors import PermanentError, VsegError, WorkerBroken
from schemas.names import JobState
from schemas.prompts import ObjectPrompt
from worker.broker.attempts import is_transient
from worker.broker.lease import LeaseLost
from worker.broker.publish import JobCancelled, ResultPublisher, object_result
from worker.model.labels import check_labeller
from worker.model.session import MaskPrompt, Prompt, Session
from worker.output.hls import HlsWriter
from worker.output.render import MaskVideoWriter
from worker.output.render_policy import remove_stale_partials, render_preset, render_threads
from worker.output.sink import ResultSink
from worker.service.auto_objects import JobObjects
from worker.service.backfill import backfill
from worker.service.context import WorkerContext
from worker.service.control import ControlFeed
from worker.service.job import FrameSourceKind, ValidJob
from worker.service.resume import Resume, render_published, resume_point
from worker.service.shutdown import HandBack
from worker.sources.frames import DirFrames, FrameSource, StreamedFrames
from worker.sources.live import LiveFrames, LiveResults

log = logging.getLogger(__name__)

STOPS = (LeaseLost, HandBack, JobCancelled, WorkerBroken)  # end the attempt; nothing more may be written


def fail(ctx: WorkerContext, pub: ResultPublisher, job_id: str, error: Exception) -> None:
    """End the job `failed` with `error` (a permanent error, or one we did not expect: logged in full)."""
    level = logging.WARNING if isinstance(error, VsegError) else logging.ERROR
    log.log(level, "job %s failed: %s: %s", job_id, type(error).__name__, error, exc_info=level == logging.ERROR)
    ctx.finish(pub, messages.Failed(job_id, str(error), type(error).__name__), JobState.FAILED,
               error=f"{type(error).__name__}: {error}")


class JobRunner:
    def __init__(self, ctx: WorkerContext, job: ValidJob, pub: ResultPublisher, attempt: int) -> None:
        self.ctx = ctx
        self.job = job
        self.pub = pub
        self.attempt = attempt
        self.writer: MaskVideoWriter | HlsWriter | None = None
        self._started: messages.Started | None = None  # a live job's, until its first frame is processed
        self._tracked: int | None = None  # objects on the last frame this attempt published

    def check(self) -> None:
        """Raise if the job must stop: LeaseLost, JobCancelled, HandBack/ForcedExit (worker/service/shutdown.py)."""
        self.pub.lease.check()
        if self.pub.cancel_requested:
            raise JobCancelled()
        self.ctx.shutdown.check()

    def run(self) -> None:
        job, pub, ctx = self.job, self.pub, self.ctx
        t0 = time.monotonic()
        if job.live:
            log.info("live job %s attempt %d: %dx%d at %.2f fps, %d prompts", job.job_id, self.attempt, job.width,
                     job.height, job.fps, len(job.prompts))
        else:
            log.info("job %s attempt %d: %d frames %dx%d, %d prompts", job.job_id, self.attempt, job.num_frames,
                     job.width, job.height, len(job.prompts))
        pub.lease.progress()
        if job.live:  # unbounded: its result stream is trimmed (a consumer keeps up by XREAD from its last id)
            pub.maxlen = ctx.settings.live_results_maxlen
        try:
            if job.labels:  # a worker whose labeller cannot load fails the job now, in one line (not retried)
                check_labeller(ctx.settings)
            frames = self._frames()
            resume = resume_point(ctx, job, self.attempt)
            started = messages.Started(
                job_id=job.job_id, worker=ctx.name, num_frames=job.num_frames, obj_ids=job.obj_ids,
                model=ctx.segmenter.name, attempt=self.attempt, random_weights=ctx.segmenter.random_weights,
                resume_from=resume.first_frame,
            )
            if job.live:  # its `started` says which frame it processed first: written then (_propagate)
                pub.set_state(state=JobState.RUNNING.value, worker=ctx.name, started_at=started.at)
                self._started = started
            else:
                pub.started(started)
            remove_stale_partials(job.render_target, ctx.name)
            if job.render:
                self.writer = self._writer()
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
            if job.live:  # frames/s counts what the model processed, not the frames skipped to keep up
                processed = num_frames - int(timings.get("frames_skipped", 0))
                log.info("live job %s completed after %.1f s: processed %d of %d frames announced (%.2f frames/s), "
                         "%d skipped to keep up", job.job_id, timings["total_s"], processed, num_frames,
                         processed / max(timings["total_s"], 1e-9), num_frames - processed)
            else:
                log.info("job %s completed in %.1f s (%.2f frames/s)", job.job_id, timings["total_s"],
                         num_frames / max(timings["total_s"], 1e-9))
        except JobCancelled:
            self._abort_render()
            log.warning("job %s cancelled", job.job_id)
            frames_done = int(ctx.client.hget(ctx.keys.job(job.job_id), "frames_done") or 0)
            ctx.finish(pub, messages.Cancelled(job.job_id, frames_done), JobState.CANCELLED)
        except STOPS:
            self._abort_render()
            raise
        except Exception as e:
            self._abort_render()
            if is_transient(e) and not isinstance(e, PermanentError):
                raise
            fail(ctx, pub, job.job_id, e)

    def _writer(self) -> MaskVideoWriter | HlsWriter:
        """The job's render: one MP4, or a live job's rolling HLS (a later attempt goes on with its playlist)."""
        job, settings = self.job, self.ctx.settings
        device = self.ctx.segmenter.device
        preset, threads = render_preset(settings, device), render_threads(settings, device)
        if job.live:
            return HlsWriter(job.render_target, fps=job.fps, width=job.width, height=job.height,
                             segment_s=settings.live_segment_s, window=settings.live_playlist_size, preset=preset,
                             threads=threads, storage_root=settings.storage_root)
        return MaskVideoWriter(job.render_target, fps=job.fps, width=job.width, height=job.height, preset=preset,
                               threads=threads, partial_tag=self.ctx.name, storage_root=settings.storage_root)

    def _step(self) -> None:
        """Progress outside the model's loop (the lease's renewal), and a point where the job may stop."""
        self.pub.lease.progress()
        self.check()

    def _abort_render(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None

    def _streamed(self) -> StreamedFrames:
        job, ctx = self.job, self.ctx
        stall_s = ctx.settings.stall_s
        if job.live:  # a live source may be reconnecting: the producer fails the job past source_outage_s
            stall_s = max(stall_s, ctx.settings.source_outage_s + 4 * job.producer_ttl_s)
        frames = StreamedFrames(ctx.client, ctx.keys.frames(job.job_id), job.frames_dir,
                                block_ms=ctx.settings.block_ms, stall_s=stall_s,
                                producer_key=ctx.keys.producer(job.job_id), producer_ttl_s=job.producer_ttl_s,
                                check=self.check, live_source=job.live,
                                turn_wait=self._step)  # waiting for a turn on a shared model is not a stall
        return frames

    def _frames(self) -> FrameSource:
        job = self.job
        if job.source is FrameSourceKind.STREAM:
            return self._streamed()
        return DirFrames(job.frames_dir, job.num_frames, check=self.check, turn_wait=self._step)

    def _live(self, resume: Resume) -> tuple[LiveFrames, LiveResults]:
        """A live job's two sides (worker/sources/live.py): the session's picks, and the results'."""
        settings = self.ctx.settings
        start_after = resume.first_frame - 1
        picks = LiveFrames(self._streamed(), max_latency_s=settings.max_latency_s, start_after=start_after,
                           at_edge=start_after >= 0, max_cond_frames=settings.live_max_cond_frames)
        return picks, LiveResults(self._streamed(), start_after=start_after, remove=settings.keep_frames != "on")

    def _propagate(self, frames: FrameSource, t0: float, resume: Resume) -> tuple[dict[str, float], int]:
        """Run the model on this thread; publishing and rendering happen in the sink's thread. A live job's
        session sees only the frames it picks, numbered 0, 1, ... (worker/sources/live.py): each result is
        mapped back to its frame of the source, and the frames passed over are published as skipped."""
        job, pub, ctx = self.job, self.pub, self.ctx
        metrics = ctx.metrics.job(resume.first_frame)
        picks, live = self._live(resume) if job.live else (None, None)

        def published(n: int, skipped: int, latencies: list[float]) -> None:
            pub.lease.progress()
            ctx.health.job(job.job_id, n)
            metrics.published(n, frames.announced_at, skipped=skipped, latencies=latencies)

        sink = ResultSink(pub, self.writer, frames, random_weights=ctx.segmenter.random_weights,
                          progress_every=ctx.settings.progress_every, on_frame=published, check=self.check,
                          first_frame=resume.first_frame, live=live, dropped=self._dropped_before(resume))
        expected = 0 if picks is not None else resume.first_frame  # the session's next frame
        last = resume.first_frame - 1  # the job's last frame put to the sink
        feed = ControlFeed(ctx.client, ctx.keys, ctx.settings, job.job_id, reachable=pub.lease.writable,
                           live=job.live)
        feed.load(resume.first_frame)
        feed.start()
        objects = JobObjects.of(ctx, job, frames, feed)
        sink.figures = objects.figures  # its progress events carry the job's --auto figures

        def backfilled(prompt: ObjectPrompt, position: int, request_id: str) -> MaskPrompt | None:
            """A prompt on a frame already published (worker/service/backfill.py); None where the model runs
            ahead of what is published (a model process)."""
            if session is None or position != expected:
                return None
            done = backfill(ctx.segmenter, frames, prompt, upto=position, width=job.width, height=job.height)
            for entry_id, k in zip(feed.reserve(position, position), range(position)):
                result = object_result(prompt.obj_id, done.masks[k], done.scores[k])
                sink.put_update(entry_id, messages.FrameUpdate(job.job_id, k, (result,), request_id=request_id))
            return MaskPrompt(prompt.obj_id, position, done.seed)

        if not job.live:
            feed.backfill = backfilled
        segment_s = 0.0
        session: Session | None = None
        try:
            t_seg = time.monotonic()
            if picks is not None or frames.total is None or expected < frames.total:  # else all published before
                session = ctx.segmenter.open_session(picks.view if picks is not None else frames,
                                                     self._first_prompts(resume), width=job.width, height=job.height,
                                                     start_frame=resume.seed_frame)
                metrics.session_opened()
                ctx.slot.session_open = True
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
                k = out.frame_idx
                if picks is not None:  # the frame of the source, and those passed over before it
                    k = out.source_idx if out.source_idx is not None else picks.source_index(out.frame_idx)
                    if self._started is not None:  # the first frame processed: where the prompts applied
                        pub.started(msgspec.structs.replace(self._started, first_frame=k))
                        log.info("live job %s: first frame processed %d (frames %d..%d passed over); its prompts "
                                 "apply there", job.job_id, k, last + 1, k - 1)
                        self._started = None
                    sink.put_skipped(range(last + 1, k))
                    out = dataclasses.replace(out, frame_idx=k)
                full, out, key = objects.see(out, expected, live)  # labels, automatic objects' lifecycle
                feed.flush(expected, k, sink.put_change)  # changes taking effect here go just before it
                sink.put(out)
                self._tracked = len(out.obj_ids)  # objects tracked on the last frame: `completed`'s num_objects
                last = k
                expected += 1
                objects.after(session, full, key)  # automatic objects ended, or new ones on a keyframe
                feed.apply(session)  # the job's control stream, between two frames
                t_seg = time.monotonic()
            feed.flush(expected, last + 1, sink.put_change)  # changes after the last frame
            if session is not None:
                session.close()
            sink.close()
        except STOPS:
            sink.abort()  # nothing more may be written
            raise
        except BaseException:
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
        if picks is not None:
            total = last + 1  # every frame of the source has its entry, processed or skipped
        else:
            total = frames.total if frames.total is not None else expected
            if expected != total:
                raise VsegError(f"segmenter stopped after {expected} of {total} frames")
        timings = {
            "first_result_s": (sink.first_result_at or time.monotonic()) - t0,
            "segment_s": segment_s,
            "publish_s": sink.publish_s,
            "render_s": sink.render_s,
        }
        if picks is not None:
            timings["frames_skipped"] = float(sink.dropped)
        for name in ("waited_s",):  # the model's wait for frames (the producer, or the loaders), when known
            if session is not None and name in session.stats:
                timings[f"frames_{name}"] = session.stats[name]
        return timings, total

    def _first_prompts(self, resume: Resume) -> Sequence[Prompt]:
        """What the session starts with: a resumed job's seeds, else the job's prompts; a live job's all on its
        first frame processed (the producer takes a live job's prompts on frame 0 only)."""
        prompts: Sequence[Prompt] = resume.prompts if resume.prompts or resume.no_objects else self.job.prompts
        if self.job.live:
            prompts = [dataclasses.replace(p, frame_idx=0) for p in prompts]
        return prompts

    def _dropped_before(self, resume: Resume) -> int:
        """A resumed live job's frames skipped by earlier attempts (its progress counts all of them)."""
        if not self.job.live or not resume.first_frame:
            return 0
        return int(self.ctx.client.hget(self.ctx.keys.job(self.job.job_id), "dropped") or 0)
