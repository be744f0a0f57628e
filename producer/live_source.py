"""Live sources: cameras and streams read as one iterator of frames that outlives reconnects.

    reader = LiveReader("rtsp://user:pw@cam/stream", LiveOptions(), stop=stop)
    header = reader.open()        first connect and first frame: size as displayed, fps, orientation
    for item in reader:           LiveFrame, LiveFrame, ..., SourceOutage (once back), LiveFrame, ...
        ...                       returns: `stop` set, a file's end, an HLS playlist's end (#EXT-X-ENDLIST)
                                  raises SourceLost: no frame for longer than source_outage_s

Sources: rtsp(s), rtmp, http(s) (MPEG-TS, HLS, ...), tcp, udp and srt URLs, capture devices /dev/videoN
(v4l2), and plain files (read as fast as they decode, or at their own rate with `realtime`, the
producer's `--live` on a file), so the ingest code has one reader for all of them.

A camera fails in three ways, each caught by its own layer:
- it refuses or drops the connection (EOF, reset): the connection ends at once;
- it keeps the connection but sends nothing: FFmpeg's socket timeout (`timeout`/`rw_timeout`, microseconds,
  where the protocol has one) and PyAV's read timeout (`timeout=(open, read)`, its interrupt callback)
  end the read after read_timeout_s. PyAV issue 584 was that the read timeout stopped applying after the
  open, so a silent camera hung the reader; in PyAV 18.1 demux() re-arms it before each av_read_frame
  (tests/test_live_source.py checks that a silent source's read ends);
- it sends bytes but no pictures (audio, keep-alives, a broken encoder), or a read ignores both
  timeouts: the watchdog here sees no frame for watchdog_s and abandons the connection (see
  producer/live_connection.py for why a blocked read can only be abandoned, not interrupted).
Then the reader reconnects with backoff (reconnect_min_s doubling to reconnect_max_s), logs the outage,
and yields a SourceOutage before the first frame after it; frames go on from the same iterator.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from producer.live_connection import Connection, Ended, LiveFrame, Opened
from producer.orientation import Orientation, frame_orientation
from producer.source_urls import (
    LIVE_SCHEMES,
    av_settings,
    check_source,
    is_live_source,
    redacted,
    with_credentials,
)
from schemas.errors import ConfigError, SourceUnavailable, VideoError, VsegError

log = logging.getLogger(__name__)

__all__ = ["LIVE_SCHEMES", "LiveFrame", "LiveHeader", "LiveOptions", "LiveReader", "LiveStats", "SourceDown", "SourceRefused",
           "SourceLost", "SourceOutage", "check_source", "is_live_source", "redacted", "with_credentials"]

_RTSP_TRANSPORTS = ("tcp", "udp", "udp_multicast", "http", "https")
_DEVICE = re.compile(r"/dev/video\d+")
_POLL_S = 0.1  # how often a wait looks at `stop`
_PAST_DEADLINE = Ended("past the deadline")


class SourceLost(SourceUnavailable):
    """A live source sent no frame for longer than LiveOptions.source_outage_s, reconnects and all."""

    def __init__(self, source: str, duration_s: float, reason: str, attempts: int, limit_s: float) -> None:
        super().__init__(
            f"live source {source} lost: no frame for {duration_s:.1f} s (the limit, source_outage_s, is "
            f"{limit_s:g} s), {attempts} reconnect attempt(s), last: {reason}; check that the camera or "
            "server is up and reachable from this machine, or allow a longer outage")
        self.source, self.duration_s, self.reason, self.attempts = source, duration_s, reason, attempts


@dataclass(frozen=True)
class LiveOptions:
    """How patient the reader is. Every duration is in seconds."""

    open_timeout_s: float = 10.0  # connecting and opening (each of FFmpeg's open and stream probe)
    read_timeout_s: float = 5.0  # a read that gets nothing for this long fails
    watchdog_s: float = 10.0  # no frame for this long while connected: a stall
    reconnect_min_s: float = 0.5  # backoff between reconnect attempts, doubling up to reconnect_max_s
    reconnect_max_s: float = 8.0
    source_outage_s: float = 60.0  # no frame for longer than this: SourceLost
    rtsp_transport: str = "tcp"
    realtime: bool = False  # a file played at its own rate, as a camera would send it (live sources are anyway)

    def __post_init__(self) -> None:
        for name in ("open_timeout_s", "read_timeout_s", "watchdog_s", "reconnect_min_s", "source_outage_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"live option {name} must be > 0 seconds, but got {getattr(self, name)}")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ConfigError(f"live option reconnect_max_s ({self.reconnect_max_s}) must be >= "
                              f"reconnect_min_s ({self.reconnect_min_s})")
        if self.rtsp_transport not in _RTSP_TRANSPORTS:
            raise ConfigError(f"rtsp_transport must be one of {', '.join(_RTSP_TRANSPORTS)}, "
                              f"but got {self.rtsp_transport!r}")


_DEFAULTS = LiveOptions()


@dataclass(frozen=True)
class LiveHeader:
    """What the first frame says: its size as displayed (turned by `orientation`), and the stream's rate."""

    width: int
    height: int
    fps: float  # as the stream declares it; 30.0 when it does not say
    orientation: Orientation


