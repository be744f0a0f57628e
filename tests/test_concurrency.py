"""Integration tier: one worker holding several jobs at once (`--concurrency K`, worker/service/slots.py).

Workers run as subprocesses with the fake segmenter (tests/fakes.py), whose per-frame delay is a turn on a
pretend shared model, against a real redis-server. Each job keeps its own lease, attempts and outcome;
turns are fair; SIGTERM hands every job back; a kill -9 has each job reclaimed and resumed once;
admission stops at the (pretend) GPU's memory. SAM 2 itself: tests/test_concurrency_sam2.py.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import redis

from producer.submission import submit
from runtime.logs import EXIT_BROKEN
from runtime.settings import Settings
from schemas import messages
from schemas.prompts import ObjectPrompt
from tests.test_reliability import assert_complete_exactly_once, frames_done, started_events, state
from tests.videos import make_video
from tests.workers import WorkerProcess, stop_all, wait_for

pytestmark = pytest.mark.integration

N = 24
SIZE = (96, 64)


def events(client: redis.Redis, settings: Settings) -> list[messages.Message]:
    return [messages.decode(fields) for _, fields in client.xrange(settings.keys.events)]


def most_held_at_once(client: redis.Redis, settings: Settings) -> int:
    """The most jobs running at once, from the order of started and terminal entries on vseg:events."""
    running: set[str] = set()
    most = 0
    for msg in events(client, settings):
        if isinstance(msg, messages.Started):
            running.add(msg.job_id)
            most = max(most, len(running))
        elif isinstance(msg, (messages.Completed, messages.Failed, messages.Cancelled, messages.Dead)):
            running.discard(msg.job_id)
    return most


def test_jobs_run_at_once_each_exactly_once_and_the_log_says_how_many(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    jobs = ["k0", "k1", "k2"]
    for job_id in jobs:
        submit(video, prompt, settings=settings, client=redis_client, job_id=job_id)
    w = WorkerProcess(settings, "w", tmp_path, delay_s=0.03, extra=["--concurrency", "3"])
    try:
        wait_for(lambda: all(state(redis_client, settings, j).get("state") == "completed" for j in jobs),
                 timeout_s=60, what="three jobs complete")
    finally:
        stop_all(w)
    for job_id in jobs:
        assert_complete_exactly_once(redis_client, settings, job_id)
        assert state(redis_client, settings, job_id)["attempt"] == "1"
    assert most_held_at_once(redis_client, settings) == 3
    assert "holds up to 3 job(s) at once: set by concurrency" in w.log()


def test_no_job_waits_behind_another_whole_video(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path, prompt: list[ObjectPrompt]
) -> None:
    """A short job submitted while a long one runs is done long before it: their frames take turns."""
    long_n, short_n = 80, 8
    long_video = make_video(tmp_path / "long.mp4", num_frames=long_n, size_wh=SIZE, fps=10)
    short_video = make_video(tmp_path / "short.mp4", num_frames=short_n, size_wh=SIZE, fps=10)
    submit(long_video, prompt, settings=settings, client=redis_client, job_id="long")
    w = WorkerProcess(settings, "w", tmp_path, delay_s=0.05, extra=["--concurrency", "2"])
    try:
        wait_for(lambda: frames_done(redis_client, settings, "long") >= 5, what="the long job runs")
        submit(short_video, prompt, settings=settings, client=redis_client, job_id="short")
        wait_for(lambda: frames_done(redis_client, settings, "short") >= 1, what="the short job starts")
        long_at_start = frames_done(redis_client, settings, "long")
        wait_for(lambda: state(redis_client, settings, "short").get("state") == "completed", timeout_s=60,
                 what="the short job completes")
        long_at_end = frames_done(redis_client, settings, "long")
        wait_for(lambda: state(redis_client, settings, "long").get("state") == "completed", timeout_s=60,
                 what="the long job completes")
    finally:
        stop_all(w)
    assert long_at_end < long_n - 20, "the short job waited behind the long one"
    # turns alternate: while the short job ran its frames, the long one ran about as many (progress is
    # published every few frames, so allow a batch either side)
    assert long_at_end - long_at_start <= short_n + 2 * settings.progress_every + 4
    assert_complete_exactly_once(redis_client, settings, "long", long_n)
    assert_complete_exactly_once(redis_client, settings, "short", short_n)


def test_a_failing_job_does_not_touch_its_siblings(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    submit(video, prompt, settings=settings, client=redis_client, job_id="good", stream=False)
    submit(video, prompt, settings=settings, client=redis_client, job_id="bad", stream=False)
    submit(video, prompt, settings=settings, client=redis_client, job_id="flaky", stream=False)
    (settings.storage_root / "jobs/bad/frames/00005.jpg").write_bytes(b"not a jpeg")  # a permanent failure
    w = WorkerProcess(settings, "w", tmp_path, delay_s=0.03, extra=["--concurrency", "3"],
                      faults={"flaky": {"transient_at": 7}})
    try:
        wait_for(lambda: all(state(redis_client, settings, j).get("state") in ("completed", "failed")
                             for j in ("good", "bad", "flaky")), timeout_s=60, what="every job ends")
        assert w.alive()
    finally:
        stop_all(w)
    assert state(redis_client, settings, "bad")["state"] == "failed"
    assert "cannot read frame" in state(redis_client, settings, "bad")["error"]
    assert_complete_exactly_once(redis_client, settings, "good")
    assert state(redis_client, settings, "good")["attempt"] == "1"
    assert_complete_exactly_once(redis_client, settings, "flaky")  # retried on its own, then completed
    assert state(redis_client, settings, "flaky")["attempt"] == "2"


def test_sigterm_hands_back_every_job_held(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    for job_id in ("h0", "h1"):
        submit(video, prompt, settings=settings, client=redis_client, job_id=job_id)
    a = WorkerProcess(settings, "a", tmp_path, lease_s=30.0, delay_s=0.3, extra=["--grace", "0.5", "--concurrency", "2"])
    try:
        wait_for(lambda: all(frames_done(redis_client, settings, j) >= 1 for j in ("h0", "h1")), timeout_s=30,
                 what="both jobs publish frames")
        a.signal(signal.SIGTERM)
        assert a.wait(15) == 0
    finally:
        stop_all(a)
    for job_id in ("h0", "h1"):
        st = state(redis_client, settings, job_id)
        assert st["state"] == "queued" and st["attempt"] == "0", st  # handed back, the attempt not counted
    b = WorkerProcess(settings, "b", tmp_path, lease_s=30.0, delay_s=0.0, extra=["--concurrency", "2"])
    try:  # with a 30 s lease, only an immediate hand-back lets b take them now
        wait_for(lambda: all(state(redis_client, settings, j).get("state") == "completed" for j in ("h0", "h1")),
                 timeout_s=20, what="b completes both")
    finally:
        stop_all(b)
    for job_id in ("h0", "h1"):
        assert state(redis_client, settings, job_id)["attempt"] == "1"
        assert_complete_exactly_once(redis_client, settings, job_id)


def test_kill_9_has_each_job_reclaimed_and_resumed_once(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    jobs = ("r0", "r1")
    for job_id in jobs:
        submit(video, prompt, settings=settings, client=redis_client, job_id=job_id)
    a = WorkerProcess(settings, "a", tmp_path, lease_s=1.0, delay_s=0.1, extra=["--concurrency", "2"])
    b = None
    try:
        wait_for(lambda: all(frames_done(redis_client, settings, j) >= 5 for j in jobs), timeout_s=30,
                 what="both jobs publish frames")
        a.kill()
        b = WorkerProcess(settings, "b", tmp_path, lease_s=1.0, delay_s=0.01, extra=["--concurrency", "2"])
        wait_for(lambda: all(state(redis_client, settings, j).get("state") == "completed" for j in jobs),
                 timeout_s=30, what="b completes both")
    finally:
        stop_all(a, *([b] if b else []))
    for job_id in jobs:
        assert_complete_exactly_once(redis_client, settings, job_id)
        assert state(redis_client, settings, job_id)["attempt"] == "2"
        starts = started_events(redis_client, settings, job_id)
        assert [s.worker for s in starts] == ["a", "b"]
        assert starts[1].resume_from >= 5  # resumed after its last published frame, once


def test_admission_stops_before_the_gpu_memory_runs_out(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A pretend GPU with 1000 MiB free and 300 MiB a session: room for two sessions with a margin, so a
    worker allowed four jobs holds two; the others wait in the queue and run as those end."""
    jobs = [f"m{k}" for k in range(4)]
    for job_id in jobs:
        submit(video, prompt, settings=settings, client=redis_client, job_id=job_id)
    w = WorkerProcess(settings, "w", tmp_path, delay_s=0.03, extra=["--concurrency", "4"],
                      env={"VSEG_FAKE_GPU_MIB": "1000,300"})
    try:
        wait_for(lambda: all(state(redis_client, settings, j).get("state") == "completed" for j in jobs),
                 timeout_s=60, what="every job completes")
    finally:
        stop_all(w)
    assert most_held_at_once(redis_client, settings) == 2
    assert "admission: 400 MiB free on the GPU, a session needs about 450 MiB" in w.log()
    for job_id in jobs:
        assert_complete_exactly_once(redis_client, settings, job_id)


