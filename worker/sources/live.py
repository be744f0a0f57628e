"""A live job's frames: announced as the producer captures them, some skipped to keep up.

A live source does not wait for the worker. Each time the session needs a frame, the worker takes the
newest frame announced (it reads the frames stream for the newest announcement first) and passes over
the ones between it and its previous pick; when nothing newer than that pick is announced yet, it waits
for the next frame. So a model that keeps up processes every frame, and a slower one samples the source
evenly, a frame per model step, each as fresh as the stream allows, instead of working through a
backlog in bursts. (A frame is picked when the session's loaders read it, one frame ahead of the model,
LOOKAHEAD: its result comes about two model steps after its pick.) A session's first pick is the newest
frame too: a live job that waited in the queue (or resumes after a failed attempt) starts at the live
edge, not at a stale frame 0 (`first_pick`). The frames passed over are published as `skipped` entries
(worker/output/sink.py), so every announced frame has one entry.

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
from collections.abc import Callable, Iterator
from pathlib import Path

from schemas.errors import StorageError
from worker.sources.frames import FrameInfo, StreamedFrames

log = logging.getLogger(__name__)

LOOKAHEAD = 1  # frames the session's loaders read ahead: a pick is made one frame before it is segmented
KEEP_PICKS = 64  # picks remembered (session frame -> source frame): more than the session reads ahead


class EndOfSource(StorageError):
    """A session frame asked for after its live source ended."""


class LiveFrames:
    """A live job's frames in the source's numbering, and the sampling policy (see the module doc).

    `start_after`: the last frame an earlier attempt published (-1: none): frames up to it are never
    picked. `at_edge`: a resumed live job (it starts at the newest frame announced, as every session does;
    kept for the model process's spec and the log). `max_latency_s` (VSEG_MAX_LATENCY_S) no longer steers
    the picks, which are always the newest frame: it is kept for the callers that pass it along."""

    def __init__(self, streamed: StreamedFrames, *, max_latency_s: float, start_after: int = -1,
                 at_edge: bool = False, max_cond_frames: int = 8) -> None:
        self.streamed = streamed
        self.max_cond_frames = max_cond_frames
        self.max_latency_s = max_latency_s
        self.start_after = start_after
        self.at_edge = at_edge
        self._next = start_after + 1  # the first frame that may be picked next
        self._picked: list[int] = []  # session frame j -> source frame
        self._first_kept = 0  # picks before this session frame are forgotten
        self._first_pick: int | None = None
        self._lock = threading.Lock()  # guards the four fields above; never held while waiting for the source
        self._pick_lock = threading.Lock()  # one pick at a time, held while it waits for the source
        self.view = SessionFrames(self)

    @property
    def dir(self) -> Path:
        return self.streamed.dir

    @property
    def total(self) -> int | None:
        """The source's frame count, once it has ended."""
        return self.streamed.total

    def path(self, frame_idx: int) -> Path:
        """A picked frame's JPEG: taken, so under its taken name (StreamedFrames.take)."""
        return self.streamed.taken_path(frame_idx)

    @property
    def first_pick(self) -> int | None:
        """The source frame this session started at (session frame 0), None before its first pick."""
        return self._first_pick

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
        """Whether `pick_through(session_frame)` would return without waiting for the source: it is picked,
        or a frame newer than the last pick is announced. Each pick reads the stream up to its newest frame,
        so what was last read hardly ever shows a newer one: the stream is read again, without blocking,
        before saying no. It never waits for a pick under way (one waiting for the source holds only
        `_pick_lock`): the session asks at the end of a model step, holding the model (`Turn.hold`,
        worker/model/turns.py)."""
        with self._lock:
            picks, newer = self._first_kept + len(self._picked), self._next
        if session_frame != picks:
            return session_frame < picks
        if self.streamed.available <= newer:
            self.streamed.poll_now()  # skipped while a pick is reading the stream: then it says no
        return self.streamed.available > newer

    # ---- picking ----------------------------------------------------------------------------------
    def pick_through(self, session_frame: int) -> bool:
        """Make sure session frames up to `session_frame` are picked; False once the source has ended first.
        One pick at a time (`_pick_lock`, held while waiting for the source); `_lock` guards the picks only
        briefly, so the runner's `source_index` and the session's `ready` never wait for the source."""
        with self._pick_lock:
            while self.picks() <= session_frame:
                picked = self._pick()
                if picked is None:
                    return False
                with self._lock:
                    self._picked.append(picked)
                    self._next = picked + 1
                    if self._first_pick is None:
                        self._first_pick = picked
                    if len(self._picked) > KEEP_PICKS:  # the session and the runner only ask about the newest few
                        drop = len(self._picked) - KEEP_PICKS
                        del self._picked[:drop]
                        self._first_kept += drop
        return True

    def _pick(self) -> int | None:
        """The next source frame to segment: the newest announced, after waiting for one newer than the
        previous pick if there is none yet; None if the source ended first (the caller holds `_pick_lock`)."""
        if not self.streamed.wait(self._next):
            return None
        self.streamed.poll_now()  # what is the newest frame now?
        picked = max(self._next, self.streamed.available - 1)
        while not self.streamed.take(picked):  # its producer gave it up for a newer one (producer/live_buffer.py)
            if not self.streamed.wait(picked + 1):
                return None
            self.streamed.poll_now()
            picked = max(picked + 1, self.streamed.available - 1)
        if self._first_pick is None and picked > self._next:
            log.info("live job %s at the live edge, frame %d (frames %d..%d are skipped)",
                     "resumes" if self.at_edge else "starts", picked, self._next, picked - 1)
        for k in range(self._next, picked + 1):  # this side no longer needs their announcements
            self.streamed.forget(k)
        return picked


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
            if self.remove:  # taken (processed) or not (passed over, or given up by the producer)
                self.streamed.path(k).unlink(missing_ok=True)
                self.streamed.taken_path(k).unlink(missing_ok=True)
            self.streamed.forget(k)
        self._released = max(self._released, frame_idx)


class SessionFrames:
    """The FrameSource a live session reads: frame j is the j-th frame picked (see the module doc).
    `max_cond_frames`: the prompted frames a session keeps in memory attention (worker/model/sam2/session.py)."""

    prefetch = LOOKAHEAD
    realtime = True  # its frames age in real time: its session's turns on a shared model come first

    def __init__(self, live: LiveFrames) -> None:
        self.live = live
        self.max_cond_frames = live.max_cond_frames
        self.dir: Path = live.dir
        self.check: Callable[[], None] = live.streamed.check
        self.turn_wait: Callable[[], None] | None = live.streamed.turn_wait

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

    def watch(self, check: Callable[[], None]) -> None:
        """Its waits are its stream's: the check goes there too."""
        self.check = check
        self.live.streamed.check = check

    def ready(self, frame_idx: int) -> bool:
        """Session frame j is picked, or a frame of the source newer than the last pick is announced (a
        non-blocking read of the stream when the last one showed none; see `LiveFrames.ready`)."""
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
