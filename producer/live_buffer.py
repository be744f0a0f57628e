"""A live producer's bound on the frames no worker has taken yet (`live_buffer_frames`).

A camera does not wait for the worker. Without a bound, a lagging worker or a live job waiting in the queue
costs a JPEG per camera frame on disk, and the encoding of frames the worker then skips unread. So the
producer keeps at most `limit` announced frames that no worker has taken yet:

- The worker takes a frame by renaming its JPEG (`00042.jpg` to `00042.taken.jpg`, schemas/storage.py
  `taken_frame_name`); the producer gives one up by removing it. A rename and a removal of one file cannot
  both succeed, so a frame is either taken (and stays until its result is out) or dropped, never read half
  gone. A worker that finds its pick removed picks the newest frame again (worker/sources/live.py).
- The worker takes the newest frame each time, so a frame older than one it took is passed over: it
  will be skipped, and no longer counts against the bound (its JPEG goes when the worker releases it).
- Frames are written no closer together than half the worker's recent time between takes (before the
  worker's first two takes: half of `idle_refresh_s`, the latency budget); the others are dropped at
  ingest: neither encoded nor announced, counted as `dropped_at_ingest`. Offered twice as fast as it takes
  them, a worker is never kept waiting, and a faster one shows itself within a few takes (the interval
  halves with each). A worker that keeps up with the camera loses no frame.
- A camera's `fps` (cameras.yaml; `submit_live(max_fps=...)`) is a floor on that spacing, whatever the
  worker's pace: frames are sampled at ingest to it.
- A frame written while the buffer is full replaces the oldest frame held (removed: the worker will pass
  it over), so what the worker finds is never much older than half its own pace.

Every frame announced still gets exactly one result entry: a frame removed here is one the worker passes
over, and it publishes a `skipped` entry for it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_EMA = 0.5  # weight of the newest interval between takes


@dataclass(frozen=True)
class Admit:
    """What to do with a new frame: write it (`write`), first removing frame `replaces` (not None), or not."""

    write: bool
    replaces: int | None = None


class IngestBuffer:
    """The frames announced and not yet taken nor passed over, oldest first (see the module doc)."""

    def __init__(self, path: Callable[[int], Path], *, limit: int, idle_refresh_s: float,
                 min_spacing_s: float = 0.0) -> None:
        if limit < 1:
            raise ValueError(f"live_buffer_frames must be >= 1, but got {limit}")
        self.path = path  # frame k's untaken JPEG
        self.limit = limit
        self.idle_refresh_s = idle_refresh_s
        self.min_spacing_s = min_spacing_s  # a camera's `fps`: frames never closer than this, whatever the worker
        self.dropped = 0  # frames dropped at ingest (not encoded, not announced)
        self.replaced = 0  # frames announced, then removed for a newer one before any worker took them
        self.taken = 0  # takes seen
        self._held: deque[tuple[int, float]] = deque()  # (frame, captured_at)
        self._last_take_at: float | None = None
        self._take_interval_s: float | None = None
        self._last_written_at = float("-inf")

    @property
    def held(self) -> int:
        return len(self._held)

    def added(self, frame: int, captured_at: float) -> None:
        """Frame `frame` was written and announced."""
        self._held.append((frame, captured_at))

    def admit(self, captured_at: float, now: float) -> Admit:
        """Whether the frame captured at `captured_at` is written (`now`: the same clock, when it is asked)."""
        self._prune(now)
        spacing_s = (self._take_interval_s if self._take_interval_s is not None else self.idle_refresh_s) / 2
        if captured_at - self._last_written_at < self.min_spacing_s - 1e-3 or (  # (capture clocks jitter)
                self._held and captured_at - self._held[-1][1] < spacing_s):
            self.dropped += 1
            return Admit(False)
        self._last_written_at = captured_at
        if len(self._held) < self.limit:
            return Admit(True)
        oldest, _ = self._held.popleft()
        if self._give_up(oldest):
            self.replaced += 1
        return Admit(True, oldest)

    def _prune(self, now: float) -> None:
        """Forget the frames taken, and those older than the newest taken (passed over: skipped)."""
        newest_taken = None
        for frame, _ in self._held:
            if not self.path(frame).exists():
                newest_taken = frame
        if newest_taken is None:
            return
        while self._held and self._held[0][0] <= newest_taken:
            self._held.popleft()
        self.taken += 1
        if self._last_take_at is not None:
            interval = now - self._last_take_at
            ema = self._take_interval_s
            self._take_interval_s = interval if ema is None else (1 - _EMA) * ema + _EMA * interval
        self._last_take_at = now

    def _give_up(self, frame: int) -> bool:
        """Remove frame `frame`'s JPEG; False when a worker took it first (renamed it: it stays)."""
        try:
            self.path(frame).unlink()
            return True
        except FileNotFoundError:
            return False
