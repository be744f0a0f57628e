"""A live job's frames: announced as the producer captures them, some skipped to keep up.

A live source does not wait for the worker. When the model is slower than the camera, the worker
skips frames so that it never falls more than `max_latency_s` behind (VSEG_MAX_LATENCY_S): before it
takes the next frame, it looks at that frame's age (from its `captured_at`) plus what the next frame
will take (the recent time between picks, twice: one frame in the model, one being loaded ahead), and
if that is over the budget it jumps to the newest frame announced. The frames jumped over are
published as `skipped` entries (worker/output/sink.py), so every announced frame has one entry.

Two index spaces. The result stream, the producer and the backends number the source's frames
(`LiveFrames`: frame k is the producer's k-th). SAM 2's memory attention weighs memories by the
distance between frame indexes (`frame_idx - t_rel` in sam2_base.py), so the session must see the
frames it processes numbered contiguously, as if the skipped ones never existed: `SessionFrames`
(`LiveFrames.view`) is the FrameSource the session reads, where frame j is the j-th picked. The
runner maps each result back with `source_index(j)`.

Bounded over days: a frame's JPEG is removed once its result is out (`LiveResults.release_through`,
on the sink's side), announcements are forgotten once passed, and only the newest picks are kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from schemas.errors import StorageError
from worker.sources.frames import FrameInfo, StreamedFrames

log = logging.getLogger(__name__)

LOOKAHEAD = 1  # frames the session's loaders read ahead: a pick is made one frame before it is segmented
KEEP_PICKS = 64  # picks remembered (session frame -> source frame): more than the session reads ahead
_EMA = 0.2  # weight of the newest interval in the estimate of the time per frame


class EndOfSource(StorageError):
    """A session frame asked for after its live source ended."""


class LiveFrames:
    """A live job's frames in the source's numbering, and the skipping policy (see the module doc).

    `start_after`: the last frame an earlier attempt published (-1: none); `at_edge`: start at the newest
    frame announced (a resumed live job goes on from the live edge, not from where it stopped)."""

    def __init__(self, streamed: StreamedFrames, *, max_latency_s: float, start_after: int = -1,
                 at_edge: bool = False, max_cond_frames: int = 8, clock: Callable[[], float] = time.time) -> None:
        self.streamed = streamed
        self.max_cond_frames = max_cond_frames
        self.max_latency_s = max_latency_s
        self.clock = clock
        self.start_after = start_after
        self.at_edge = at_edge
        self._next = start_after + 1  # the first frame that may be picked next
        self._at_edge = at_edge
        self._picked: list[int] = []  # session frame j -> source frame
        self._first_kept = 0  # picks before this session frame are forgotten
        self._lock = threading.Lock()
        self._last_pick_at: float | None = None
        self.frame_s = 0.0  # the recent time between two picks (how fast the model goes)
        self.view = SessionFrames(self)

    @property
    def dir(self) -> Path:
        return self.streamed.dir

    @property
    def total(self) -> int | None:
        """The source's frame count, once it has ended."""
        return self.streamed.total

    def path(self, frame_idx: int) -> Path:
        return self.streamed.path(frame_idx)

    def source_index(self, session_frame: int) -> int:
        with self._lock:
            if not 0 <= session_frame - self._first_kept < len(self._picked):
                raise IndexError(f"session frame {session_frame} is not among the picks held "
                                 f"({self._first_kept}..{self._first_kept + len(self._picked) - 1})")
            return self._picked[session_frame - self._first_kept]

    def picks(self) -> int:
        with self._lock:
            return self._first_kept + len(self._picked)

    def ready(self, session_frame: int) -> bool:
        """Whether `pick_through(session_frame)` would return without waiting for the source (as last read)."""
        with self._lock:
            if session_frame < self._first_kept + len(self._picked):
                return True
            return session_frame == self._first_kept + len(self._picked) and self.streamed.available > self._next

    # ---- picking ----------------------------------------------------------------------------------
    def pick_through(self, session_frame: int) -> bool:
        """Make sure session frames up to `session_frame` are picked; False once the source has ended first."""
        with self._lock:
            while self._first_kept + len(self._picked) <= session_frame:
                picked = self._pick()
                if picked is None:
                    return False
                self._picked.append(picked)
            if len(self._picked) > KEEP_PICKS:  # the session and the runner only ask about the newest few
                drop = len(self._picked) - KEEP_PICKS
                del self._picked[:drop]
                self._first_kept += drop
        return True

    def _pick(self) -> int | None:
        """The next source frame to segment (blocking until it is announced), None if the source ended."""
        candidate = self._next
        if not self.streamed.wait(candidate):
            return None
        if self._at_edge or self._behind(candidate):
            self.streamed.poll_now()  # what is the newest frame now?
            candidate = max(candidate, self.streamed.available - 1)
            if self._at_edge:
                log.info("live job resumes at the live edge, frame %d (frames %d..%d are skipped)", candidate,
                         self._next, candidate - 1)
            self._at_edge = False
        now = time.monotonic()
        if self._last_pick_at is not None:
            interval = now - self._last_pick_at
            self.frame_s = interval if self.frame_s == 0.0 else (1 - _EMA) * self.frame_s + _EMA * interval
        self._last_pick_at = now
        for k in range(self._next, candidate + 1):  # this side no longer needs their announcements
            self.streamed.forget(k)
        self._next = candidate + 1
        return candidate

    def _behind(self, frame_idx: int) -> bool:
        """Whether segmenting this frame would publish it later than max_latency_s after its capture."""
        info = self.streamed.info(frame_idx)
        if info is None:
            return False
        expected = self.clock() - info.time + (1 + LOOKAHEAD) * self.frame_s
        return expected > self.max_latency_s


