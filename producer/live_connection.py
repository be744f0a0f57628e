"""One connection to a live source: a thread that opens it with PyAV, decodes, and hands frames over.

`producer/live_source.py` makes one `Connection` per attempt and reads its queue: frames, then one
`Ended` saying why the connection ended. The reading is done in a thread of its own so that the
reader's caller is never stuck inside FFmpeg: it can give up on a connection (a stall, a stop) at any
moment by `cancel()`, and take up a new one.

Why a connection can be abandoned but not interrupted: PyAV (18.x) arms FFmpeg's interrupt callback with
its own timer only (the open timeout around `avformat_open_input` and `avformat_find_stream_info`, the
read timeout restarted before each `av_read_frame`); nothing outside the thread can trigger it, and
closing the container from another thread while a read is under way frees what the read is using. So a
cancelled connection's thread is a daemon left to wake by itself, at most a read timeout later (or when
the socket closes); from then on it touches nothing but its own container, which it closes, and its own
queue, which nobody reads any more.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import av

log = logging.getLogger(__name__)

QUEUE_FRAMES = 16  # frames decoded ahead of a slower caller; then the thread waits (and so does the socket)
_POLL_S = 0.1


@dataclass(frozen=True)
class LiveFrame:
    """A decoded frame as it arrived."""

    frame: av.VideoFrame
    captured_at: float  # Unix time the frame was received (decoded), wall clock
    pts_s: float | None  # the source's presentation time in seconds; None if the source gives none


@dataclass(frozen=True)
class Opened:
    """The container opened and has a video stream; frames follow."""

    fps: float  # the stream's rate, 30.0 when it says none (as producer/decode.py)
    format_name: str


@dataclass(frozen=True)
class Ended:
    """Why a connection ended: the last item it hands over."""

    reason: str  # one line, no URL in it: "EOF", "connection refused", "no data for 5 s (read timeout)"
    final: bool = False  # the end for good: a file's end, an HLS playlist's end
    permanent: bool = False  # retrying cannot help (no video stream; a corrupt file; HTTP 4xx; no such protocol)


def is_permanent(error: BaseException) -> bool:
    """An open that retrying cannot help: the server said no for good (HTTP 4xx but 429, which RTSP's 401
    and 404 map to as well) or FFmpeg has no such protocol."""
    if isinstance(error, av.error.HTTPTooManyRequestsError):
        return False
    return isinstance(error, (av.error.HTTPClientError, av.error.ProtocolNotFoundError))


def describe(error: BaseException, timed_out: str) -> str:
    """A short reason for a failure, without the URL (FFmpeg's errors carry it, password and all);
    `timed_out` is the reason when PyAV's interrupt callback ended it (its open or read timer ran out)."""
    if isinstance(error, av.error.ExitError):
        return timed_out
    if isinstance(error, av.error.FFmpegError):
        return str(error.strerror or type(error).__name__).lower()
    return str(error) or type(error).__name__


class Connection:
    """One attempt at a source, read by a daemon thread into `items` (LiveFrame, Opened, then Ended)."""

    def __init__(self, url: str, *, av_format: str | None, av_options: dict[str, str],
                 timeouts: tuple[float, float], eof_final: bool, decode_errors_fatal: bool,
                 realtime: bool, name: str) -> None:
        self.items: queue.Queue[LiveFrame | Opened | Ended] = queue.Queue(maxsize=QUEUE_FRAMES)
        self.last_activity = time.monotonic()  # started, opened, or a frame decoded or handed over
        self.opened = False
        self.decode_errors = 0
        self._url, self._format, self._options, self._timeouts = url, av_format, av_options, timeouts
        self._eof_final, self._decode_errors_fatal, self._realtime = eof_final, decode_errors_fatal, realtime
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Give up on this connection: its thread hands over nothing more and closes its container as
        soon as it gets control back (at once between frames; a blocked read first times out)."""
        self._cancelled.set()

    def _put(self, item: LiveFrame | Opened | Ended) -> bool:
        """Hand `item` over, waiting while the caller is behind; False once cancelled."""
        while not self._cancelled.is_set():
            try:
                self.items.put(item, timeout=_POLL_S)
            except queue.Full:
                continue
            self.last_activity = time.monotonic()  # waiting on the caller is not the source stalling
            return True
        return False

    def _run(self) -> None:
        try:
            container = av.open(self._url, format=self._format, options=self._options, timeout=self._timeouts)
        except Exception as e:  # FFmpeg's errors, and any other: the reader must hear of it, not wait
            self._put(Ended(describe(e, f"not open within {self._timeouts[0]:g} s (open timeout)"),
                            permanent=is_permanent(e)))
            return
        try:
            self._read(container)
        except Exception as e:  # not an FFmpeg error (those end in _read): a bug here or in PyAV
            log.exception("reading a live source failed")
            self._put(Ended(f"reading failed ({type(e).__name__})", permanent=self._decode_errors_fatal))
        finally:
            container.close()

    def _read(self, container: Any) -> None:
        if not container.streams.video:
            self._put(Ended("no video stream", permanent=True))
            return
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 30.0
        final = self._eof_final or "hls" in (container.format.name or "")
        self.opened = True
        self.last_activity = time.monotonic()
        if not self._put(Opened(fps, container.format.name or "")):
            return
        pacer = _Pacer(fps) if self._realtime else None
        try:
            for packet in container.demux(stream):
                if self._cancelled.is_set():
                    return
                for frame in self._decode(packet):
                    pts_s = frame.time
                    if pacer is not None and not pacer.wait(pts_s, self._cancelled):
                        return
                    self.last_activity = time.monotonic()
                    if not self._put(LiveFrame(frame, time.time(), None if pts_s is None else float(pts_s))):
                        return
        except (av.error.FFmpegError, OSError) as e:
            reason = describe(e, f"no data for {self._timeouts[1]:g} s (read timeout)")
            self._put(Ended(reason, permanent=self._decode_errors_fatal))
            return
        self._put(Ended("EOF", final=final))

    def _decode(self, packet: av.Packet) -> list[av.VideoFrame]:
        """The packet's frames; a packet that does not decode is skipped on a live source (the decoder
        conceals it and goes on at the next key frame) and an error in a file."""
        try:
            return [frame for frame in packet.decode() if isinstance(frame, av.VideoFrame)]
        except av.error.InvalidDataError:
            if self._decode_errors_fatal:
                raise
            self.decode_errors += 1
            log.debug("a packet of a live source did not decode (%d so far): skipped", self.decode_errors)
            return []


class _Pacer:
    """Holds each frame back until its presentation time, counted on the wall clock from the first
    frame: a file read as a camera would send it. A timestamp that goes backwards or leaps (a looped or
    spliced file) starts the count again from that frame."""

    _LEAP_S = 5.0

    def __init__(self, fps: float) -> None:
        self._frame_s = 1.0 / fps if fps > 0 else 1 / 30
        self._anchor: tuple[float, float] | None = None  # (monotonic time, stream time) of the count's start
        self._last = 0.0

    def wait(self, pts_s: float | None, cancelled: threading.Event) -> bool:
        """Wait for the frame's time; False if cancelled meanwhile."""
        t = self._last + self._frame_s if pts_s is None else float(pts_s)
        now = time.monotonic()
        if self._anchor is None or t < self._last or t - self._last > self._LEAP_S:
            self._anchor = (now, t)
        self._last = t
        delay = self._anchor[0] + (t - self._anchor[1]) - now
        return not (delay > 0 and cancelled.wait(delay))
