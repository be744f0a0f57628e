"""How a live session samples its source (worker/sources/live.py): each pick is the newest frame
announced, so a model slower than the source looks at evenly spaced frames instead of bursts of
consecutive ones; a session starts at the live edge; a model that keeps up skips nothing. Every
announced frame up to the last pick gets exactly one entry, processed or skipped.

The source is driven by the test, event by event (no sleeps, no wall-clock bounds): `announce(n)` is the
camera going on while the model works on a frame, and a `wait` for a frame not yet announced is the model
waiting for the camera."""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from worker.sources.frames import FrameInfo
from worker.sources.live import LiveFrames

FRAME_S = 1 / 30  # the camera's time between frames


class ScriptedStream:
    """StreamedFrames as the picking side sees it, with the camera driven by the test. Frames the producer
    announced (`produced`) are known to the reader (`available`) only once it reads the stream: a `wait`
    for a frame it has not read yet (a blocking read: everything on the stream), or `poll_now`. Frame k is
    captured FRAME_S before frame k+1, the newest just now."""

    def __init__(self, *, produced: int = 0) -> None:
        self.dir = Path("frames")
        self.produced = produced
        self.available = 0
        self.ended = False
        self.camera_waits = 0  # waits that found nothing new on the stream: the next frame came
        self.while_waiting: Callable[[], None] | None = None  # run in such a wait, before the frame comes
        self.forgets: Counter[int] = Counter()
        self.outages, self.outage_s = 0, 0.0
        self.turn_wait: Callable[[], None] | None = None

    def announce(self, n: int) -> None:
        assert not self.ended
        self.produced += n

    def end(self) -> None:
        self.ended = True

    @property
    def total(self) -> int | None:
        return self.produced if self.ended and self.available >= self.produced else None

    def check(self) -> None:
        return None

    def wait(self, frame_idx: int) -> bool:
        if frame_idx < self.available:
            return True
        self.available = self.produced  # a blocking read returns at once with what is on the stream
        if frame_idx >= self.available:
            if self.ended:
                return False
            self.camera_waits += 1  # nothing new: the read blocks until the camera's next frame
            if self.while_waiting is not None:
                self.while_waiting()
            self.produced = self.available = frame_idx + 1
        return True

    def poll_now(self) -> None:
        self.available = self.produced

    def info(self, frame_idx: int) -> FrameInfo | None:
        if frame_idx >= self.available or self.forgets[frame_idx]:
            return None
        captured = time.time() - (self.produced - 1 - frame_idx) * FRAME_S
        return FrameInfo(at=captured, captured_at=captured, pts_s=frame_idx * FRAME_S)

    def forget(self, frame_idx: int) -> None:
        self.forgets[frame_idx] += 1

    def path(self, frame_idx: int) -> Path:
        return self.dir / f"{frame_idx:05d}.jpg"

    def taken_path(self, frame_idx: int) -> Path:  # frames here are shared by tests: taking does not rename
        return self.path(frame_idx)

    def take(self, frame_idx: int) -> bool:
        return True


def live_frames(stream: ScriptedStream, **kwargs: object) -> LiveFrames:
    return LiveFrames(stream, max_latency_s=2.0, **kwargs)  # type: ignore[arg-type]


def pick(live: LiveFrames, session_frame: int) -> int:
    assert live.pick_through(session_frame)
    return live.source_index(session_frame)


def entries(picks: Iterable[int], *, start_after: int = -1) -> tuple[Counter[int], list[int]]:
    """The result entries the runner puts to the sink for these picks (worker/service/runner.py: before
    each processed frame, those passed over since the previous one as skipped): frame -> entries, and the
    skipped frames."""
    counts: Counter[int] = Counter()
    skipped: list[int] = []
    last = start_after
    for k in picks:
        skipped.extend(range(last + 1, k))
        counts.update(range(last + 1, k + 1))
        last = k
    return counts, skipped


def test_under_load_the_picks_are_evenly_spaced_and_each_frame_gets_one_entry() -> None:
    """The camera announces 3 to 6 frames while the model works on one: each pick is the newest frame,
    so the gaps follow the model's pace. The old policy took consecutive frames until its latency budget
    was nearly spent, then jumped: gaps of 1, then one of about the whole budget."""
    stream = ScriptedStream()
    live = live_frames(stream)
    per_step = [4, 5, 3, 4, 6, 4, 3, 5, 4, 4]
    picks = []
    for j in range(150):
        picks.append(pick(live, j))
        assert picks[-1] == stream.produced - 1, f"pick {j}: frame {picks[-1]}, the newest is {stream.produced - 1}"
        stream.announce(per_step[j % len(per_step)])  # the camera goes on while the model segments
    gaps = [b - a for a, b in zip(picks, picks[1:])]
    assert max(gaps) <= 2 * statistics.median(gaps), f"gaps {sorted(Counter(gaps).items())}: bursts"
    assert min(gaps) >= 3
    counts, skipped = entries(picks)
    assert set(counts) == set(range(picks[-1] + 1)) and set(counts.values()) == {1}
    assert len(skipped) == picks[-1] + 1 - len(picks)
    assert stream.forgets == counts  # the picking side forgets each announcement it passed, once


