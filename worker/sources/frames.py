"""Where a job's frames come from: a finished directory, or a directory still being filled by the
producer, which announces each frame on the job's frames stream (streaming hand-off).

Both give `wait(frame_idx)`: True once that frame's JPEG is on disk, False once the video is known to
have ended before it. `total` is the frame count once known. `check`, run by every `wait`, is the
job's own: it raises once the job must stop (its lease lost, a cancel, a shutdown deadline), so a model waiting for frames learns it at once, whichever thread waits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import redis

from schemas.errors import PermanentError, RetryableError, StorageError, VideoError
from schemas.storage import check_frame_dir, frame_name, taken_frame_name

log = logging.getLogger(__name__)

POLL_COUNT = 1024  # announcements read per XREAD


def no_check() -> None:
    return None


@dataclass(frozen=True)
class FrameInfo:
    """A frame's announcement on the frames stream."""

    at: float  # Unix time the producer had it on disk
    captured_at: float | None = None  # live sources: when it was received (None: a file's frame)
    pts_s: float | None = None  # live sources: its presentation timestamp in the source
    dropped_at_ingest: int = 0  # live sources: frames its producer had dropped at ingest when it announced this

    @property
    def time(self) -> float:
        """When the frame came to be: captured (live), else on disk; a live frame's age runs from here."""
        return self.captured_at if self.captured_at is not None else self.at

    @staticmethod
    def of(fields: dict[bytes, bytes]) -> FrameInfo:
        def number(name: bytes) -> float | None:
            raw = fields.get(name)
            return float(raw) if raw not in (None, b"") else None

        return FrameInfo(at=number(b"at") or time.time(), captured_at=number(b"captured_at"),  # older: read time
                         pts_s=number(b"pts"), dropped_at_ingest=int(number(b"dropped_at_ingest") or 0))


class FrameSource(Protocol):
    """A job's frames as a session reads them. Every field is declared here and set at construction
    (FrameSourceBase has the defaults); nothing is read by getattr or set on a source afterwards, except
    `watch`, the model process's own check."""

    dir: Path
    check: Callable[[], None]  # the job's: raises once it must stop (lease lost, cancel, shutdown)
    turn_wait: Callable[[], None] | None  # run while waiting for a turn on a shared model (None: `check`)
    realtime: bool  # a live job's frames, which age in real time: its session's turns come first
    max_cond_frames: int  # prompted frames a session keeps in memory attention (0: all; live: bounded)
    prefetch: int  # frames decoded ahead (worker/model/sam2/lazy_frames.py)

    def ready(self, frame_idx: int) -> bool:
        """Whether `frame_idx` can be read without waiting, as far as the source can tell without asking
        Redis (a source that cannot tell says no)."""
        ...

    def watch(self, check: Callable[[], None]) -> None:
        """Run `check` in every wait from now on (the model process's own, which a close ends)."""
        ...

    @property
    def total(self) -> int | None: ...

    def wait(self, frame_idx: int) -> bool: ...

    def path(self, frame_idx: int) -> Path: ...

    def announced_at(self, frame_idx: int) -> float | None:
        """When the producer announced frame i (Unix time), once; None if it never was (a finished directory)."""
        ...

    def __iter__(self) -> Iterator[int]: ...


def frame_ready(frames: FrameSource, frame_idx: int) -> bool:
    """Whether `frame_idx` can be read without waiting (FrameSource.ready)."""
    return frames.ready(frame_idx)


def turn_wait_check(frames: FrameSource) -> Callable[[], None]:
    """What a session runs while it waits for its turn on a shared model (worker/model/turns.py): the job's
    `turn_wait` where the runner gave one (its check, and a note to the lease that the job waits for the
    model, not stalls), else the source's `check`."""
    return frames.turn_wait or frames.check


class FrameSourceBase:
    """FrameSource's defaults: a file job's frames."""

    dir: Path
    check: Callable[[], None] = staticmethod(no_check)
    turn_wait: Callable[[], None] | None = None
    realtime = False
    max_cond_frames = 0
    prefetch = 6

    def ready(self, frame_idx: int) -> bool:
        return False

    def watch(self, check: Callable[[], None]) -> None:
        self.check = check

    def path(self, frame_idx: int) -> Path:
        return self.dir / frame_name(frame_idx)

    def taken_path(self, frame_idx: int) -> Path:
        """A live frame's JPEG once taken (producer/live_buffer.py)."""
        return self.dir / taken_frame_name(frame_idx)

    def take(self, frame_idx: int) -> bool:
        """Take live frame `frame_idx` for the session: its JPEG renamed to its taken name, so its producer can
        no longer give it up for a newer frame. False: the producer gave it up first (pick a newer one)."""
        try:
            os.rename(self.path(frame_idx), self.taken_path(frame_idx))
            return True
        except FileNotFoundError:
            return self.taken_path(frame_idx).exists()  # taken already (by an earlier attempt, or a second look)

    def wait(self, frame_idx: int) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def announced_at(self, frame_idx: int) -> float | None:
        return None

    def __iter__(self) -> Iterator[int]:
        k = 0
        while self.wait(k):
            yield k
            k += 1


