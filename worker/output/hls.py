"""Render a live job as a rolling HLS stream: an `.m3u8` playlist and short H.264 MPEG-TS segments that
players and ffprobe read while the job runs (FFmpeg's HLS muxer, through PyAV).

The muxer's flags (`hls_flags`), and why:
- `delete_segments`, `hls_list_size` = `window`: the playlist lists the last `window` segments, older ones
  are deleted (FFmpeg keeps one unlisted segment more, for a player still fetching it): bounded disk.
- `temp_file`: a segment is written as `NAME.ts.tmp` and renamed once complete, before the playlist names
  it; the playlist is always written to `PLAYLIST.tmp` and renamed (FFmpeg does so for any live playlist
  on a file system), so a reader never sees half of either.
- `append_list`: another attempt at the job (reclaimed after a crash) keeps the playlist's segments,
  goes on with the next sequence number and segment name (none overwritten) and marks its first segment
  `#EXT-X-DISCONTINUITY` (encoder and clock restart; `discont_start` marks only a playlist's first).
- `omit_endlist`: the muxer writes `#EXT-X-ENDLIST` on any close, an abort's included; `close()` adds it
  itself, so only a finished job's playlist tells players that the stream has ended.

Time: PTS in MPEG-TS's 90 kHz clock, from `at_s` (a live worker skips frames when it falls behind, so
frames are irregular and a gap holds the last one) or 1/fps apart. Keyframes are forced by time, at the
first frame at or past each segment boundary, and x264 makes no others (no scene cuts, no keyint): each
segment starts with an IDR frame, and the muxer (which cuts at the first keyframe past a boundary) cuts there.

A full disk (ENOSPC, EDQUOT) is raised as `DiskFull` (retryable), as `MaskVideoWriter` does. FFmpeg's
HLS muxer only logs a failed segment write and goes on (it renames the file into place and lists it), so
the muxer writes its files through `_MuxerFile` (PyAV's `io_open`): a failed write is recorded, raised
after the `mux` call, and the file deleted; the playlist then loses the entries of missing segments. So
every segment a playlist lists is complete, and another attempt continues the stream.
"""

from __future__ import annotations

import errno
import glob
import logging
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from worker.output.draw import even_size
from worker.output.encoded import EncodedWriter

logger = logging.getLogger(__name__)

TICKS_PER_S = 90_000  # MPEG-TS's clock: the muxer's time base whatever the encoder's
TIME_BASE = Fraction(1, TICKS_PER_S)
ENDLIST = "#EXT-X-ENDLIST"
_US_PER_S = 1_000_000  # the muxer counts hls_time in microseconds
_AVIO_FLAG_WRITE = 2


def segment_files(playlist: Path) -> list[Path]:
    """The segment files of `playlist` on disk, finished (`.ts`) or being written (`.ts.tmp`), by name."""
    pattern = glob.escape(playlist.stem) + "_*.ts"
    return sorted([*playlist.parent.glob(pattern), *playlist.parent.glob(pattern + ".tmp")])


def listed_segments(playlist: Path) -> list[str]:
    """The segment names `playlist` lists, oldest first; [] when there is no playlist."""
    lines = playlist.read_text().splitlines() if playlist.exists() else []
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def replace_text(playlist: Path, text: str) -> None:
    """Write `text` to `playlist` atomically, through `PLAYLIST.tmp` as the muxer does."""
    tmp = playlist.with_name(playlist.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, playlist)
    finally:
        tmp.unlink(missing_ok=True)


def drop_missing_segments(playlist: Path) -> list[str]:
    """Rewrite `playlist` (atomically) without the entries of segments missing on disk (their writes
    failed); a dropped entry's discontinuity moves to the next one. Returns the names dropped."""
    lines = playlist.read_text().splitlines() if playlist.exists() else []
    kept: list[str] = []
    entry: list[str] = []  # the tags of the segment whose name comes next
    dropped: list[str] = []
    for line in lines:
        if line.startswith(("#EXTINF", "#EXT-X-DISCONTINUITY")) or (entry and line.startswith("#")):
            entry.append(line)
        elif line.startswith("#") or not line.strip():
            kept.append(line)
        elif (playlist.parent / line.strip()).exists():
            kept += [*entry, line]
            entry = []
        else:
            dropped.append(line.strip())
            entry = [tag for tag in entry if tag.startswith("#EXT-X-DISCONTINUITY")]
    if dropped:  # (a discontinuity left over at the end goes: the next attempt starts with one)
        replace_text(playlist, "\n".join(kept) + "\n")
        logger.warning("%s listed segments that are missing (their writes failed); dropped %s", playlist,
                       ", ".join(dropped))
    return dropped


