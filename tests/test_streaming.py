"""Integration tier: streaming hand-off. The job is enqueued as soon as the prompted frames are on
disk, the worker starts while the producer is still decoding, and decoding failures reach the job."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

import producer.decode as decode
from producer.results import follow
from producer.submission import submit
from runtime.settings import Settings
from schemas import messages
from schemas.errors import PromptError, VideoError
from schemas.names import TERMINAL_ENTRY_ID
from schemas.prompts import ObjectPrompt
from tests.fakes import ColourSegmenter
from tests.videos import disc_center, make_video, slow_down_jpeg_writes
from tests.workers import wait_for
from worker.service.loop import Worker

pytestmark = pytest.mark.integration

N = 80
SIZE = (96, 64)


@pytest.fixture
def slow_jpeg(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the producer take ~20 ms per frame, so decoding visibly outlasts the first results."""
    slow_down_jpeg_writes(monkeypatch, 0.02)
    monkeypatch.setattr(decode, "ENCODE_THREADS", 1)


def prompt(frame_idx: int = 0) -> ObjectPrompt:
    x, y = disc_center(frame_idx, N, SIZE)
    return ObjectPrompt(1, frame_idx, ((x, y),), (1,))


def start_worker(settings: Settings) -> tuple[Worker, threading.Thread]:
    worker = Worker(settings=settings, segmenter=ColourSegmenter(), client=redis.Redis.from_url(settings.redis_url),
                    name="streamer")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return worker, thread


def stop_worker(worker: Worker, thread: threading.Thread) -> None:
    worker.stopping = True
    thread.join(10)


def test_first_result_arrives_while_the_video_is_still_decoding(
    video: Path, settings: Settings, redis_client: redis.Redis, slow_jpeg: None
) -> None:
    worker, thread = start_worker(settings)
    done: dict[str, Any] = {}

    def run_submit() -> None:
        done["result"] = submit(video, [prompt(0)], settings=settings, job_id="live")
        done["at"] = time.monotonic()

    submitter = threading.Thread(target=run_submit)
    t0 = time.monotonic()
    submitter.start()
    first_at = None
    wait_for(lambda: redis_client.exists(settings.keys.job("live")), timeout_s=30, what="the job to be enqueued")
    frames = []
    for msg in follow("live", settings=settings, client=redis_client, timeout_s=30):
        if isinstance(msg, messages.FrameResult):
            first_at = first_at or time.monotonic()
            frames.append(msg.frame_idx)
        last = msg
    submitter.join()
    stop_worker(worker, thread)
    assert first_at is not None and first_at < done["at"], "first result only after decoding finished"
    assert first_at - t0 < 0.5 * (done["at"] - t0)
    assert isinstance(last, messages.Completed) and last.num_frames == N and frames == list(range(N))
    assert redis_client.hget(settings.keys.job("live"), "num_frames") == str(N).encode()


