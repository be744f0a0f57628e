"""One model process holding several jobs' sessions at once (worker/model/process.py `shared`, the way
`session_batch` > 1 runs with `model_process` on: batching needs the sessions on one model), driven
through the fake colour segmenter: each session gets its own frames, in order, as the model in this
process gives them; one closes early (or while it waits for a frame that never comes) without touching
the other; a child that dies fails every session open on it, and the next job starts a new one. A
worker with `--concurrency 2` on a shared model process completes both jobs exactly once."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from producer.submission import submit
from runtime.settings import Settings
from tests.fakes import FROM_ENV, ColourSegmenter
from tests.test_fake_segmenter import prompts, write_frames
from tests.test_reliability import assert_complete_exactly_once, state
from tests.videos import disc_prompt, make_video
from tests.workers import WorkerProcess, stop_all, wait_for
from worker.model.process import ModelProcess, ModelProcessDied
from worker.model.segment import FrameMasks
from worker.sources.frames import DirFrames, StreamedFrames

N = 8
FAKE = Settings(model_process="on", segmenter=FROM_ENV, device="cpu", session_batch=2)


@pytest.fixture
def frames(tmp_path: Path) -> DirFrames:
    write_frames(tmp_path / "frames")
    return DirFrames(tmp_path / "frames", N)


@pytest.fixture
def shared(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModelProcess]:
    monkeypatch.setenv("VSEG_FAKE_DELAY_S", "0.02")  # steps take turns on the child's one model
    proc = ModelProcess(FAKE, shared=True)
    yield proc
    proc.close()


def run_in_threads(model: ModelProcess, frames: DirFrames, count: int) -> list[list[FrameMasks] | BaseException]:
    results: list[list[FrameMasks] | BaseException] = [[] for _ in range(count)]

    def one(k: int) -> None:
        try:
            results[k] = list(model.segment(frames, prompts(), width=160, height=120))
        except BaseException as e:  # noqa: BLE001 - reported to the test
            results[k] = e

    threads = [threading.Thread(target=one, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_sessions_at_once_each_get_their_own_frames(shared: ModelProcess, frames: DirFrames) -> None:
    theirs = list(ColourSegmenter().segment(frames, prompts(), width=160, height=120))
    results = run_in_threads(shared, frames, 3)
    for ours in results:
        assert isinstance(ours, list), ours
        assert [o.frame_idx for o in ours] == list(range(N))
        for o, t in zip(ours, theirs, strict=True):
            assert o.obj_ids == t.obj_ids and np.array_equal(o.masks, t.masks)
    assert shared.restarts == 0 and shared.inbox.count() == 0  # every session closed its inbox


def test_one_session_closed_early_leaves_the_other_running(shared: ModelProcess, frames: DirFrames) -> None:
    pid = shared.pid
    early = shared.segment(frames, prompts(), width=160, height=120)
    assert next(early).frame_idx == 0
    other = shared.segment(frames, prompts(), width=160, height=120)
    assert next(other).frame_idx == 0
    early.close()
    assert [o.frame_idx for o in other] == list(range(1, N))
    assert shared.pid == pid and shared.restarts == 0


def test_a_session_waiting_for_a_frame_is_closed_promptly_without_the_child_killed(
    shared: ModelProcess, frames: DirFrames, settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A streamed job whose producer announces nothing: its session waits in the child. Closing it ends the
    wait at once (the source's check), so the child is not killed and its other session goes on."""
    model = ModelProcess(Settings(model_process="on", segmenter=FROM_ENV, device="cpu", session_batch=2,
                                  redis_url=settings.redis_url), shared=True)
    try:
        (tmp_path / "empty").mkdir()
        waiting = StreamedFrames(redis_client, "vseg:frames:never", tmp_path / "empty", block_ms=100, stall_s=60.0)
        cancel = threading.Event()

        def check() -> None:  # the job's check: a cancel (the worker's side reads it every 0.2 s)
            if cancel.is_set():
                raise RuntimeError("cancelled")

        waiting.check = check
        left: list[float] = []

        def stuck() -> None:
            with pytest.raises(RuntimeError, match="cancelled"), model.open_session(
                    waiting, prompts()[1:], width=160, height=120) as session:
                next(session)  # the child waits for a frame that never comes
            left.append(time.monotonic())

        running = model.segment(frames, prompts(), width=160, height=120)
        assert next(running).frame_idx == 0
        thread = threading.Thread(target=stuck)
        thread.start()
        time.sleep(1.0)
        pid = model.pid
        t0 = time.monotonic()
        cancel.set()
        thread.join(10)
        assert left and left[0] - t0 < 3.0  # closed in the child at once, not after stop_timeout_s
        assert [o.frame_idx for o in running] == list(range(1, N))
        assert model.pid == pid and model.restarts == 0
    finally:
        model.close()


def test_a_child_that_dies_fails_every_session_on_it_and_the_next_starts_anew(
    frames: DirFrames, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VSEG_FAKE_DELAY_S", "0.05")
    model = ModelProcess(FAKE, shared=True)
    try:
        first = model.pid
        a = model.segment(frames, prompts(), width=160, height=120)
        b = model.segment(frames, prompts(), width=160, height=120)
        assert next(a).frame_idx == 0 and next(b).frame_idx == 0
        assert first is not None
        os.kill(first, signal.SIGKILL)
        for session in (a, b):
            with pytest.raises(ModelProcessDied):
                list(session)
        assert len(list(model.segment(frames, prompts(), width=160, height=120))) == N
        assert model.restarts == 1 and model.pid != first
    finally:
        model.close()


def test_a_worker_holding_two_jobs_on_one_shared_model_process_completes_both(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    video = make_video(tmp_path / "v.mp4", num_frames=16, size_wh=(96, 64), fps=10)
    for job_id in ("p0", "p1"):
        submit(video, [disc_prompt(1, 0, 16, (96, 64))], settings=settings, client=redis_client, job_id=job_id)
    env = {"VSEG_MODEL_PROCESS": "on", "VSEG_SESSION_BATCH": "2"}
    w = WorkerProcess(settings, "w", tmp_path, delay_s=0.03, extra=["--concurrency", "2"], env=env)
    try:
        wait_for(lambda: all(state(redis_client, settings, j).get("state") == "completed" for j in ("p0", "p1")),
                 timeout_s=60, what="both jobs complete")
    finally:
        stop_all(w)
    for job_id in ("p0", "p1"):
        assert_complete_exactly_once(redis_client, settings, job_id, n=16)
    log = w.log()
    assert len(re.findall(r"model process \d+ ready", log)) == 1, log[-3000:]  # one, for both slots
    assert "holds up to 2 job(s) at once" in log