class SourceRefused(SourceUnavailable):
    """The source answered that retrying cannot help: HTTP 4xx (404 not found, 401/403 credentials), a
    protocol FFmpeg does not have. Failed at once (a fleet daemon still retries with its own backoff)."""


@dataclass(frozen=True)
class SourceDown:
    """The source stopped sending: yielded once when an outage begins, before the reconnects."""

    began_at: float  # Unix time of the last frame before it
    reason: str


@dataclass(frozen=True)
class SourceOutage:
    """The source was down and is back: yielded just before the first frame after the outage."""

    began_at: float  # Unix time of the last frame before it
    duration_s: float  # until the first frame after it
    reason: str  # the last failure: "EOF", "connection refused", "stalled: no frame for 10 s (watchdog)"
    attempts: int  # reconnect attempts it took


@dataclass
class LiveStats:
    """Counters over the reader's life."""

    frames: int = 0
    reconnects: int = 0  # connection attempts after an outage began
    reconnects_failed: int = 0  # of those, the ones that got no frame
    outages: int = 0
    stalls: int = 0  # times the watchdog gave up on a connection


@dataclass
class _Outage:
    began_at: float
    lost_by: float  # monotonic
    reason: str = ""
    attempts: int = 0
    tried_at: float = 0.0  # monotonic: when the last reconnect attempt began


