"""The result path, off the model's thread: RLE encoding, fenced Redis writes and MP4 rendering run in
a thread fed through a small bounded queue, so the model never waits on them (unless the sink falls a
whole queue behind, which bounds memory). Frames that are waiting when the sink turns to the queue
are published together, in one pipelined round trip to Redis.

No wait between the two threads is unbounded: `put` and `close` wait in short steps, and between
steps re-raise the sink's error, notice a sink thread that has ended, and run the job's `check` (a
lost lease, a cancel, a shutdown deadline), so the model's thread never blocks on a queue whose
consumer is gone."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import msgspec
import numpy as np

from runtime.logs import ContextThread
from schemas import messages
from schemas.errors import RetryableError, StorageError
from worker.broker.publish import ResultPublisher, frame_result
from worker.model.segment import FrameMasks
from worker.output.hls import HlsWriter
from worker.output.render import MaskVideoWriter
from worker.sources.frames import FrameSource
from worker.sources.live import LiveResults

log = logging.getLogger(__name__)

_DONE = object()


class SinkAborted(Exception):
    """The sink was aborted (the job stopped) while one of its writes waited out Redis."""

_STEP_S = 0.2  # how often a waiting thread looks at its peer and at the job
LIVE_PROGRESS_MIN_S = 1.0  # a live job's progress events come at most this often
LATENCY_WINDOW = 300  # a live job's latency percentiles are over its last this many processed frames

OnFrame = Callable[[int, int, list[float]], None]  # frames done, of which newly skipped, new latencies (live)


@dataclass(frozen=True)
class Update:
    """An object's mask on a frame already published (Session.backfill, worker/model/session.py), at a fixed entry id."""

    entry_id: str
    msg: messages.FrameUpdate


@dataclass(frozen=True)
class Skipped:
    """Frames of a live job passed over to keep up with the source: each gets a `skipped` entry."""

    frames: range


def _no_check() -> None:
    return None


