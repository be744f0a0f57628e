"""Slow tier (still runs in CI): dozens of jobs, three workers (one with its model in a child process,
the CUDA default), random kill -9 and SIGSTOP/SIGCONT of workers and one Redis kill -9 + restart (AOF
on). At the end every job is in exactly one terminal state and every completed job's frames are
complete and unique, in order."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest
import redis

from producer.local_redis import RedisServer
from producer.submit import submit
from schemas import messages
from schemas.names import TERMINAL_ENTRY_ID
from schemas.prompts import ObjectPrompt
from schemas.settings import Settings
from tests.videos import disc_center, make_video
from tests.workers import WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.integration]

JOBS = 30
FRAMES = 10
SIZE = (64, 48)
TERMINAL = {"completed", "failed", "cancelled", "dead"}


def test_chaos(tmp_path: Path, storage_root: Path) -> None:
    rng = random.Random(7)
    server = RedisServer(data_dir=tmp_path / "redis", appendonly=True)
    server.data_dir.mkdir()
    server.start()
    settings = Settings.load(environ={}, redis_url=server.url, storage_root=storage_root, block_ms=200)
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    video = make_video(tmp_path / "v.mp4", num_frames=FRAMES, size_wh=SIZE, fps=10)
    x, y = disc_center(0, FRAMES, SIZE)
    for i in range(JOBS):
        submit(video, [ObjectPrompt(1, 0, ((x, y),), (1,))], settings=settings, client=client, job_id=f"c{i:02d}")

    extra = ["--max-attempts", "6", "--grace", "5"]

    def model_env(i: int) -> dict[str, str]:  # worker 1's model runs in a child process, as on CUDA
        return {"VSEG_MODEL_PROCESS": "on" if i == 1 else "off"}

    workers = [WorkerProcess(settings, f"w{i}", tmp_path, lease_s=1.0, delay_s=0.15, extra=extra, env=model_env(i))
               for i in range(3)]
    all_workers = list(workers)
    kills = stops = 0
    restarted = False
    t0 = time.monotonic()

    def states() -> dict[str, str]:
        out = {}
        for i in range(JOBS):
            try:
                out[f"c{i:02d}"] = (client.hget(settings.keys.job(f"c{i:02d}"), "state") or b"").decode()
            except redis.ConnectionError:
                return {}
        return out

    try:
        while time.monotonic() - t0 < 240:
            st = states()
            if st and all(s in TERMINAL for s in st.values()):
                break
            action = rng.random() if kills else 0.0  # the first action is always a kill -9
            victim = rng.randrange(len(workers))
            if action < 0.25:
                workers[victim].kill()
                kills += 1
                workers[victim] = WorkerProcess(settings, f"w{victim}-{kills}", tmp_path, lease_s=1.0, delay_s=0.15,
                                                extra=extra, env=model_env(victim))
                all_workers.append(workers[victim])
            elif action < 0.45:
                workers[victim].signal(signal.SIGSTOP)
                stops += 1
                time.sleep(rng.uniform(0.5, 2.0))
                workers[victim].signal(signal.SIGCONT)
            elif not restarted and time.monotonic() - t0 > 2:
                server.kill()
                time.sleep(0.5)
                server.start()
                restarted = True
            time.sleep(rng.uniform(0.3, 1.0))
        elapsed = time.monotonic() - t0
    finally:
        for w in workers:
            w.signal(signal.SIGCONT)
            w.signal(signal.SIGTERM)
        for w in all_workers:
            try:
                w.wait(20)
            except Exception:
                w.kill()

    final = states()
    outcomes: dict[str, int] = {}
    for job_id, state in final.items():
        outcomes[state] = outcomes.get(state, 0) + 1
        entries = client.xrange(settings.keys.results(job_id))
        terminals = [m for m in (messages.decode(f) for _, f in entries) if isinstance(m, messages.TERMINAL_TYPES)]
        assert len(terminals) == 1, f"{job_id}: {len(terminals)} terminal entries"
        if state == "completed":
            ids = [i.decode() for i, _ in entries]
            assert ids == ["0-1"] + [f"{k + 1}-0" for k in range(FRAMES)] + [TERMINAL_ENTRY_ID], f"{job_id}: {ids}"
            assert (storage_root / f"jobs/{job_id}/render.mp4").is_file()
    logs = "".join(w.log() for w in all_workers)
    reclaims = logs.count("reclaimed job entry")
    duplicates = logs.count("Redis rejected the duplicate")
    lost = logs.count("lease lost")
    print(f"\nchaos: {JOBS} jobs x {FRAMES} frames, 3 workers, {kills} kill -9, {stops} SIGSTOP/SIGCONT, "
          f"redis restarted: {restarted}; outcomes {outcomes}; reclaims {reclaims}, duplicates rejected {duplicates}, "
          f"leases lost {lost}; {elapsed:.1f} s")
    assert set(final) == {f"c{i:02d}" for i in range(JOBS)}
    assert all(s in TERMINAL for s in final.values()), final
    assert client.xlen(settings.keys.jobs) == 0
    assert restarted and kills > 0
    assert "model process" in logs  # the child-process configuration took part
    server.stop()