class _MuxerFile:
    """A file that the HLS muxer writes (a segment or the playlist, through PyAV's io_open). A failed
    write is recorded for the writer to raise (the muxer would only log it) and the file is deleted on
    close, so what the muxer then renames into place or lists is missing, never half-written."""

    def __init__(self, path: str, failures: list[OSError]) -> None:
        self.path = path
        self._failures = failures
        self._failed = False
        self._file = open(path, "wb", buffering=0)  # closed by the muxer, through close()

    def write(self, data: bytes) -> int:
        """All of `data`, or AVERROR(errno): the muxer sees an error code, not a Python exception."""
        if self._failed:
            return -errno.EIO
        view = memoryview(data)
        try:
            while view:
                view = view[self._file.write(view):]
        except OSError as e:
            self._fail(e)
            return -(e.errno or errno.EIO)
        return len(data)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as e:
            self._fail(e)
        if self._failed:
            Path(self.path).unlink(missing_ok=True)

    def _fail(self, error: OSError) -> None:
        if not self._failed:
            self._failures.append(error)
        self._failed = True


class HlsWriter(EncodedWriter):
    """Draws masks on frames and encodes them as a rolling HLS stream at `playlist` (see the module doc).

    `close()` ends the stream (`#EXT-X-ENDLIST`); `abort()` stops without ending it, and a later
    HlsWriter on the same playlist continues it. As a context manager, a clean exit closes and an
    exception aborts. A full disk raises DiskFull naming `storage_root` (default: inferred from
    `playlist`, see `storage_root_of`).
    """

    what = "HLS render"
    _nothing_there = "the stream not ended"
    _needs_a_frame = "a stream needs at least one frame"
    _aborted_note = " (no ENDLIST)"

    def __init__(self, playlist: Path, *, fps: float | Fraction, width: int, height: int, segment_s: float = 2.0,
                 window: int = 6, codec: str = "libx264", crf: int = 23, preset: str = "superfast", threads: int = 0,
                 storage_root: Path | None = None) -> None:
        if not (math.isfinite(segment_s) and segment_s > 0):
            raise ValueError(f"segment_s must be a finite number of seconds > 0, but got {segment_s}")
        if window < 1:
            raise ValueError(f"window must be >= 1 segment, but got {window}")
        super().__init__(playlist, fps=fps, width=width, height=height, crf=crf, storage_root=storage_root)
        self.playlist = self.target
        self.segment_s = segment_s
        self.window = window
        self.continued = self.playlist.exists()  # another attempt's playlist: go on after its segments
        self._segment_us = max(1, round(segment_s * _US_PER_S))
        self._ticks: Fraction | None = None  # the last frame's exact time, in ticks
        self._pts = -1  # the last frame's PTS
        self._first_pts = 0
        self._next_cut = 0  # the first PTS of the next segment: that frame is made a keyframe
        self._durations: dict[int, int] = {}  # PTS -> duration of the frames in the encoder
        self._failures: list[OSError] = []  # writes of the muxer's files that failed (_MuxerFile)
        try:
            self.playlist.parent.mkdir(parents=True, exist_ok=True)
            if self.continued:
                drop_missing_segments(self.playlist)  # an attempt that could not put its playlist right
            self._remove_unlisted()
            self._container = av.open(str(self.playlist.absolute()), mode="w", format="hls",
                                      options=self._muxer_options(), io_open=self._io_open)
        except OSError as e:
            full = self._disk_full(e)
            if full is None:
                raise
            raise full from e
        # keyframes only where write() forces them (as IDR frames): at segment boundaries
        self._add_stream(codec, time_base=TIME_BASE, threads=threads,
                         options={"crf": str(crf), "preset": preset, "profile": "high", "forced-idr": "1",
                                  "x264-params": "scenecut=0:keyint=infinite"})
        logger.info("%s HLS render %s: %dx%d (encoded %s) at %s fps, %s s segments, %d listed, codec %s crf %d",
                    "continuing" if self.continued else "starting", self.playlist, width, height,
                    "x".join(map(str, even_size(width, height))), self.rate, segment_s, window, codec, crf)

    def _muxer_options(self) -> dict[str, str]:
        flags = "delete_segments+temp_file+omit_endlist" + ("+append_list" if self.continued else "")
        return {"hls_time": f"{self._segment_us}us", "hls_list_size": str(self.window), "hls_flags": flags,
                "hls_segment_type": "mpegts", "hls_segment_filename": str(self._segment_template())}

    def _segment_template(self) -> Path:
        """FFmpeg's name template of the segments: `NAME_00042.ts` beside `NAME.m3u8` (`segment_files`)."""
        playlist = self.playlist.absolute()
        return playlist.with_name(playlist.stem.replace("%", "%%") + "_%05d.ts")

    def _io_open(self, url: str, flags: int, options: dict[str, str]) -> Any:
        path = url.removeprefix("file:")
        if not flags & _AVIO_FLAG_WRITE:
            return open(path, "rb")
        try:
            return _MuxerFile(path, self._failures)
        except OSError as e:
            self._failures.append(e)
            raise

    def _check_at(self, at_s: float | None) -> None:
        if at_s is not None and not (math.isfinite(at_s) and at_s >= 0):
            raise ValueError(f"at_s must be a finite number of seconds >= 0, but got {at_s}")

    def _stamp(self, video_frame: Any, at_s: float | None) -> None:
        """Shown at `at_s` seconds into the stream (None: 1/fps after the previous frame); a frame at or past
        the next segment boundary is made a keyframe."""
        previous = self._pts
        video_frame.pts = self._next_pts(at_s)
        video_frame.time_base = TIME_BASE
        # how long the frame before lasted, as a guess at this one's (its packet gets it)
        self._durations[video_frame.pts] = (video_frame.pts - previous if previous >= 0
                                            else round(TICKS_PER_S / self.rate))
        if self._starts_segment(video_frame.pts):
            video_frame.pict_type = av.video.frame.PictureType.I

    def _mux(self, packets: list[Any]) -> None:
        """Mux the encoder's packets, each with its frame's duration: the muxer sums them for the length
        of the last segment (the others it measures from PTS), and would take 1/fps, wrong for a live
        job's irregular frames."""
        for packet in packets:
            packet.duration = self._durations.pop(packet.pts, 0)
            self._container.mux(packet)
            self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failures:  # the first: later ones follow from it
            raise self._failures[0]

    def _next_pts(self, at_s: float | None) -> int:
        """This frame's PTS: from `at_s`, or 1/fps after the previous frame; always after the previous."""
        if at_s is not None:
            ticks = Fraction(round(at_s * TICKS_PER_S))
        elif self._ticks is None:
            ticks = Fraction(0)
        else:
            ticks = self._ticks + TICKS_PER_S / self.rate
        pts = round(ticks)
        if pts <= self._pts:
            logger.debug("frame %d of %s at %s s is not after the previous one; shown one tick after it",
                         self.frames_written, self.playlist, at_s)
            pts = self._pts + 1
            ticks = Fraction(pts)
        self._ticks, self._pts = ticks, pts
        return pts

    def _starts_segment(self, pts: int) -> bool:
        """Whether the frame at `pts` is the first at or past the next segment boundary (the boundaries are
        k * segment_s after the first frame, as the muxer counts them); moves the boundary on past it."""
        if self.frames_written == 0:
            self._first_pts = pts
        elif pts < self._next_cut:
            return False
        # a gap may pass several boundaries: the next one is the first after this frame
        per_segment = self._segment_us * TICKS_PER_S  # one segment, in ticks * 1e6
        k = (pts - self._first_pts) * _US_PER_S // per_segment + 1
        self._next_cut = self._first_pts - (-k * per_segment // _US_PER_S)  # rounded up to a whole tick
        return True

    def _finish(self) -> None:
        """The muxer's files are closed: any failed write fails the close; then ENDLIST."""
        self._raise_failure()
        self._end_playlist()

    def _flush_on_abort(self) -> None:
        """The frames so far are flushed (best effort) into a last segment, listed without ENDLIST, so
        another attempt continues the stream."""
        try:
            self._mux(self._stream.encode(None))
        except Exception as e:  # the frames encoded so far are kept all the same
            logger.debug("flushing the encoder of %s failed while aborting: %s", self.playlist, e,
                         exc_info=self._disk_full(e) is None)

    def _after_discard(self) -> None:
        """The container's trailer wrote the last segment and the playlist, without ENDLIST: drop from the
        playlist segments whose writes failed."""
        if self._failures:
            try:
                drop_missing_segments(self.playlist)
            except OSError as e:  # still full: the next attempt drops them before it starts
                logger.warning("cannot rewrite %s without its missing segments: %s", self.playlist, e)

    def _end_playlist(self) -> None:
        """Append ENDLIST to the playlist the muxer wrote, atomically as the muxer writes it."""
        text = self.playlist.read_text()
        if ENDLIST not in text:
            replace_text(self.playlist, text + ENDLIST + "\n")

    def _remove_unlisted(self) -> None:
        """Delete this playlist's segment files that it does not list: those an earlier attempt's muxer kept
        for players (it would have deleted them later) or was writing when it stopped."""
        listed = set(listed_segments(self.playlist))
        for path in segment_files(self.playlist):
            if path.name not in listed:
                path.unlink(missing_ok=True)
                logger.debug("removed %s, which %s does not list", path, self.playlist)
