"""Integration tier: a job's JPEG frames are removed once the job has ended and its producer has
finished, whichever of the two comes last (runtime/cleanup.py); never while a retry or a streaming
producer still needs them, never with keep_frames on, never a frame directory a backend made itself.
A streamed job that ends early (cancelled, failed) also stops its producer's decoding."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import redis

from producer.control import cancel
from producer.decode import extract_frames
from producer.submission import enqueue_job, submit
from runtime.settings import Settings
from schemas import messages
from schemas.errors import JobFailed
from schemas.prompts import ObjectPrompt
from tests.fakes import ColourSegmenter
from tests.videos import slow_down_jpeg_writes
from tests.workers import wait_for
from worker.service.loop import Worker

pytestmark = pytest.mark.integration

N = 40
SIZE = (96, 64)


@pytest.fixture
def slow_producer(monkeypatch: pytest.MonkeyPatch) -> None:
    """About 0.1 s a frame (2 s for the video): long enough to end the job while it decodes."""
    slow_down_jpeg_writes(monkeypatch, 0.1)


def submit_in_thread(video: Path, prompt: list[ObjectPrompt], settings: Settings,
                     job_id: str) -> tuple[threading.Thread, list[BaseException]]:
    """Start submitting in a thread; the list receives what `submit` raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            submit(video, prompt, settings=settings, job_id=job_id)
        except BaseException as e:  # noqa: BLE001 - checked by the caller
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def run_worker(settings: Settings, client: redis.Redis) -> None:
    Worker(settings=settings, segmenter=ColourSegmenter(), client=client).run(burst=True)


def job_state(client: redis.Redis, settings: Settings, job_id: str) -> str:
    return (client.hget(settings.keys.job(job_id), "state") or b"").decode()


@pytest.mark.parametrize("stream", [True, False])
def test_a_finished_job_leaves_its_render_and_results_but_not_its_frames(
    stream: bool, video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis
) -> None:
    submit(video, prompt, settings=settings, client=redis_client, job_id="done", stream=stream)
    frames_dir = settings.storage_root / "jobs/done/frames"
    assert len(list(frames_dir.glob("*.jpg"))) == N  # the producer finished first: the worker removes them
    run_worker(settings, redis_client)
    assert job_state(redis_client, settings, "done") == "completed"
    assert not frames_dir.exists()
    assert (settings.storage_root / "jobs/done/render.mp4").is_file()
    frames = [m for m in (messages.decode(f) for _, f in redis_client.xrange(settings.keys.results("done")))
              if isinstance(m, messages.FrameResult)]
    assert len(frames) == N


def test_keep_frames_on_keeps_them(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis
) -> None:
    settings = dataclasses.replace(settings, keep_frames="on")
    submit(video, prompt, settings=settings, client=redis_client, job_id="kept")
    run_worker(settings, redis_client)
    assert job_state(redis_client, settings, "kept") == "completed"
    assert len(list((settings.storage_root / "jobs/kept/frames").glob("*.jpg"))) == N


def test_a_failed_job_loses_its_frames_too(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis
) -> None:
    submit(video, prompt, settings=settings, client=redis_client, job_id="bad", stream=False)
    (settings.storage_root / "jobs/bad/frames/00003.jpg").unlink()  # a permanent error at the worker
    run_worker(settings, redis_client)
    assert job_state(redis_client, settings, "bad") == "failed"
    assert not (settings.storage_root / "jobs/bad/frames").exists()


def test_a_frame_directory_a_backend_made_is_never_removed(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis
) -> None:
    own = settings.storage_root / "backend/clip7"
    info = extract_frames(video, own)
    job = messages.JobMessage(job_id="own", frames_dir="backend/clip7", num_frames=info.num_frames,
                              width=info.width, height=info.height, fps=info.fps, prompts=tuple(prompt))
    assert enqueue_job(redis_client, settings.keys, job)
    run_worker(settings, redis_client)
    assert job_state(redis_client, settings, "own") == "completed"
    assert len(list(own.glob("*.jpg"))) == N


def test_a_streamed_job_cancelled_mid_decode_stops_its_producer_which_removes_the_frames(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis,
    slow_producer: None
) -> None:
    """The worker ends the job first and must leave the frames (the producer is still writing them);
    the producer notices within a second, stops decoding, and removes them."""
    worker = Worker(settings=settings, segmenter=ColourSegmenter(), client=redis.Redis.from_url(settings.redis_url))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        submitter, errors = submit_in_thread(video, prompt, settings, "cut")
        wait_for(lambda: job_state(redis_client, settings, "cut") == "running", timeout_s=20, what="the job to run")
        assert cancel("cut", settings=settings, client=redis_client) == "requested"
        wait_for(lambda: job_state(redis_client, settings, "cut") == "cancelled", timeout_s=20, what="the cancel")
        frames_dir = settings.storage_root / "jobs/cut/frames"
        assert frames_dir.is_dir(), "the worker removed frames the producer was still writing"
        submitter.join(10)
    finally:
        worker.stopping = True
        thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], JobFailed), errors
    assert "ended cancelled while its video was being decoded, so decoding stopped" in str(errors[0])
    announced = redis_client.xlen(settings.keys.frames("cut")) - 1  # less the error marker
    assert announced < N, "decoding went on to the end"
    assert not frames_dir.exists()
    assert redis_client.ttl(settings.keys.frames("cut")) > 0  # the frames stream expires with the results


def test_a_queued_streamed_job_cancelled_before_any_worker_stops_its_producer(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis,
    slow_producer: None
) -> None:
    submitter, errors = submit_in_thread(video, prompt, settings, "early")
    wait_for(lambda: job_state(redis_client, settings, "early") == "queued", timeout_s=20, what="the job to be queued")
    assert cancel("early", settings=settings, client=redis_client) == "cancelled"
    assert (settings.storage_root / "jobs/early/frames").is_dir()  # the producer is still writing them
    submitter.join(10)
    assert len(errors) == 1 and isinstance(errors[0], JobFailed) and "ended cancelled" in str(errors[0])
    assert not (settings.storage_root / "jobs/early/frames").exists()
    assert redis_client.ttl(settings.keys.frames("early")) > 0
