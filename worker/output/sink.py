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
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from runtime.logs import ContextThread
from schemas import messages
from schemas.errors import RetryableError, StorageError
from worker.broker.publish import ResultPublisher, frame_result
from worker.model.segment import FrameMasks
from worker.output.render import MaskVideoWriter
from worker.sources.frames import FrameSource

log = logging.getLogger(__name__)

_DONE = object()


class SinkAborted(Exception):
    """The sink was aborted (the job stopped) while one of its writes waited out Redis."""

_STEP_S = 0.2  # how often a waiting thread looks at its peer and at the job


def _no_check() -> None:
    return None


def read_frame_bgr(path: Path) -> np.ndarray:
    """A frame's JPEG as BGR for the renderer, or StorageError naming it."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise StorageError(f"cannot read frame {path} for rendering")
    return image


class ResultSink:
    def __init__(self, pub: ResultPublisher, writer: MaskVideoWriter | None, frames: FrameSource, *, random_weights: bool,
                 progress_every: int, on_frame: Callable[[int], None], depth: int = 4,
                 check: Callable[[], None] = _no_check, first_frame: int = 0) -> None:
        self.pub = pub
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

    def put_change(self, entry_id: str, change: messages.ObjectChange) -> None:
        """Queue an object change: written at `entry_id`, after the frames queued before it (stream ids
        only grow, so its place among the frames is its place in the queue)."""
        self._put((entry_id, change))

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
                outs: list[FrameMasks] = []
                for item in batch:  # frames in one round trip, up to an object change, which goes in its place
                    if isinstance(item, FrameMasks):
                        outs.append(item)
                    elif isinstance(item, tuple):
                        if outs:
                            self._handle(outs)
                            outs = []
                        entry_id, change = item
                        self.pub.object_change(entry_id, change, interrupt=self._raise_if_aborted)
                if outs:
                    self._handle(outs)
                if done:
                    return
        except BaseException as e:  # handed to the model's thread at its next put/close
            self.error = e

    def _render(self, writer: MaskVideoWriter, out: FrameMasks) -> None:
        if out.image_rgb is not None:  # decoded already by the segmenter
            writer.write(out.image_rgb, out.obj_ids, out.masks, rgb=True)
            return
        writer.write(read_frame_bgr(self.frames.path(out.frame_idx)), out.obj_ids, out.masks)

    def _handle(self, outs: list[FrameMasks]) -> None:
        t1 = time.monotonic()
        self.pub.frames([frame_result(self.pub.job_id, out, random_weights=self.random_weights) for out in outs],
                        interrupt=self._raise_if_aborted)
        self.batches += 1
        if self.first_result_at is None:
            self.first_result_at = time.monotonic()
        t2 = time.monotonic()
        self.publish_s += t2 - t1
        total = self.frames.total or self.pub.num_frames
        for out in outs:
            t3 = time.monotonic()
            if self.writer is not None:  # None: a masks-only job
                self._render(self.writer, out)
            t4 = time.monotonic()
            self.render_s += t4 - t3
            self.frames_done += 1
            if self.frames_done % self.progress_every == 0 or self.frames_done == total:
                self.pub.progress(self.frames_done, self.frames_done / max(t4 - self._t0, 1e-9),
                                  interrupt=self._raise_if_aborted)
            self.on_frame(self.frames_done)
