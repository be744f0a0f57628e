"""The client a backend writes against (producer/client.py, producer/async_client.py), against a real Redis
and a worker process with the fake colour segmenter: submit returns on enqueue while decoding goes on, follow
waits for a job to appear and yields typed items with lazy masks, wait returns the terminal entry, the
commands reach the running job, errors before the enqueue raise and errors after it fail the job."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

import producer.submission
from producer import AsyncClient, Client, Frame, Prompt, Update
from producer.control import CancelAction
from runtime.settings import Settings
from schemas import messages
from schemas.errors import PromptError, RedisUnavailable, UnknownJobError, VideoError
from schemas.rle import decode_mask
from tests.videos import disc_prompt, make_video
from tests.workers import WorkerProcess, stop_all, wait_for

pytestmark = pytest.mark.integration

N = 30
SIZE = (96, 64)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("v") / "v.mp4", num_frames=N, size_wh=SIZE, fps=10)


@pytest.fixture
def worker(settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(settings, "w1", tmp_path, delay_s=0.02)
    yield proc
    stop_all(proc)


@pytest.fixture
def client(settings: Settings, redis_client: redis.Redis) -> Iterator[Client]:
    with Client(settings) as c:
        yield c


def point(obj_id: int = 1, frame: int = 0) -> Prompt:
    return disc_prompt(obj_id, frame, N, SIZE)


class Gate:
    """Holds a submit's decoding after `after` frames until opened (then, with `fail`, raises there)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, after: int, fail: bool = False) -> None:
        self.open = threading.Event()
        self.reached = threading.Event()
        real = producer.submission.extract_frames

        def extract(*args: Any, on_frames: Callable[[int], None] | None = None, **kwargs: Any) -> Any:
            def gated(n: int) -> None:
                if on_frames is not None:
                    on_frames(min(n, after) if n >= after else n)
                if n >= after:
                    self.reached.set()
                    assert self.open.wait(30), "the test never opened the gate"
                    if fail:
                        raise VideoError(f"the video is corrupt after frame {after} (test)")
                    if on_frames is not None:
                        on_frames(n)
            return real(*args, on_frames=gated, **kwargs)

        monkeypatch.setattr(producer.submission, "extract_frames", extract)


def test_submit_returns_on_enqueue_and_follow_yields_typed_items(client: Client, worker: WorkerProcess, video: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch, after=5)
    job = client.submit(video, [point(1)], points=[f"2:{point(1).points_xy[0][0]:.0f},1"])
    assert client.redis.exists(client.settings.keys.job(job.id))  # enqueued when submit returned
    assert gate.reached.wait(30)  # and decoding goes on after it, here held by the test
    with pytest.raises(TimeoutError):
        job.submit_result(timeout_s=0.2)  # still decoding
    gate.open.set()
    items = list(job.follow(timeout_s=60))
    assert isinstance(items[0], messages.Started) and isinstance(items[-1], messages.Completed)
    frames = [i for i in items if isinstance(i, Frame)]
    assert [f.frame_idx for f in frames] == list(range(N))
    obj = frames[3].objects[0]
    assert obj.mask.dtype == bool and obj.mask.shape == (SIZE[1], SIZE[0])
    assert np.array_equal(obj.mask, decode_mask(obj.rle)) and obj.mask.sum() == obj.area > 0
    assert obj.mask is frames[3].objects[0].mask  # decoded once, kept
    assert set(frames[3].masks()) == {1, 2}
    submitted = job.submit_result(timeout_s=30)
    assert submitted is not None and submitted.created and submitted.job_id == job.id
    assert job.wait(timeout_s=5) == items[-1]
    assert job.status().state == "completed" and job.status().frames_done == N


def test_follow_waits_for_a_job_that_appears_later_and_refuses_one_that_never_does(
        client: Client, worker: WorkerProcess, video: Path) -> None:
    got: list[Any] = []
    follower = threading.Thread(target=lambda: got.extend(client.job("later").follow(timeout_s=60)))
    follower.start()
    time.sleep(0.5)
    client.submit(video, [point(1)], job_id="later")
    follower.join(60)
    assert isinstance(got[0], messages.Started) and isinstance(got[-1], messages.Completed), got[-1:]
    with pytest.raises(UnknownJobError, match="no job 'never'"):
        next(client.job("never").follow(appear_s=0.3))
    with pytest.raises(UnknownJobError):
        client.job("never").wait(appear_s=0.3)
    with pytest.raises(UnknownJobError):
        client.job("never").status()


def test_errors_before_the_enqueue_raise_and_leave_nothing(client: Client, video: Path, tmp_path: Path,
                                                           redis_client: redis.Redis) -> None:
    with pytest.raises(VideoError):
        client.submit(tmp_path / "missing.mp4", [point(1)])
    with pytest.raises(PromptError, match="outside"):
        client.submit(video, [Prompt.point(1, 500, 10)])
    with pytest.raises(PromptError, match="bad --box"):
        client.submit(video, boxes=["1:0,0,10"])
    assert not redis_client.keys(f"{client.settings.key_prefix}:job:*")
    assert not list((client.settings.storage_root / "jobs").glob("*")) if (
        client.settings.storage_root / "jobs").exists() else True