class LiveResults:
    """The result side of a live job, in the source's numbering: each published frame's announcement
    (captured_at, pts) and, once its result is out, its JPEG removed. It reads the frames stream on its
    own (`streamed`), apart from the session's picking, which may run in the model process."""

    def __init__(self, streamed: StreamedFrames, *, start_after: int = -1, remove: bool = True) -> None:
        self.streamed = streamed
        self.remove = remove  # False: keep_frames=on, the operator keeps every JPEG
        self._released = start_after

    @property
    def outages(self) -> tuple[int, float]:
        """(times the source dropped and came back, seconds it was down), from the producer's notes."""
        return self.streamed.outages, self.streamed.outage_s

    def info(self, frame_idx: int) -> FrameInfo | None:
        """Frame k's announcement (read from the stream if need be: k's result is being published, so it is there)."""
        if self.streamed.info(frame_idx) is None:
            self.streamed.wait(frame_idx)
        return self.streamed.info(frame_idx)

    def release_through(self, frame_idx: int) -> None:
        """Frames up to `frame_idx` are published (and rendered): remove their JPEGs and announcements.
        The session only reads ahead of its results."""
        for k in range(self._released + 1, frame_idx + 1):
            if self.remove:
                self.streamed.path(k).unlink(missing_ok=True)
            self.streamed.forget(k)
        self._released = max(self._released, frame_idx)


class SessionFrames:
    """The FrameSource a live session reads: frame j is the j-th frame picked (see the module doc).
    `max_cond_frames`: the prompted frames a session keeps in memory attention (worker/model/sam2_session.py)."""

    prefetch = LOOKAHEAD
    realtime = True  # its frames age in real time: its session's turns on a shared model come first

    def __init__(self, live: LiveFrames) -> None:
        self.live = live
        self.max_cond_frames = live.max_cond_frames
        self.dir: Path = live.dir
        self.check: Callable[[], None] = live.streamed.check
        self.turn_wait: Callable[[], None] | None = getattr(live.streamed, "turn_wait", None)

    @property
    def total(self) -> int | None:
        """Known once the source has ended and every frame of it was picked or skipped."""
        live = self.live
        total = live.total
        if total is None or live._next < total:  # noqa: SLF001 - the view is part of LiveFrames
            return None
        return live.picks()

    def wait(self, frame_idx: int) -> bool:
        return frame_idx >= 0 and self.live.pick_through(frame_idx)

    def ready(self, frame_idx: int) -> bool:
        """Session frame j is picked, or a frame of the source not yet picked is announced (no Redis call)."""
        return self.live.ready(frame_idx)

    def path(self, frame_idx: int) -> Path:
        """Session frame j's JPEG (picked now if it was not: a resumed session reads its seed frame first)."""
        if not self.wait(frame_idx):
            raise EndOfSource(f"the live source ended before session frame {frame_idx}")
        return self.live.path(self.live.source_index(frame_idx))

    def announced_at(self, frame_idx: int) -> float | None:
        return None  # latency is the sink's: it knows the source frame

    def __iter__(self) -> Iterator[int]:
        j = 0
        while self.wait(j):
            yield j
            j += 1
