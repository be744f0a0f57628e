"""Encode frames with their masks drawn (worker/output/draw.py) as a browser-playable H.264 MP4 (PyAV, libx264).

`MaskVideoWriter` writes to a hidden temporary file next to the target and renames it into place on
`close()`, so a reader never sees a half-written MP4. A full disk (ENOSPC, EDQUOT: PyAV raises
`av.error.OSError` with that errno, from `mux` once its buffer is flushed or from the trailer on close)
is raised as `DiskFull` (retryable: the worker retries the job with backoff), and the temporary file
is removed at once. What it shares with the HLS writer is worker/output/encoded.py.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from worker.output.draw import even_size, partial_path
from worker.output.encoded import EncodedWriter

logger = logging.getLogger(__name__)


class MaskVideoWriter(EncodedWriter):
    """Draws masks on frames and encodes them to an H.264 MP4 at `path`, atomically on close().

    Use as a context manager: a clean exit calls close() (file appears at `path`), an exception calls
    abort() (no file at `path`, temporary file removed). A full disk raises DiskFull naming
    `storage_root` (default: inferred from `path`, see `storage_root_of`), the temporary file already
    removed.
    """

    def __init__(
        self,
        path: Path,
        *,
        fps: float | Fraction,
        width: int,
        height: int,
        codec: str = "libx264",
        crf: int = 20,
        preset: str = "superfast",
        threads: int = 0,
        partial_tag: str = "",
        storage_root: Path | None = None,
    ) -> None:
        super().__init__(path, fps=fps, width=width, height=height, crf=crf, storage_root=storage_root)
        self.path = self.target
        self._tmp = partial_path(self.path, partial_tag)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # format="mp4" because the temporary name does not end in .mp4; +faststart moves the index
            # to the front so browsers can start playing before the download ends.
            self._container = av.open(str(self._tmp), mode="w", format="mp4", options={"movflags": "+faststart"})
        except OSError as e:
            full = self._disk_full(e)
            self._tmp.unlink(missing_ok=True)
            if full is None:
                raise
            raise full from e
        self._add_stream(codec, time_base=1 / self.rate, threads=threads,
                         options={"crf": str(crf), "preset": preset, "profile": "high"})
        logger.debug("rendering %s: %dx%d (encoded %s) at %s fps, codec %s crf %d", self.path, width, height,
                     "x".join(map(str, even_size(width, height))), self.rate, codec, crf)

    def _stamp(self, video_frame: Any, at_s: float | None) -> None:
        """At the fixed rate, frame after frame (`at_s` unused)."""
        video_frame.pts = self.frames_written
        video_frame.time_base = 1 / self.rate

    def _finish(self) -> None:
        os.replace(self._tmp, self.path)

    def _after_discard(self) -> None:
        self._tmp.unlink(missing_ok=True)

    @property
    def _written_path(self) -> Path:
        return self._tmp