def test_job_waits_for_its_last_prompted_frame(video: Path, settings: Settings, redis_client: redis.Redis,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = decode.write_jpeg

    def spy(path: Path, image: np.ndarray, quality: int, whole: bool = True) -> None:
        if not seen and redis_client.exists(settings.keys.job("late")):
            seen.append(int(path.name[:5]))
        real(path, image, quality, whole)

    monkeypatch.setattr(decode, "write_jpeg", spy)
    submit(video, [prompt(0), ObjectPrompt(2, 30, ((5.0, 5.0),), (1,))], settings=settings, client=redis_client,
           job_id="late")
    assert seen and seen[0] > 30  # enqueued only once frame 30 was on disk
    Worker(settings=settings, segmenter=ColourSegmenter(), client=redis_client).run(burst=True)
    assert redis_client.hget(settings.keys.job("late"), "state") == b"completed"


@pytest.mark.parametrize("length", [40, 400])
def test_job_is_enqueued_after_the_same_few_frames_whatever_the_length(
    length: int, settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """What the first result waits for does not grow with the video: the job is on the queue once the
    first frames are on disk, for a 400-frame video as for a 40-frame one."""
    video = make_video(tmp_path / f"v{length}.mp4", num_frames=length, size_wh=SIZE, fps=10)
    job_id = f"len{length}"
    started: list[int] = []
    real = decode.write_jpeg

    def spy(path: Path, image: np.ndarray, quality: int, whole: bool = True) -> None:
        if not redis_client.exists(settings.keys.job(job_id)):
            started.append(int(path.name[:5]))
        time.sleep(0.004)  # a frame's work outlasts a thread's start-up, as with real frame sizes
        real(path, image, quality, whole)

    monkeypatch.setattr(decode, "write_jpeg", spy)
    submit(video, [prompt(0)], settings=settings, client=redis_client, job_id=job_id)
    frames_before_enqueue = max(started) + 1  # frames whose writing began before the job was queued
    assert frames_before_enqueue <= decode.MAX_IN_FLIGHT + 3, f"{frames_before_enqueue} frames of {length}"
    assert redis_client.hget(settings.keys.job(job_id), "num_frames") == str(length).encode()


def test_prompt_past_the_end_is_refused_before_anything_is_enqueued(
    video: Path, settings: Settings, redis_client: redis.Redis
) -> None:
    with pytest.raises(PromptError, match=f"decoded video has {N} frames"):
        submit(video, [prompt(0), ObjectPrompt(2, N + 5, ((5.0, 5.0),), (1,))], settings=settings,
               client=redis_client, job_id="past")
    assert not redis_client.exists(settings.keys.job("past"), settings.keys.frames("past"))
    assert redis_client.xlen(settings.keys.jobs) == 0
    assert not (settings.storage_root / "jobs/past/frames").exists()


def test_decoding_failure_after_enqueue_fails_the_job(
    video: Path, settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = decode.write_jpeg

    def breaks(path: Path, image: np.ndarray, quality: int, whole: bool = True) -> None:
        if path.name == "00040.jpg":
            raise VideoError("disk full while writing 00040.jpg")
        real(path, image, quality, whole)

    monkeypatch.setattr(decode, "write_jpeg", breaks)
    with pytest.raises(VideoError, match="disk full"):
        submit(video, [prompt(0)], settings=settings, client=redis_client, job_id="broken")
    Worker(settings=settings, segmenter=ColourSegmenter(), client=redis_client).run(burst=True)
    state = redis_client.hgetall(settings.keys.job("broken"))
    assert state[b"state"] == b"failed" and b"disk full" in state[b"error"]
    last = messages.decode(redis_client.xrange(settings.keys.results("broken"))[-1][1])
    assert isinstance(last, messages.Failed) and "producer failed while decoding" in last.error


@pytest.mark.parametrize(
    "clip, expected",
    [
        ({}, 300),
        ({"stride": 3}, 100),
        ({"max_frames": 50}, 50),
        ({"start_s": 2.0, "end_s": 4.0}, 60),
        ({"start_s": 9.0, "stride": 2}, 15),
    ],
)
def test_expected_frames_from_the_header(clip: dict[str, Any], expected: int) -> None:
    from producer.submission import ClipOptions

    assert ClipOptions(**clip).expected_frames(300, 30.0) == expected
    assert ClipOptions(**clip).expected_frames(0, 30.0) == 0  # unknown: checked while decoding instead


def test_a_frame_already_announced_is_not_held_up_by_a_read_for_a_later_one(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    """The prefetch asks for frame 0 and frames ahead at once: a loader thread blocked reading the
    frames stream for frame 5 must not delay the thread that wants frame 0 (that was the first
    result's latency, up to block_ms)."""
    from worker.sources.frames import StreamedFrames

    stream = "t:frames"
    (tmp_path / "00000.jpg").write_bytes(b"jpeg")
    redis_client.xadd(stream, {"frame_idx": 0}, id="1-0")
    frames = StreamedFrames(redis_client, stream, tmp_path, block_ms=3000, stall_s=30)
    later: list[bool] = []
    waiter = threading.Thread(target=lambda: later.append(frames.wait(5)))
    waiter.start()
    # the waiter has read frame 0's announcement and is blocked reading for more (holding the read lock)
    wait_for(lambda: frames.available >= 1 and frames._poll_lock.locked(), timeout_s=10, what="the waiter to block")
    t0 = time.monotonic()
    assert frames.wait(0)
    assert time.monotonic() - t0 < 1.0
    redis_client.xadd(stream, {"end": 1}, id="2-0")  # the video has one frame: frame 5 never comes
    waiter.join(10)
    assert later == [False]
    assert frames.total == 1 and not frames.wait(1)


def test_a_worker_killed_mid_stream_is_replaced_and_the_job_completes_with_every_frame_once(
    video: Path, settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """kill -9 the worker while the producer is still decoding: the next worker reclaims the job after
    one lease, reads the frames stream from the start, waits for the frames still to come, and the
    result stream ends with every frame once."""
    from tests.workers import WorkerProcess, wait_for

    killed = threading.Event()  # frames after the 20th wait for the kill: decoding outlasts it on any machine
    slow_down_jpeg_writes(monkeypatch, 0.05, gate=killed, gated_from=20)
    done: dict[str, float] = {}

    def run_submit() -> None:
        submit(video, [prompt(0)], settings=settings, job_id="midkill")
        done["at"] = time.time()

    submitter = threading.Thread(target=run_submit)
    a = WorkerProcess(settings, "a", tmp_path, lease_s=1.0, delay_s=0.002)
    b = None
    try:
        submitter.start()
        wait_for(lambda: int(redis_client.hget(settings.keys.job("midkill"), "frames_done") or 0) >= 5,
                 what="a publishes frames")
        b = WorkerProcess(settings, "b", tmp_path, lease_s=1.0, delay_s=0.002)  # idle: a holds the job
        wait_for(lambda: redis_client.exists(settings.keys.worker_health("b")), what="b is up")
        assert "at" not in done, "decoding ended before the kill"
        a.kill()
        killed.set()
        wait_for(lambda: redis_client.hget(settings.keys.job("midkill"), "state") == b"completed", what="b completes")
        submitter.join(30)
    finally:
        killed.set()
        a.kill()
        if b is not None:
            b.kill()
    starts = [m for m in (messages.decode(f) for _, f in redis_client.xrange(settings.keys.events))
              if isinstance(m, messages.Started)]
    assert [s.worker for s in starts] == ["a", "b"] and starts[1].attempt == 2
    assert starts[1].at < done["at"], "b started only after decoding had finished: not a mid-stream reclaim"
    ids = [i.decode() for i, _ in redis_client.xrange(settings.keys.results("midkill"))]
    assert ids == ["0-1"] + [f"{k + 1}-0" for k in range(N)] + [TERMINAL_ENTRY_ID], ids
    last = messages.decode(redis_client.xrange(settings.keys.results("midkill"))[-1][1])
    assert isinstance(last, messages.Completed) and last.num_frames == N