class DirFrames(FrameSourceBase):
    """A complete frame directory of `num_frames` frames (checked up front)."""

    def __init__(self, frames_dir: Path, num_frames: int, *, verify: bool = True,
                 check: Callable[[], None] = no_check, turn_wait: Callable[[], None] | None = None) -> None:
        self.dir = frames_dir
        self._total = num_frames
        self.check = check
        self.turn_wait = turn_wait
        if verify:
            check_frame_dir(frames_dir, num_frames)

    @property
    def total(self) -> int | None:
        return self._total

    def wait(self, frame_idx: int) -> bool:
        self.check()
        return 0 <= frame_idx < self._total


class StreamedFrames(FrameSourceBase):
    """Frames announced on a Redis stream while the producer is still decoding.

    Entry `(k+1)-0` announces frame k; the end marker (field `end`) carries the total, or `error` if
    decoding failed. Waiting longer than `stall_s` for the next announcement fails the attempt
    (RetryableError). With `producer_key`, the producer's liveness key (`producer/liveness.py`, expiring
    `producer_ttl_s` after its last refresh): once it has been gone for half that while a frame is
    awaited, the producer is dead and no frame will come, so the job fails (PermanentError) without
    waiting for `stall_s`. Half the TTL is longer than the producer's refresh interval (a third), so a
    key lost in a Redis restart is back before it counts.

    `live_source`: a live job's frames, which its producer may give up before a worker takes them
    (producer/live_buffer.py): an announced frame's JPEG may be gone (given up) or renamed (taken), and
    `take` says which.
    """

    def __init__(self, client: redis.Redis, stream: str, frames_dir: Path, *, block_ms: int = 1000,
                 stall_s: float = 120.0, producer_key: str = "", producer_ttl_s: float = 0.0,
                 check: Callable[[], None] = no_check, live_source: bool = False,
                 turn_wait: Callable[[], None] | None = None) -> None:
        self.client = client
        self.live_source = live_source
        self.check = check
        self.turn_wait = turn_wait
        self.stream = stream
        self.dir = frames_dir
        self.block_ms = block_ms
        self.stall_s = stall_s
        self.producer_key = producer_key if producer_ttl_s > 0 else ""
        self.producer_ttl_s = producer_ttl_s
        self._producer_checked_at = 0.0
        self._producer_missing_since: float | None = None
        self._available = 0  # frames 0.._available-1 are on disk
        self._total: int | None = None
        self._error: str | None = None
        self._last_id = "0-0"
        self._announced: dict[int, FrameInfo] = {}  # frame -> its announcement, until asked once (or released)
        self.outages = 0  # live sources: times the source dropped and came back (the producer's notes)
        self.outage_s = 0.0  # and for how long, all together
        self.down_since: float | None = None  # live: the source is down now (the producer's note), since then
        self._lock = threading.Lock()  # guards the fields above
        self._poll_lock = threading.Lock()  # one thread at a time reads the stream
        if not frames_dir.is_dir():
            raise StorageError(
                f"frame directory {frames_dir} does not exist: is STORAGE_ROOT the same for the producer "
                f"and the worker (a shared volume)?"
            )

    @property
    def total(self) -> int | None:
        return self._total

    @property
    def available(self) -> int:
        return self._available

    def _poll(self, block: bool = True) -> int:
        """One read of new announcements, blocking up to block_ms unless not `block` (the caller holds
        `_poll_lock`, not `_lock`)."""
        reply = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]],
                     self.client.xread({self.stream: self._last_id}, count=POLL_COUNT,
                                       block=self.block_ms if block else None))
        read = 0
        with self._lock:
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    read += 1
                    self._last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    if b"error" in fields:
                        self._error = fields[b"error"].decode()
                    elif b"end" in fields:
                        self._total = int(fields[b"end"])
                    elif b"frame_idx" in fields:
                        k = int(fields[b"frame_idx"])
                        self._available = max(self._available, k + 1)
                        self._announced[k] = FrameInfo.of(fields)
                    elif b"down_since" in fields:  # a live source went down (the producer reconnects)
                        self.down_since = float(fields[b"down_since"])
                    elif b"outage_s" in fields:  # a live source was down, and is back
                        self.outages += 1
                        self.outage_s += float(fields[b"outage_s"])
                        self.down_since = None
        return read

    def poll_now(self) -> None:
        """Read what has been announced so far without blocking (skipped while another thread is reading)."""
        if not self._poll_lock.acquire(blocking=False):
            return
        try:
            while self._poll(block=False) >= POLL_COUNT:  # far behind: read up to the newest
                pass
        except (redis.ConnectionError, redis.TimeoutError) as e:
            log.debug("announcements not read now (%s)", e)
        finally:
            self._poll_lock.release()

    def announced_at(self, frame_idx: int) -> float | None:
        with self._lock:
            info = self._announced.pop(frame_idx, None)
        return info.at if info is not None else None

    def info(self, frame_idx: int) -> FrameInfo | None:
        """Frame i's announcement (kept until `forget`), None if it was not read."""
        with self._lock:
            return self._announced.get(frame_idx)

    def forget(self, frame_idx: int) -> None:
        with self._lock:
            self._announced.pop(frame_idx, None)

    def _known(self, frame_idx: int) -> bool | None:
        """Whether frame i exists, from what has been read so far; None: not known yet."""
        with self._lock:
            if self._error is not None:
                raise VideoError(f"the producer failed while decoding: {self._error}")
            if frame_idx < self._available:
                if not self.live_source and not self.path(frame_idx).is_file():
                    raise StorageError(f"frame directory {self.dir} is incomplete: missing "
                                       f"{frame_name(frame_idx)}, which the producer announced")
                return True
            if self._total is not None:
                if self._available < self._total:
                    raise StorageError(f"frames stream {self.stream} ended at {self._total} frames but only "
                                       f"{self._available} were announced")
                return frame_idx < self._total
            return None

    def _check_producer(self) -> None:
        """Raise PermanentError once the producer's liveness key has been gone for half its TTL (checked
        at most every quarter TTL; the caller holds `_poll_lock`)."""
        if not self.producer_key:
            return
        now = time.monotonic()
        if now - self._producer_checked_at < min(1.0, self.producer_ttl_s / 4):
            return
        self._producer_checked_at = now
        if self.client.exists(self.producer_key):
            self._producer_missing_since = None
            return
        if self._producer_missing_since is None:
            self._producer_missing_since = now
            return
        if now - self._producer_missing_since >= self.producer_ttl_s / 2:
            self._poll()  # the end or error marker may have landed just before the key went
            with self._lock:
                ended = self._total is not None or self._error is not None
            if not ended:
                error = PermanentError(
                    f"the producer stopped: its liveness key {self.producer_key} has been gone for "
                    f"{now - self._producer_missing_since:.0f} s with {self._available} frames announced and no "
                    f"end marker on {self.stream} (the producing process died or lost Redis); submit the video again "
                    f"under a new job id (the same id names this failed job)"
                )
                # Close the stream for it: its frames can then be removed when the job ends, and a producer that
                # was only cut off finds its next announcement refused (ids below this one) and stops.
                self.client.xadd(self.stream, {"error": f"producer lost: {error}"})
                raise error

    def wait(self, frame_idx: int) -> bool:
        """Block until frame i is on disk (True) or the video is known to end before it (False). A frame
        already announced returns at once, even while another thread is blocked reading for a later one."""
        deadline = time.monotonic() + self.stall_s
        while True:
            self.check()
            known = self._known(frame_idx)
            if known is not None:
                return known
            with self._poll_lock:  # one blocking read at a time; the others wait here, then re-check
                if self._known(frame_idx) is not None:
                    continue
                if time.monotonic() > deadline:
                    raise RetryableError(f"no new frame on {self.stream} for {self.stall_s:.0f} s (producer stalled?)")
                try:
                    self._check_producer()
                    self._poll()
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    log.warning("Redis unavailable while waiting for frames (%s); retrying", e)
                    time.sleep(0.2)


class Prefix(FrameSourceBase):
    """The first `n` frames of a source (the backfill reads no further than the job's current frame)."""

    def __init__(self, frames: FrameSource, n: int) -> None:
        self.frames = frames
        self.n = n
        self.dir: Path = frames.dir
        self.check = frames.check

    @property
    def total(self) -> int | None:
        return self.n

    def wait(self, frame_idx: int) -> bool:
        return 0 <= frame_idx < self.n and self.frames.wait(frame_idx)

    def path(self, frame_idx: int) -> Path:
        return self.frames.path(frame_idx)

    def announced_at(self, frame_idx: int) -> float | None:
        return None

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))