def read_frame_bgr(path: Path) -> np.ndarray:
    """A frame's JPEG as BGR for the renderer, or StorageError naming it."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise StorageError(f"cannot read frame {path} for rendering")
    return image


class ResultSink:
    """`live`: a live job's result side (worker/sources/live.py): its entries carry captured_at, pts and
    latency, frames passed over are `Skipped`, JPEGs go once published, and the render is rolling HLS."""

    def __init__(self, pub: ResultPublisher, writer: MaskVideoWriter | HlsWriter | None, frames: FrameSource, *,
                 random_weights: bool, progress_every: int, on_frame: OnFrame, depth: int = 4,
                 check: Callable[[], None] = _no_check, first_frame: int = 0, live: LiveResults | None = None,
                 dropped: int = 0, figures: Callable[[], dict[str, int]] = dict) -> None:
        self.pub = pub
        self.live = live
        self.dropped = dropped  # live: frames skipped (by earlier attempts too)
        self.dropped_at_ingest = 0  # live: frames the producer dropped before announcing, as of the last published
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._render_t0: float | None = None  # live: the capture time the HLS render's clock starts at
        self._processed = 0  # live: frames processed (not skipped) by this attempt
        self._progress_at = 0.0
        self.figures = figures  # more progress fields (a job's --auto figures), read at each progress event
        self._figures_sent: dict[str, int] = {}
        self.writer = writer
        self.frames = frames
        self.random_weights = random_weights
        self.progress_every = progress_every
        self.on_frame = on_frame
        self.check = check
        self._aborted = threading.Event()
        self.queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.frames_done = first_frame  # a resumed job's frames before it were published by an earlier attempt
        self.first_result_at: float | None = None
        self.publish_s = 0.0
        self.render_s = 0.0
        self.batches = 0  # round trips made for frame entries
        self._t0 = time.monotonic()
        self._thread = ContextThread(target=self._run, daemon=True, name=f"sink-{pub.job_id}")
        self._thread.start()

    def put(self, out: FrameMasks) -> None:
        """Queue one frame's masks (blocks only when the sink is `depth` frames behind)."""
        self._put(out)

    def put_skipped(self, frames: range) -> None:
        """Queue a live job's frames passed over (nothing if `frames` is empty)."""
        if frames:
            self._put(Skipped(frames))

    def put_update(self, entry_id: str, update: messages.FrameUpdate) -> None:
        """Queue an `update` entry: written at `entry_id`, in its place among the frames (as a change)."""
        self._put(Update(entry_id, update))

    def put_change(self, entry_id: str, change: messages.ObjectChange, command_id: str = "") -> None:
        """Queue an object change: written at `entry_id`, after the frames queued before it (stream ids
        only grow, so its place among the frames is its place in the queue)."""
        self._put((entry_id, change, command_id))

    def _put(self, item: object) -> None:
        while True:
            self.raise_error()
            try:
                self.queue.put(item, timeout=_STEP_S)
                return
            except queue.Full:
                self._check_peer()

    def _check_peer(self) -> None:
        self.raise_error()
        if not self._thread.is_alive():
            raise RetryableError(f"the result sink of job {self.pub.job_id} stopped without finishing")
        self.check()

    def _raise_if_aborted(self) -> None:
        if self._aborted.is_set():
            raise SinkAborted(f"the result sink of job {self.pub.job_id} was aborted: nothing more is written")

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Wait until every queued frame is published and rendered; re-raise the sink's error."""
        self._put(_DONE)
        while self._thread.is_alive():
            self._thread.join(_STEP_S)
            if self._thread.is_alive():
                self.raise_error()
                self.check()
        self.raise_error()

    def abort(self, timeout_s: float = 0.25) -> None:
        """Stop the sink: nothing queued is written. Waits up to `timeout_s` for its thread (one blocked in a
        Redis call ends by itself: every write checks the lease first)."""
        self.error = self.error or RuntimeError("aborted")
        self._aborted.set()
        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass
        try:
            self.queue.put_nowait(_DONE)
        except queue.Full:
            pass
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        try:
            while True:
                batch = [self.queue.get()]
                while len(batch) < self.queue.maxsize:  # frames already waiting go out in one round trip
                    try:
                        batch.append(self.queue.get_nowait())
                    except queue.Empty:
                        break
                done = any(item is _DONE for item in batch)
                if self.error is not None:
                    return
                outs: list[FrameMasks | Skipped] = []
                for item in batch:  # frames in one round trip, up to an object change, which goes in its place
                    if isinstance(item, (FrameMasks, Skipped)):
                        outs.append(item)
                    elif isinstance(item, (tuple, Update)):
                        if outs:
                            self._handle(outs)
                            outs = []
                        if isinstance(item, Update):
                            self.pub.update(item.entry_id, item.msg, interrupt=self._raise_if_aborted)
                            continue
                        entry_id, change, command_id = item
                        self.pub.object_change(entry_id, change, command_id, interrupt=self._raise_if_aborted)
                if outs:
                    self._handle(outs)
                if done:  # a live job's final figures (the hash and a last progress event) agree with its
                    # `completed`; so do a job's --auto figures, when a keyframe came after its last progress
                    if self.live is not None or self.figures() != self._figures_sent:
                        self._progress(time.monotonic())
                    return
        except BaseException as e:  # handed to the model's thread at its next put/close
            self.error = e

    def _render(self, writer: MaskVideoWriter | HlsWriter, out: FrameMasks) -> None:
        # a live frame processed was taken by the session: renamed (worker/sources/live.py)
        path = self.live.streamed.taken_path(out.frame_idx) if self.live is not None else self.frames.path(out.frame_idx)
        image = out.image_rgb if out.image_rgb is not None else read_frame_bgr(path)
        rgb = out.image_rgb is not None  # decoded already by the segmenter
        names = {obj_id: label for obj_id, (label, _) in out.labels.items()} if out.labels else None
        info = self.live.info(out.frame_idx) if self.live is not None else None  # a live frame: when captured
        at_s = None
        if info is not None:
            self._render_t0 = info.time if self._render_t0 is None else self._render_t0
            at_s = info.time - self._render_t0
        writer.write(image, out.obj_ids, out.masks, rgb=rgb, at_s=at_s, names=names)

    def _results(self, outs: list[FrameMasks | Skipped]) -> list[messages.FrameResult]:
        """The entries of these frames; a live job's with when each was captured and (processed ones) its
        latency, measured now, just before the write."""
        job_id, live = self.pub.job_id, self.live
        results: list[messages.FrameResult] = []
        now = time.time()
        for out in outs:
            if isinstance(out, Skipped):
                for k in out.frames:
                    info = live.info(k) if live is not None else None
                    results.append(messages.FrameResult(
                        job_id, k, (), random_weights=self.random_weights, skipped=True,
                        captured_at=info.time if info is not None else None,
                        pts_s=info.pts_s if info is not None else None))
                continue
            result = frame_result(job_id, out, random_weights=self.random_weights)
            if live is not None and (info := live.info(out.frame_idx)) is not None:
                self.dropped_at_ingest = max(self.dropped_at_ingest, info.dropped_at_ingest)
                result = msgspec.structs.replace(result, captured_at=info.time, pts_s=info.pts_s,
                                                 latency_s=round(max(0.0, now - info.time), 6))
            results.append(result)
        return results

    def _handle(self, outs: list[FrameMasks | Skipped]) -> None:
        t1 = time.monotonic()
        results = self._results(outs)
        self.pub.frames(results, interrupt=self._raise_if_aborted)
        self.batches += 1
        if self.first_result_at is None:
            self.first_result_at = time.monotonic()
        t2 = time.monotonic()
        self.publish_s += t2 - t1
        total = self.frames.total or self.pub.num_frames
        latencies = {r.frame_idx: r.latency_s for r in results if r.latency_s is not None}
        for out in outs:
            t3 = time.monotonic()
            skipped = len(out.frames) if isinstance(out, Skipped) else 0
            last = out.frames[-1] if isinstance(out, Skipped) else out.frame_idx
            if self.writer is not None and isinstance(out, FrameMasks):  # None: a masks-only job
                self._render(self.writer, out)
            t4 = time.monotonic()
            self.render_s += t4 - t3
            before = self.frames_done
            self.frames_done += skipped or 1
            self.dropped += skipped
            new = [latencies[last]] if not skipped and last in latencies else []
            self.latencies.extend(new)
            if self.live is not None:
                self.live.release_through(last)
            if self._progress_due(before, skipped, total):
                self._progress(t4)
            self.on_frame(self.frames_done, skipped, new)

    def _progress_due(self, before: int, skipped: int, total: int) -> bool:
        """Every progress_every frames (and at the last); a live job's every progress_every processed frames,
        skips not counted, and at most once a second: a camera runs for days and vseg:events is shared."""
        if self.live is None:
            return self.frames_done // self.progress_every > before // self.progress_every or self.frames_done == total
        if skipped:
            return False
        self._processed += 1
        now = time.monotonic()
        if self._processed % self.progress_every or now - self._progress_at < LIVE_PROGRESS_MIN_S:
            return False
        self._progress_at = now
        return True

    def _progress(self, now: float) -> None:
        fps = self.frames_done / max(now - self._t0, 1e-9)
        figures = self._figures_sent = self.figures()
        if self.live is None:
            self.pub.progress(self.frames_done, fps, interrupt=self._raise_if_aborted, **figures)
            return
        p50 = p95 = None
        if self.latencies:
            p50, p95 = (round(float(x), 4) for x in np.percentile(np.fromiter(self.latencies, float), [50, 95]))
        outages, down_s = self.live.outages
        down_since = self.live.streamed.down_since
        self.pub.progress(self.frames_done, fps, interrupt=self._raise_if_aborted, dropped=self.dropped,
                          latency_p50_s=p50, latency_p95_s=p95, source_outages=outages,
                          source_down_s=round(down_s, 3), source_state="up" if down_since is None else "down",
                          source_down_since=down_since, dropped_at_ingest=self.dropped_at_ingest, **figures)