def test_an_error_after_the_enqueue_fails_the_job_and_reaches_submit_result(
        client: Client, worker: WorkerProcess, video: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch, after=4, fail=True)
    job = client.submit(video, [point(1)])
    gate.open.set()
    end = job.wait(timeout_s=60)
    assert isinstance(end, messages.Failed) and "corrupt after frame 4" in end.error
    with pytest.raises(VideoError, match="corrupt"):
        job.submit_result(timeout_s=30)


def test_commands_on_a_running_job(client: Client, settings: Settings, tmp_path: Path, video: Path,
                                   redis_client: redis.Redis) -> None:
    slow = WorkerProcess(settings, "slow", tmp_path, delay_s=0.15)
    try:
        job = client.submit(video, [point(1)])
        wait_for(lambda: job.status().frames_done >= 3, 60, "frames")
        reply = job.prompt(points=[f"2:{point(2, 0).points_xy[0][0]:.0f},{point(2, 0).points_xy[0][1]:.0f}@now"])
        assert [c.change for c in reply.changes] == ["added"], reply.describe()
        removed = job.remove(2)
        assert [c.change for c in removed.changes] == ["removed"], removed.describe()
        assert job.cancel().action is CancelAction.REQUESTED
        end = job.wait(timeout_s=60)
        assert isinstance(end, messages.Cancelled)
        assert job.cancel().action is CancelAction.ALREADY_ENDED  # idempotent
        kinds = [type(i).__name__ for i in job.follow()]
        assert "ObjectChange" in kinds and kinds[-1] == "Cancelled"
    finally:
        stop_all(slow)


def test_stop_ends_a_live_job_it_ingests(client: Client, worker: WorkerProcess, tmp_path: Path) -> None:
    long = make_video(tmp_path / "long.mp4", num_frames=200, size_wh=SIZE, fps=20)
    job = client.submit(long, [disc_prompt(1, 0, 200, SIZE)], live=True)
    assert job.status().live
    wait_for(lambda: job.status().frames_done >= 3, 60, "live frames")
    assert "stop requested" in job.stop()
    end = job.wait(timeout_s=60)
    assert isinstance(end, messages.Completed)
    submitted = job.submit_result(timeout_s=30)
    assert submitted is not None and submitted.created


def test_update_entries_are_yielded_as_such(client: Client, settings: Settings, tmp_path: Path, video: Path) -> None:
    """A prompt on a frame already segmented (not @now) on a file job: frames before the prompt's frame get
    `update` entries after their frames were yielded."""
    slow = WorkerProcess(settings, "slow", tmp_path, delay_s=0.1)
    try:
        job = client.submit(video, [point(1)])
        wait_for(lambda: job.status().frames_done >= 8, 60, "frames")
        job.prompt([point(2, 4)])
        items = list(job.follow(timeout_s=60))
    finally:
        stop_all(slow)
    updates = [i for i in items if isinstance(i, Update)]
    assert updates and all(u.objects[0].obj_id == 2 and u.objects[0].mask.shape == (SIZE[1], SIZE[0])
                           for u in updates)
    yielded = {i.frame_idx: n for n, i in enumerate(items) if isinstance(i, Frame)}
    assert all(yielded[u.frame_idx] < items.index(u) for u in updates)  # after the frame it corrects


def test_async_client_has_the_same_names(settings: Settings, worker: WorkerProcess, video: Path,
                                         redis_client: redis.Redis) -> None:
    async def main() -> tuple[list[Any], Any, list[str]]:
        async with AsyncClient(settings) as client:
            events = client.events("async-backend", "c1", start="0")
            job = await client.submit(video, [point(1)])
            items = [item async for item in job.follow(timeout_s=60)]
            end = await job.wait(timeout_s=10)
            status = await job.status()
            assert status.state == "completed"
            seen: list[str] = []

            async def handler(event: Any) -> None:
                seen.append(event.type)

            stop = asyncio.Event()

            async def stop_on_completed(event: Any) -> None:
                await handler(event)
                if event.type == "completed":
                    stop.set()

            await events.run(stop_on_completed, stop=stop)
            return items, end, seen

    items, end, seen = asyncio.run(main())
    assert isinstance(items[0], messages.Started) and items[-1] == end and isinstance(end, messages.Completed)
    assert [i.frame_idx for i in items if isinstance(i, Frame)] == list(range(N))
    assert seen[0] == "started" and seen[-1] == "completed" and "progress" in seen


def test_a_redis_that_does_not_answer_is_one_line_naming_it(video: Path, settings: Settings) -> None:
    import dataclasses

    down = dataclasses.replace(settings, redis_url="redis://:secret@127.0.0.1:1/0")
    with Client(down) as client:
        with pytest.raises(RedisUnavailable, match=r"cannot reach Redis at redis://:\*\*\*@127.0.0.1:1/0") as raised:
            client.submit(video, [point(1)])
        assert "secret" not in str(raised.value)
        with pytest.raises(RedisUnavailable):
            client.job("j").status()

    async def follow_async() -> None:
        async with AsyncClient(down) as a:
            await a.job("j").wait(appear_s=1)

    with pytest.raises(RedisUnavailable):
        asyncio.run(follow_async())
