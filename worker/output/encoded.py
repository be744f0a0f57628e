"""What both renders share (`render.MaskVideoWriter`, an MP4; `hls.HlsWriter`, a rolling HLS stream): masks drawn
and encoded frame by frame into a PyAV container, one write at a time (a write runs on the result path's
thread, an abort may come from the job's), a full disk raised as DiskFull with the space freed, close and
abort, and a context manager (a clean exit closes, an exception aborts).

A subclass opens its container (`_container`), then calls `_add_stream`; it says how a frame is timed
(`_stamp`), what closing adds once the container is closed (`_finish`: the MP4's rename, the playlist's ENDLIST),
what an abort flushes first (`_flush_on_abort`) and what a discard undoes after the container is closed
(`_after_discard`: the MP4's temporary file, the playlist's missing segments).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import av
import numpy as np

from runtime.faults import disk_fault
from schemas.errors import DiskFull
from worker.output.draw import encoder_frame, even_size, frame_rate, storage_root_of

logger = logging.getLogger(__name__)


class RenderAborted(RuntimeError):
    """A frame was written after the render was aborted (the job stopped while its result path wrote)."""


class EncodedWriter(ABC):
    """The shared half of a render writer (see the module doc). `target` is what a reader opens: the MP4, or
    the playlist; `what` names the render in messages ("render", "HLS render")."""

    what = "render"

    def __init__(self, target: Path, *, fps: float | Fraction, width: int, height: int, crf: int,
                 storage_root: Path | None) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"width and height must be > 0, but got {width}x{height}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in 0..51 (lower is better quality), but got {crf}")
        self.target = Path(target)
        self.width = width
        self.height = height
        self.rate = frame_rate(fps)
        self.frames_written = 0
        self.storage_root = Path(storage_root) if storage_root is not None else storage_root_of(self.target)
        self._closed = False
        self._discarded = False  # aborted, or failed: the container is closed and writes are refused
        self._lock = threading.RLock()
        self._container: Any = None
        self._stream: Any = None

    def _add_stream(self, codec: str, *, time_base: Fraction, threads: int, options: dict[str, object]) -> None:
        """The video stream, yuv420p at an even size (odd sizes grow by one pixel); the container is discarded
        if the encoder refuses."""
        enc_width, enc_height = even_size(self.width, self.height)
        try:
            stream = cast("av.VideoStream", self._container.add_stream(codec, rate=self.rate))
            stream.width = enc_width
            stream.height = enc_height
            stream.pix_fmt = "yuv420p"
            stream.codec_context.time_base = time_base
            if threads > 0:  # 0: the encoder's own choice (one per core, and more)
                stream.codec_context.thread_count = threads
            if codec == "libx264":
                stream.options = options
            self._stream = stream
        except Exception:
            self._discard()
            raise

    def write(self, frame: np.ndarray, obj_ids: Sequence[int], masks: np.ndarray, *, rgb: bool = False,
              at_s: float | None = None, names: Mapping[int, str] | None = None) -> None:
        """Draw `masks` on `frame` (BGR, or RGB when `rgb`) and encode it as the next video frame (`at_s`: when
        it is shown, for writers that time frames; see `_stamp`)."""
        if self._closed:
            raise ValueError(f"cannot write to {self.target}: the writer is closed")
        self._check_at(at_s)
        video_frame = encoder_frame(frame, obj_ids, masks, (self.width, self.height), rgb=rgb, names=names)
        with self._lock:
            if self._discarded:
                raise RenderAborted(f"the {self.what} of {self.target} was aborted; frame {self.frames_written} "
                                    "not written")
            self._stamp(video_frame, at_s)
            try:
                self._mux(self._stream.encode(video_frame))
            except OSError as e:  # a full disk: stop here and free what can be freed
                full = self._disk_full(e)
                if full is None:
                    raise
                self._discard()
                raise full from e
            self.frames_written += 1

    def close(self) -> Path:
        """Flush the encoder, close the container and finish the target (`_finish`); returns it."""
        with self._lock:
            if self._discarded:
                raise ValueError(f"cannot close {self.target}: its {self.what} was aborted, {self._nothing_there}")
            if self._closed:
                return self.target
            if self.frames_written == 0:
                self.abort()
                raise ValueError(f"no frames were written to {self.target}; {self._needs_a_frame}")
            try:
                self._mux(self._stream.encode(None))
                self._container.close()
                self._finish()
            except BaseException as e:
                full = self._disk_full(e)  # before the discard: the free space as the write found it
                self._discard()
                if full is None:
                    raise
                raise full from e
            self._closed = True
        logger.info("rendered %d frames to %s", self.frames_written, self.target)
        return self.target

    def abort(self) -> None:
        """Stop without finishing the target (`_flush_on_abort` first). Idempotent, and safe from another
        thread (it waits for a write in progress)."""
        with self._lock:
            if self._closed:
                return
            self._flush_on_abort()
            self._discard()
        logger.info("aborted %s of %s after %d frames%s", self.what, self.target, self.frames_written,
                    self._aborted_note)

    def _discard(self) -> None:
        """Close the container (PyAV closes its files even when the trailer fails, a full disk) and refuse
        further writes, then `_after_discard`. Idempotent, and safe from two threads."""
        with self._lock:
            if self._discarded:
                return
            self._closed = self._discarded = True
            if self._container is not None:
                try:
                    self._container.close()
                except Exception as e:  # what follows only needs the files closed
                    logger.debug("closing the container of %s failed while stopping: %s", self.target, e,
                                 exc_info=self._disk_full(e) is None)  # a full disk is expected here: no trace
            self._after_discard()

    def _disk_full(self, error: BaseException) -> DiskFull | None:
        """DiskFull (STORAGE_ROOT, its free space, what to do) for ENOSPC or EDQUOT (PyAV's av.error.OSError
        carries the errno), else None."""
        return disk_fault(error, self._written_path, self.storage_root)

    def _mux(self, packets: list[Any]) -> None:
        for packet in packets:
            self._container.mux(packet)

    def _check_at(self, at_s: float | None) -> None:
        """Refuse a bad `at_s` before any work (writers that time frames)."""
        return None

    def _flush_on_abort(self) -> None:
        """What an abort keeps before the discard (nothing, by default)."""
        return None

    @property
    def _written_path(self) -> Path:
        """The file being written (a full disk is reported for it)."""
        return self.target

    _nothing_there = "nothing was written there"
    _needs_a_frame = "a render needs at least one frame"
    _aborted_note = ""

    @abstractmethod
    def _stamp(self, video_frame: Any, at_s: float | None) -> None:
        """Set the frame's pts and time base."""

    @abstractmethod
    def _finish(self) -> None:
        """After the container closed cleanly: make the target whole."""

    @abstractmethod
    def _after_discard(self) -> None:
        """After the container closed on a discard: remove or repair what must not stay."""

    def __enter__(self) -> EncodedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