def test_default_concurrency_comes_from_the_device_and_the_log_says_why(
    video: Path, settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    cpu = WorkerProcess(settings, "cpu", tmp_path)
    gpu = WorkerProcess(settings, "gpu", tmp_path, env={"VSEG_FAKE_GPU_MIB": "1000,300"})
    try:
        wait_for(lambda: "job(s) at once" in cpu.log() and "job(s) at once" in gpu.log(), what="both log K")
    finally:
        stop_all(cpu, gpu)
    assert "holds up to 1 job(s) at once: the model runs on the cpu: jobs at once would share its cores" in cpu.log()
    assert ("holds up to 2 job(s) at once: 1000 MiB free on cpu; a session measured at 300 MiB: 2 jobs at once"
            in gpu.log())


def test_health_key_lists_every_job_held(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    for job_id in ("j0", "j1"):
        submit(video, prompt, settings=settings, client=redis_client, job_id=job_id)
    w = WorkerProcess(settings, "w", tmp_path, delay_s=0.2, extra=["--concurrency", "2"])

    def held() -> set[str]:
        raw = redis_client.get(settings.keys.worker_health("w"))
        return set(json.loads(raw).get("jobs", {})) if raw else set()

    try:
        wait_for(lambda: held() == {"j0", "j1"}, timeout_s=30, what="the health key lists both jobs")
        t0 = time.monotonic()
        wait_for(lambda: all(state(redis_client, settings, j).get("state") == "completed" for j in ("j0", "j1")),
                 timeout_s=60, what="both complete")
        wait_for(lambda: (raw := redis_client.get(settings.keys.worker_health("w"))) is not None
                 and json.loads(raw)["state"] == "idle", timeout_s=10 + time.monotonic() - t0, what="idle again")
    finally:
        stop_all(w)


def test_a_live_job_keeps_its_latency_budget_ahead_of_a_file_job(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path, prompt: list[ObjectPrompt]
) -> None:
    """One worker, two jobs: a file job of 400 frames and a 30 fps live source whose frames need 75% of the
    shared model's turns. Fair turns alone would give the live job half and make it skip a third of its
    frames; live turns come first, so it skips (almost) none and stays within its budget, while the file
    job goes on with what is left and completes."""
    import dataclasses
    import threading

    from producer.live_submit import submit_live
    from tests.fakes import ChaosHooks, ColourSegmenter
    from tests.videos import disc_prompt
    from worker.service.loop import Worker

    fps, live_n = 30, 90
    live_settings = dataclasses.replace(settings, max_latency_s=0.5, live_segment_s=1.0, producer_ttl_s=3.0,
                                        concurrency=2)
    camera = make_video(tmp_path / "camera.mp4", num_frames=live_n, size_wh=SIZE, fps=fps)
    long_video = make_video(tmp_path / "long.mp4", num_frames=400, size_wh=SIZE, fps=10)
    submit(long_video, prompt, settings=live_settings, client=redis_client, job_id="batch", render=False)
    worker = Worker(settings=live_settings, segmenter=ChaosHooks(ColourSegmenter(), delay_s=0.025),
                    client=redis_client, name="mixed")
    thread = threading.Thread(target=worker.run, kwargs={"burst": True}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: frames_done(redis_client, live_settings, "batch") >= 5, what="the file job runs")
        before = frames_done(redis_client, live_settings, "batch")
        submit_live(camera, [disc_prompt(1, 0, live_n, SIZE)], settings=live_settings, job_id="cam", realtime=True,
                    render=False)
        wait_for(lambda: state(redis_client, live_settings, "cam").get("state") == "completed", timeout_s=30,
                 what="the live job completes")
        during = frames_done(redis_client, live_settings, "batch") - before
        thread.join(60)
    finally:
        worker.stopping = True
        thread.join(10)
    frames = [m for m in (messages.decode(f) for _, f in redis_client.xrange(live_settings.keys.results("cam")))
              if isinstance(m, messages.FrameResult)]
    dropped_at_ingest = int(state(redis_client, live_settings, "cam").get("dropped_at_ingest", 0))
    assert [f.frame_idx for f in frames] == list(range(live_n - dropped_at_ingest))  # announced: one entry each
    skipped = sum(1 for f in frames if f.skipped)
    assert skipped + dropped_at_ingest <= live_n // 10, f"{skipped} + {dropped_at_ingest} of {live_n} not processed"
    latencies = [f.latency_s for f in frames if f.latency_s is not None]
    assert latencies and max(latencies) <= live_settings.max_latency_s + 0.25, max(latencies)
    assert during > 0, "the file job got no turn while the live job ran"
    assert state(redis_client, live_settings, "batch")["state"] == "completed"


def test_cancel_stops_one_job_held_and_leaves_the_other_running(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    from producer.control import cancel

    for job_id in ("keep", "drop"):
        submit(video, prompt, settings=settings, client=redis_client, job_id=job_id)
    w = WorkerProcess(settings, "w", tmp_path, delay_s=0.1, extra=["--concurrency", "2"])
    try:
        wait_for(lambda: all(frames_done(redis_client, settings, j) >= 2 for j in ("keep", "drop")), timeout_s=30,
                 what="both jobs publish frames")
        cancel("drop", settings=settings, client=redis_client)
        wait_for(lambda: state(redis_client, settings, "drop").get("state") == "cancelled", timeout_s=20,
                 what="the cancelled job stops")
        assert state(redis_client, settings, "keep")["state"] == "running"
        wait_for(lambda: state(redis_client, settings, "keep").get("state") == "completed", timeout_s=60,
                 what="the other job completes")
    finally:
        stop_all(w)
    assert frames_done(redis_client, settings, "drop") < N
    assert_complete_exactly_once(redis_client, settings, "keep")


def test_a_wedged_model_hands_back_the_jobs_beside_it_before_the_worker_exits(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Job `wedge` never returns from frame 3, holding the shared model's turn. Its sibling waits for a turn
    that never comes; waiting for the model is not a stall, so only `wedge` stalls (abandoned, its attempt
    counted). Before the wedged worker exits for its supervisor it hands the sibling back, its attempt not
    counted, and the next worker takes both at once and completes them."""
    for job_id in ("wedge", "beside"):
        submit(video, prompt, settings=settings, client=redis_client, job_id=job_id)
    extra = ["--stall", "1.5", "--concurrency", "2"]
    w = WorkerProcess(settings, "w", tmp_path, lease_s=1.0, delay_s=0.05, extra=extra, faults={"wedge": {"block_at": 3}})
    try:
        assert w.wait(60) == EXIT_BROKEN, w.log()[-3000:]
    finally:
        stop_all(w)
    assert "wedged" in w.log() and "handing back the 1 other job(s) held before exiting" in w.log()
    assert "job beside stalled" not in w.log()
    beside = state(redis_client, settings, "beside")
    assert beside["state"] == "queued" and beside["attempt"] == "0", beside  # handed back, not counted
    assert 0 < frames_done(redis_client, settings, "beside") < N
    assert state(redis_client, settings, "wedge")["attempt"] == "1"  # abandoned: counted
    b = WorkerProcess(settings, "b", tmp_path, lease_s=1.0, delay_s=0.0, extra=["--concurrency", "2"])
    try:
        wait_for(lambda: all(state(redis_client, settings, j).get("state") == "completed" for j in ("wedge", "beside")),
                 timeout_s=30, what="the next worker completes both")
    finally:
        stop_all(b)
    assert state(redis_client, settings, "beside")["attempt"] == "1"
    assert state(redis_client, settings, "wedge")["attempt"] == "2"
    for job_id in ("wedge", "beside"):
        assert_complete_exactly_once(redis_client, settings, job_id)
