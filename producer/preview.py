"""A live job's preview: every frame its producer captures, upright, without masks, as a rolling HLS stream
the web viewer plays (producer/ui) and draws the result stream's masks on, so the whole video is seen and
not only the frames the worker processed (the worker's own HLS render holds only those).

Each segment is its own MPEG-TS file with its own H.264 encoder (x264 `ultrafast`, `zerolatency`: no frame
held back), so it starts with a keyframe and is complete the moment it is closed; the playlist is written
here, not by FFmpeg's HLS muxer, because each segment's `#EXT-X-PROGRAM-DATE-TIME` must be the capture time
of its first frame, to the millisecond: a player's `playingDate` (hls.js) is then the `captured_at` of the
frame shown, and the viewer picks the result frame with that `captured_at`. PTS run on from segment to
segment, from the capture times, so the stream's clock is the camera's.

Bounded: the playlist lists the last `window` segments and older files are deleted. Atomic: a segment is
written as `.ts.tmp` and renamed once closed, the playlist written to a temporary file and renamed, so a
reader never sees half of either. Best effort: the preview must never cost the job anything, so a failure
(a full disk, an encoder error) is logged once and the preview stops; the job goes on.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from producer.orientation import Orientation

log = logging.getLogger(__name__)

TICKS_PER_S = 90_000
PLAYLIST = "index.m3u8"


@dataclass(frozen=True)
class _Segment:
    name: str
    first_at: float  # capture time of its first frame (Unix seconds)
    duration_s: float


def preview_size(width: int, height: int, max_height: int) -> tuple[int, int]:
    """The preview's (width, height): the displayed size scaled to at most `max_height` lines, both even."""
    scale = min(1.0, max_height / height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


class PreviewWriter:
    """Rolling HLS of captured frames at `folder/index.m3u8` (see the module doc). `width`x`height` is the
    frame as displayed; `orientation` turns a decoded (stored) frame into it."""

    def __init__(self, folder: Path, *, width: int, height: int, orientation: Orientation, max_height: int = 480,
                 segment_s: float = 2.0, window: int = 6, fps: float = 30.0) -> None:
        self.folder, self.orientation = folder, orientation
        self.size = preview_size(width, height, max_height)
        self.segment_s, self.window, self.fps = segment_s, window, fps if math.isfinite(fps) and fps > 0 else 30.0
        self.listed: list[_Segment] = []
        self.failed = False
        self.frames_written = 0
        self._container: av.container.OutputContainer | None = None
        self._stream: av.VideoStream | None = None
        self._seq = 0
        self._first_at = self._last_at = self._t0 = 0.0
        self._last_pts = -1
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def playlist(self) -> Path:
        return self.folder / PLAYLIST

    def write(self, frame: av.VideoFrame, captured_at: float) -> None:
        """Add a captured frame (decoded, as stored). Never raises: a failure stops the preview."""
        if self.failed:
            return
        try:
            self._write(frame, captured_at)
        except (OSError, ValueError, av.error.FFmpegError) as e:
            self.failed = True
            log.warning("live preview %s stopped (the job goes on without it): %s", self.playlist, e)
            self._drop_open_segment()

    def close(self) -> None:
        """Close the last segment and end the playlist (`#EXT-X-ENDLIST`)."""
        if self.failed:
            return
        try:
            if self._container is not None:
                self._close_segment(self._last_at + 1 / self.fps)
            if self.listed:
                self._write_playlist(ended=True)
        except (OSError, ValueError, av.error.FFmpegError) as e:
            log.warning("live preview %s: its last segment is lost (%s)", self.playlist, e)
            self._drop_open_segment()

    def _write(self, frame: av.VideoFrame, captured_at: float) -> None:
        if self.frames_written == 0:
            self._t0 = captured_at
        if self._container is not None and captured_at - self._first_at >= self.segment_s:
            self._close_segment(captured_at)
        if self._container is None:
            self._open_segment(captured_at)
        assert self._container is not None and self._stream is not None
        picture = self._picture(frame)
        pts = max(self._last_pts + 1, round((captured_at - self._t0) * TICKS_PER_S))
        picture.pts, picture.time_base = pts, Fraction(1, TICKS_PER_S)
        self._last_pts, self._last_at = pts, captured_at
        for packet in self._stream.encode(picture):
            self._container.mux(packet)
        self.frames_written += 1

    def _picture(self, frame: av.VideoFrame) -> av.VideoFrame:
        """The frame upright at the preview's size, as yuv420p."""
        width, height = self.size
        stored_w, stored_h = (height, width) if self.orientation.transpose else (width, height)
        if self.orientation.upright:
            return frame.reformat(width=width, height=height, format="yuv420p")
        image: np.ndarray = frame.reformat(width=stored_w, height=stored_h, format="bgr24").to_ndarray()
        return av.VideoFrame.from_ndarray(self.orientation.apply(image), format="bgr24").reformat(format="yuv420p")

    def _segment_path(self, seq: int, tmp: bool = False) -> Path:
        return self.folder / f"segment_{seq:06d}.ts{'.tmp' if tmp else ''}"

    def _open_segment(self, captured_at: float) -> None:
        container = av.open(str(self._segment_path(self._seq, tmp=True)), mode="w", format="mpegts")
        stream = container.add_stream("libx264", rate=Fraction(round(self.fps * 1000), 1000))
        stream.width, stream.height = self.size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, TICKS_PER_S)
        stream.options = {"preset": "ultrafast", "tune": "zerolatency", "crf": "26"}
        self._container, self._stream, self._first_at = container, stream, captured_at

    def _close_segment(self, next_at: float) -> None:
        assert self._container is not None and self._stream is not None
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._container = self._stream = None
        os.replace(self._segment_path(self._seq, tmp=True), self._segment_path(self._seq))
        self.listed.append(_Segment(self._segment_path(self._seq).name, self._first_at,
                                    max(next_at - self._first_at, 1 / self.fps)))
        self._seq += 1
        for old in self.listed[:-self.window]:
            (self.folder / old.name).unlink(missing_ok=True)
        self.listed = self.listed[-self.window:]
        self._write_playlist(ended=False)

    def _write_playlist(self, *, ended: bool) -> None:
        target = max(1, math.ceil(max(s.duration_s for s in self.listed)))
        lines = ["#EXTM3U", "#EXT-X-VERSION:3", f"#EXT-X-TARGETDURATION:{target}",
                 f"#EXT-X-MEDIA-SEQUENCE:{self._seq - len(self.listed)}"]
        for segment in self.listed:
            stamp = datetime.fromtimestamp(segment.first_at, UTC).isoformat(timespec="milliseconds")
            lines += [f"#EXT-X-PROGRAM-DATE-TIME:{stamp.replace('+00:00', 'Z')}",
                      f"#EXTINF:{segment.duration_s:.3f},", segment.name]
        if ended:
            lines.append("#EXT-X-ENDLIST")
        tmp = self.playlist.with_name(f".{PLAYLIST}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.playlist)

    def _drop_open_segment(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - already failing: only the file matters now
                pass
            self._container = self._stream = None
        try:
            self._segment_path(self._seq, tmp=True).unlink(missing_ok=True)
        except OSError as e:  # the folder itself is at fault: nothing more to free
            log.debug("cannot remove %s: %s", self._segment_path(self._seq, tmp=True), e)