class LiveReader:
    """Frames from one live source, reconnecting as needed (see the module docstring). Not thread-safe,
    except `close()` and the `stop` event, which may come from any thread; either ends the iteration
    within about 0.1 s, whatever the reader is waiting on."""

    def __init__(self, source: str, options: LiveOptions = _DEFAULTS, *,
                 stop: threading.Event | None = None) -> None:
        self.source = source = check_source(source)
        self.options = options
        self.shown = redacted(source)
        self.stats = LiveStats()
        self._stop = stop if stop is not None else threading.Event()
        self._closed = threading.Event()
        self._kind = "device" if _DEVICE.fullmatch(source) else ("network" if is_live_source(source) else "file")
        self._format, self._av_options = av_settings(source, self._kind, read_timeout_s=self.options.read_timeout_s,
                                                     rtsp_transport=self.options.rtsp_transport)
        self._conn: Connection | None = None
        self._connections = 0
        self._header: LiveHeader | None = None
        self._fps = 30.0
        self._pending: LiveFrame | None = None  # the first frame, read by open()
        self._last_frame = (time.time(), time.monotonic())  # when the last frame arrived

    def __enter__(self) -> LiveReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> LiveHeader:
        """Connect and wait for the first frame (idempotent). A network source is retried with backoff
        for up to open_timeout_s; a file or device is tried once. Raises VideoError saying why not (or
        that `stop` came first: iterating instead of calling open() then just returns)."""
        if self._header is not None:
            return self._header
        if self._closed.is_set():
            raise VideoError(f"the live reader of {self.shown} is closed")
        self._check_local()
        deadline = time.monotonic() + self.options.open_timeout_s
        delay, reason = self.options.reconnect_min_s, "no frame arrived"
        while True:
            item = self._next(self._connect(), deadline)
            if item is None:
                raise VideoError(f"stopped while opening {self.shown}")
            if isinstance(item, LiveFrame):
                self._pending, self._last_frame = item, (item.captured_at, time.monotonic())
                orientation = frame_orientation(item.frame)
                width, height = orientation.displayed_size(item.frame.width, item.frame.height)
                self._header = LiveHeader(width, height, self._fps, orientation)
                log.info("live source %s open: %dx%d at %.3g fps", self.shown, width, height, self._fps)
                return self._header
            reason = reason if item is _PAST_DEADLINE else item.reason
            retry = self._kind == "network" and not item.permanent and item is not _PAST_DEADLINE
            if not retry or time.monotonic() + delay >= deadline:
                self._drop()
                raise self._cannot_open(reason, permanent=item is not _PAST_DEADLINE and item.permanent)
            log.info("live source %s: %s; trying again in %.1f s", self.shown, reason, delay)
            if not self._sleep(delay):
                raise VideoError(f"stopped while opening {self.shown}")
            delay = min(delay * 2, self.options.reconnect_max_s)

    def __iter__(self) -> Iterator[LiveFrame | SourceDown | SourceOutage]:
        try:
            if self._header is None:
                try:
                    self.open()
                except (VideoError, SourceUnavailable):
                    if self._halted():
                        return
                    raise
            yield from self._frames()
        finally:
            self._drop()

    def close(self) -> None:
        """Stop reading (from any thread): the iteration returns, the connection's thread is let go."""
        self._closed.set()
        self._drop()

    def _frames(self) -> Iterator[LiveFrame | SourceDown | SourceOutage]:
        """Frames, with SourceDown when an outage begins and SourceOutage when it ends. Reconnect attempts go
        on, with backoff, up to and including the outage's deadline (the last one is made at the deadline,
        and may take its open timeout); a permanent refusal (HTTP 4xx, no such protocol) ends it at once."""
        options = self.options
        outage: _Outage | None = None
        delay = options.reconnect_min_s
        while True:
            if self._pending is not None:
                item: LiveFrame | Ended | None = self._pending
                self._pending = None
            else:
                conn = self._conn if self._conn is not None else self._connect()
                # an attempt made by the deadline may take its open timeout, whatever the deadline says
                item = self._next(conn, None if outage is None else
                                  max(outage.lost_by, outage.tried_at + options.open_timeout_s))
            if item is None:
                return
            if isinstance(item, LiveFrame):
                self._last_frame = (item.captured_at, time.monotonic())
                if outage is not None:
                    back = SourceOutage(outage.began_at, max(0.0, item.captured_at - outage.began_at),
                                        outage.reason, outage.attempts)
                    log.info("live source %s is back after %.1f s (%d attempt(s); last: %s)",
                                self.shown, back.duration_s, back.attempts, back.reason)
                    outage, delay = None, options.reconnect_min_s
                    yield back
                self.stats.frames += 1
                yield item
                continue
            if item is not _PAST_DEADLINE and item.final:
                log.info("live source %s ended (%s)", self.shown, item.reason)
                return
            if self._kind == "file":
                raise VideoError(f"{self.shown} is corrupt after frame {self.stats.frames} ({item.reason}); "
                                 "re-encode or re-download it")
            self._drop()
            if item is not _PAST_DEADLINE and item.permanent:
                raise self._cannot_open(item.reason, permanent=True)
            if outage is None:
                outage = _Outage(self._last_frame[0], self._last_frame[1] + options.source_outage_s)
                self.stats.outages += 1
                log.warning("live source %s: %s; reconnecting", self.shown, item.reason)
                outage.reason = item.reason
                yield SourceDown(outage.began_at, item.reason)
            else:
                self.stats.reconnects_failed += 1
                log.info("live source %s: reconnect attempt %d failed: %s", self.shown, outage.attempts,
                         "no frame by the deadline" if item is _PAST_DEADLINE else item.reason)
                outage.reason = outage.reason if item is _PAST_DEADLINE else item.reason
            if time.monotonic() >= outage.lost_by:  # the attempt made at the deadline failed too
                raise self._lost(outage)
            if not self._sleep(min(delay, max(0.0, outage.lost_by - time.monotonic()))):
                return
            delay = min(delay * 2, options.reconnect_max_s)
            outage.attempts += 1
            outage.tried_at = time.monotonic()
            self.stats.reconnects += 1
            self._connect()

    def _lost(self, outage: _Outage) -> SourceLost:
        log.error("live source %s lost after %.1f s without a frame (last: %s)", self.shown,
                  time.time() - outage.began_at, outage.reason)
        return SourceLost(self.shown, time.time() - outage.began_at, outage.reason, outage.attempts,
                          self.options.source_outage_s)

    def _next(self, conn: Connection, deadline: float | None) -> LiveFrame | Ended | None:
        """The connection's next frame or end; a stall (the watchdog) ends it; _PAST_DEADLINE once the
        monotonic `deadline` passes; None once stopped or closed."""
        while not self._halted():
            try:
                item = conn.items.get(timeout=_POLL_S)
            except queue.Empty:
                stall = self._stall(conn)
                if stall is not None:
                    conn.cancel()
                    self.stats.stalls += 1
                    return Ended(stall)
                if deadline is not None and time.monotonic() >= deadline:
                    return _PAST_DEADLINE
                continue
            if isinstance(item, Opened):
                self._fps = item.fps
                continue
            return item
        return None

    def _stall(self, conn: Connection) -> str | None:
        """The watchdog: why `conn` counts as stalled, or None. A file cannot stall (its pacing may
        wait as long as its timestamps say)."""
        if self._kind == "file":
            return None
        options = self.options
        idle_s = time.monotonic() - conn.last_activity
        if conn.opened and idle_s > options.watchdog_s:
            return f"stalled: no frame for {options.watchdog_s:g} s (watchdog)"
        opening_s = 2 * options.open_timeout_s + options.watchdog_s  # the open and the probe, then some
        if not conn.opened and idle_s > opening_s:
            return f"stalled: still opening after {opening_s:g} s (watchdog)"
        return None

    def _connect(self) -> Connection:
        self._drop()
        self._connections += 1
        local_file = self._kind == "file"
        self._conn = Connection(
            self.source, av_format=self._format, av_options=dict(self._av_options),
            timeouts=(self.options.open_timeout_s, self.options.read_timeout_s), eof_final=local_file,
            decode_errors_fatal=local_file, realtime=self.options.realtime and local_file,
            name=f"live-source-{self._connections}")
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.cancel()
            self._conn = None

    def _halted(self) -> bool:
        return self._stop.is_set() or self._closed.is_set()

    def _sleep(self, seconds: float) -> bool:
        """Wait `seconds`; False (at once) if stopped or closed meanwhile."""
        end = time.monotonic() + seconds
        while not self._halted():
            left = end - time.monotonic()
            if left <= 0:
                return True
            self._stop.wait(min(left, _POLL_S))
        return False

    def _check_local(self) -> None:
        if self._kind == "device" and not os.path.exists(self.source):
            raise VideoError(f"capture device {self.source} not found: is the camera plugged in? "
                             "(`ls /dev/video*` lists the devices there are)")
        if self._kind == "file" and "://" not in self.source:
            path = Path(self.source)
            if not path.exists():
                raise VideoError(f"video file not found: {self.source}")
            if not path.is_file():
                raise VideoError(f"video path is not a file: {self.source}")

    def _cannot_open(self, reason: str, *, permanent: bool = False) -> VsegError:
        """Why the source cannot be opened: VideoError for a file (the command line's to fix), else
        SourceUnavailable (SourceRefused when retrying cannot help)."""
        if self._kind == "device":
            return SourceUnavailable(f"cannot open capture device {self.source} ({reason}): is it a camera, and not "
                                     "in use by another program?")
        if self._kind == "file":
            return VideoError(f"cannot read {self.shown} as a video ({reason}); is it a complete video file?")
        if permanent:
            return SourceRefused(f"live source {self.shown} refused ({reason}); retrying cannot help: check the "
                                 "URL's host, path and protocol, and the camera's user and password")
        return SourceUnavailable(f"cannot open live source {self.shown} within {self.options.open_timeout_s:g} s "
                                 f"({reason}): check the URL and that the camera or server is up and reachable "
                                 "from this machine")