def test_a_queued_session_starts_at_the_newest_frame_announced() -> None:
    """A live job that waited in the queue while its camera announced 40 frames (all younger than the
    latency budget, which the old policy would have worked through from frame 0)."""
    stream = ScriptedStream(produced=40)
    live = live_frames(stream)
    assert live.first_pick is None
    assert pick(live, 0) == 39 and live.first_pick == 39
    stream.announce(2)
    assert pick(live, 1) == 41 and live.first_pick == 39
    counts, skipped = entries([39, 41])
    assert skipped == [*range(39), 40] and set(counts.values()) == {1}


def test_a_resumed_session_starts_at_the_newest_frame_and_never_before_start_after() -> None:
    stream = ScriptedStream(produced=40)  # an earlier attempt published frames up to 9
    live = live_frames(stream, start_after=9, at_edge=True)
    assert pick(live, 0) == 39 and live.first_pick == 39
    assert entries([39], start_after=9)[1] == list(range(10, 39))
    # only frames an earlier attempt published are announced: the first pick waits for the next one
    stream = ScriptedStream(produced=10)
    live = live_frames(stream, start_after=9, at_edge=True)
    assert pick(live, 0) == 10 and live.first_pick == 10 and stream.camera_waits == 1


def test_a_model_that_keeps_up_picks_every_frame() -> None:
    """One frame announced per pick (or none yet: the model waits for the camera): nothing is skipped."""
    stream = ScriptedStream()
    live = live_frames(stream)
    picks = []
    for j in range(120):
        if j % 3:
            stream.announce(1)  # the frame came while the model was busy
        picks.append(pick(live, j))  # else the model waits for it
    assert picks == list(range(120)) and live.first_pick == 0
    assert entries(picks)[1] == [] and stream.camera_waits == 40
    stream.end()
    assert not live.pick_through(120) and live.view.total == 120


def test_the_next_frame_is_ready_once_announced_though_not_read_yet() -> None:
    """At the end of a model step a live session keeps the model if its next frame is there (`Turn.hold`):
    each pick reads the stream up to the newest frame, so `ready` reads it again before saying no."""
    stream = ScriptedStream()
    live = live_frames(stream)
    stream.announce(3)
    assert live.ready(0) and pick(live, 0) == 2
    assert live.ready(0) and not live.ready(1) and not live.ready(2)
    stream.announce(1)  # on the stream, not read by the session yet
    assert live.ready(1) and not live.ready(2)
    assert pick(live, 1) == 3 and stream.camera_waits == 0


def test_a_pick_waiting_for_the_source_holds_up_neither_the_runner_nor_the_model() -> None:
    """The session's loader picks a frame ahead, and at the live edge that pick waits for the camera: the
    runner's `source_index` (publishing the frame before) and the session's `ready` (with the model held)
    must not wait with it. Another thread calls them while the pick waits, and the camera's frame comes
    only once they have returned (a regression hangs here, until pytest's timeout)."""
    stream = ScriptedStream(produced=5)
    live = live_frames(stream)
    assert pick(live, 0) == 4
    seen: list[tuple[int, bool]] = []
    returned = threading.Event()

    def runner_and_model() -> None:
        seen.append((live.source_index(0), live.ready(1)))
        returned.set()

    def while_waiting() -> None:
        threading.Thread(target=runner_and_model, daemon=True).start()
        returned.wait()

    stream.while_waiting = while_waiting
    assert pick(live, 1) == 5
    assert seen == [(4, False)] and stream.camera_waits == 1


def test_a_frame_its_producer_gave_up_is_passed_over_for_a_newer_one() -> None:
    """The producer gives up an untaken frame for a newer one (producer/live_buffer.py): the session's take of
    it fails, and it takes the newest frame instead; the one given up gets a `skipped` entry like any other
    frame passed over."""

    class GivingUp(ScriptedStream):
        given_up = {9}

        def take(self, frame_idx: int) -> bool:
            if frame_idx in self.given_up:
                self.announce(1)  # the frame that replaced it
                return False
            return True

    stream = GivingUp(produced=10)
    live = live_frames(stream)
    assert live.pick_through(0) and live.source_index(0) == 10 and live.first_pick == 10
