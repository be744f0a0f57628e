"""Unit tier: a live producer's bound on frames no worker has taken yet (producer/live_buffer.py), with the
worker's side of the hand-off (StreamedFrames.take: a rename) on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from producer.live_buffer import IngestBuffer
from schemas.storage import frame_name, taken_frame_name

FPS = 30.0


def camera(buffer: IngestBuffer, folder: Path, frames: range, *, t0: float = 0.0,
           take_every: int | None = None) -> list[int]:
    """Frames arriving at FPS; each admitted one is written. With `take_every`, a worker takes the newest
    held frame every that many frames (as worker/sources/live.py does). Returns the frames taken."""
    taken: list[int] = []
    for k in frames:
        t = t0 + k / FPS
        admit = buffer.admit(t, t)
        if admit.write:
            (folder / frame_name(k)).write_bytes(b"jpeg")
            buffer.added(k, t)
        if take_every and k % take_every == take_every - 1:
            held = sorted(int(p.name[:5]) for p in folder.glob("?????.jpg"))
            newest = [h for h in held if not taken or h > taken[-1]]
            if newest:
                os.rename(folder / frame_name(newest[-1]), folder / taken_frame_name(newest[-1]))
                taken.append(newest[-1])
                for old in held:  # the worker releases what it passed over once the taken frame is published
                    if old < newest[-1]:
                        (folder / frame_name(old)).unlink(missing_ok=True)
    return taken


def untaken(folder: Path) -> int:
    return len(list(folder.glob("?????.jpg")))


def test_a_queued_job_holds_at_most_the_limit_and_keeps_it_fresh(tmp_path: Path) -> None:
    """No worker yet (a job in the queue) for 60 s of a 30 fps camera: at most `limit` JPEGs on disk, a frame
    written every half `idle_refresh_s` (the oldest held one given up for it), the rest dropped at ingest."""
    buffer = IngestBuffer(lambda k: tmp_path / frame_name(k), limit=4, idle_refresh_s=2.0)
    high = 0
    for k in range(1800):
        t = k / FPS
        admit = buffer.admit(t, t)
        if admit.write:
            assert admit.replaces is None or not (tmp_path / frame_name(admit.replaces)).exists()
            (tmp_path / frame_name(k)).write_bytes(b"jpeg")
            buffer.added(k, t)
        high = max(high, untaken(tmp_path))
        newest = max(int(p.name[:5]) for p in tmp_path.glob("?????.jpg"))
        assert t - newest / FPS <= 1.0 + 1 / FPS  # half of idle_refresh_s
    assert high == 4 and buffer.held == 4
    written = 4 + buffer.replaced
    assert buffer.dropped == 1800 - written and 55 <= written <= 61  # about one encoding a second


def test_a_worker_slower_than_the_camera_costs_bounded_disk_and_about_two_encodings_per_take(tmp_path: Path) -> None:
    buffer = IngestBuffer(lambda k: tmp_path / frame_name(k), limit=4, idle_refresh_s=2.0)
    taken = camera(buffer, tmp_path, range(900), take_every=10)  # a worker at 3 frames/s
    assert untaken(tmp_path) <= 4 and buffer.held <= 4
    written = 900 - buffer.dropped
    assert written <= 2.5 * len(taken)  # about two encodings a take, not every frame (900)
    steady = taken[10:]  # once the worker's pace is known
    gaps = [b - a for a, b in zip(steady, steady[1:])]
    assert max(gaps) <= 2 * sorted(gaps)[len(gaps) // 2]  # evenly spaced takes
    # each taken frame was at most half the worker's pace (5 frames) old, plus a frame
    assert len(taken) == 90 and all(k - t <= 6 for k, t in zip(range(9, 900, 10), taken) if t >= steady[0])


def test_a_worker_that_keeps_up_loses_nothing(tmp_path: Path) -> None:
    buffer = IngestBuffer(lambda k: tmp_path / frame_name(k), limit=4, idle_refresh_s=2.0)
    taken = camera(buffer, tmp_path, range(300), take_every=1)
    assert buffer.dropped == 0 and buffer.replaced == 0 and taken == list(range(300))


def test_a_frame_taken_while_being_given_up_stays_taken(tmp_path: Path) -> None:
    """The worker's rename wins over the producer's removal: the taken frame stays whole and is not counted
    as replaced; a frame the producer removed first cannot be taken (the worker picks a newer one)."""
    from worker.sources.frames import StreamedFrames

    class Frames(StreamedFrames):
        def __init__(self, folder: Path) -> None:  # only the file side of StreamedFrames
            self.dir = folder

    buffer = IngestBuffer(lambda k: tmp_path / frame_name(k), limit=2, idle_refresh_s=0.0)
    for k in (0, 1):
        (tmp_path / frame_name(k)).write_bytes(b"jpeg")
        buffer.added(k, k / FPS)
    frames = Frames(tmp_path)
    assert frames.take(0) and frames.taken_path(0).read_bytes() == b"jpeg"  # taken first...
    assert buffer.admit(2 / FPS, 2 / FPS).write  # ...so the producer sees a take: room, nothing removed
    assert buffer.replaced == 0 and frames.taken_path(0).exists()
    (tmp_path / frame_name(2)).write_bytes(b"jpeg")
    buffer.added(2, 2 / FPS)
    admit = buffer.admit(10.0, 10.0)  # full (1, 2) and stale: 1 is given up for the new frame
    assert admit.write and admit.replaces == 1 and buffer.replaced == 1
    assert not frames.take(1)  # the producer removed it first
    assert frames.take(2) and frames.take(2)  # a second look at a frame taken already is still taken


def test_a_cameras_fps_samples_at_ingest_even_for_a_worker_that_keeps_up(tmp_path: Path) -> None:
    buffer = IngestBuffer(lambda k: tmp_path / frame_name(k), limit=4, idle_refresh_s=2.0, min_spacing_s=1 / 5)
    taken = camera(buffer, tmp_path, range(300), take_every=1)  # 10 s at 30 fps, sampled to 5 fps
    assert 49 <= len(taken) <= 51 and buffer.dropped == 300 - len(taken)
    assert all(b - a >= 6 for a, b in zip(taken, taken[1:]))  # at least 1/5 s apart


def test_the_limit_is_checked() -> None:
    with pytest.raises(ValueError, match="live_buffer_frames must be >= 1"):
        IngestBuffer(lambda k: Path(str(k)), limit=0, idle_refresh_s=1.0)
