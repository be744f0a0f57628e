"""Slow tier (still runs in CI): dozens of jobs, three workers (one with its model in a child process,
the CUDA default), random kill -9 and SIGSTOP/SIGCONT of workers, and Redis faults (AOF on): one kill -9
and restart, one outage of three leases (stopped, then started on the same port), one freeze of three
leases (SIGSTOP: the socket stays open and nothing answers) during which a worker gets SIGTERM and
must exit within grace + one lease. Then the faults stop. Every job must be in exactly one terminal
state within a bound after the last fault, and every completed job's frames complete and unique, in
order. Run with one job a worker and with two (`--concurrency 2`: a worker killed or frozen holds two jobs,
and a SIGTERM hands both back)."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import redis

from producer.local_redis import RedisServer
from producer.submission import submit
from runtime.settings import Settings
from schemas import messages
from schemas.names import TERMINAL_ENTRY_ID
from schemas.prompts import ObjectPrompt
from tests.videos import disc_center, make_video
from tests.workers import WorkerProcess, log_time

pytestmark = [pytest.mark.slow, pytest.mark.integration]

JOBS = 30
FRAMES = 10
LEASE_S = 1.0
GRACE_S = 2.0
SETTLE_S = 90.0  # every job terminal this long after the last fault
SIZE = (64, 48)
TERMINAL = {"completed", "failed", "cancelled", "dead"}


@pytest.mark.parametrize("concurrency", [1, 2], ids=["one-job-a-worker", "two-jobs-a-worker"])
def test_chaos(tmp_path: Path, storage_root: Path, concurrency: int) -> None:
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

    extra = ["--max-attempts", "8", "--grace", str(GRACE_S), "--concurrency", str(concurrency)]

    def model_env(i: int) -> dict[str, str]:  # worker 1's model runs in a child process, as on CUDA
        return {"VSEG_MODEL_PROCESS": "on" if i == 1 else "off"}

    def spawn(i: int, tag: str) -> WorkerProcess:
        w = WorkerProcess(settings, f"w{i}-{tag}", tmp_path, lease_s=LEASE_S, delay_s=0.15, extra=extra,
                          env=model_env(i))
        all_workers.append(w)
        return w

    all_workers: list[WorkerProcess] = []
    workers = [spawn(i, "0") for i in range(3)]
    kills = stops = 0
    redis_faults: list[str] = []
    sigterm_exit_s: float | None = None
    t0 = time.monotonic()

    def states() -> dict[str, str]:
        out = {}
        for i in range(JOBS):
            try:
                out[f"c{i:02d}"] = (client.hget(settings.keys.job(f"c{i:02d}"), "state") or b"").decode()
            except redis.RedisError:
                return {}
        return out

    def all_terminal() -> bool:
        st = states()
        return bool(st) and all(s in TERMINAL for s in st.values())

    try:
        # phase 1: faults, until the three Redis faults have happened (or every job has ended)
        while len(redis_faults) < 3 and time.monotonic() - t0 < 120 and not all_terminal():
            action = rng.random() if kills else 0.0  # the first action is always a kill -9
            victim = rng.randrange(len(workers))
            elapsed = time.monotonic() - t0
            if action < 0.25:
                workers[victim].kill()
                kills += 1
                workers[victim] = spawn(victim, str(kills))
            elif action < 0.45:
                workers[victim].signal(signal.SIGSTOP)
                stops += 1
                time.sleep(rng.uniform(0.5, 2.0))  # deliberate: frozen this long
                workers[victim].signal(signal.SIGCONT)
            elif not redis_faults and elapsed > 2:
                server.kill()
                time.sleep(0.5)  # deliberate: down this long
                server.start()
                redis_faults.append("kill -9")
            elif len(redis_faults) == 1 and elapsed > 5:
                server.stop()  # an outage of three leases, then back on the same port
                time.sleep(3 * LEASE_S)
                server.start()
                redis_faults.append("stopped 3 leases")
            elif len(redis_faults) == 2 and elapsed > 8:
                assert server.proc is not None
                os.kill(server.proc.pid, signal.SIGSTOP)  # hung: connections open, nothing answers
                t_term = time.monotonic()
                workers[victim].signal(signal.SIGTERM)
                workers[victim].wait(GRACE_S + LEASE_S + 20)
                log = workers[victim].log()  # the worker's reaction, not the interpreter's teardown after it
                sigterm_exit_s = log_time(log, "exiting:") - log_time(log, "SIGTERM")
                time_spent = time.monotonic() - t_term
                time.sleep(max(0.0, 3 * LEASE_S - time_spent))
                os.kill(server.proc.pid, signal.SIGCONT)
                workers[victim] = spawn(victim, "after-sigterm")
                redis_faults.append("SIGSTOP 3 leases + SIGTERM")
            time.sleep(rng.uniform(0.3, 1.0))  # deliberate: time between faults
        last_fault = time.monotonic()
        # phase 2: no more faults; every job must end within SETTLE_S
        while time.monotonic() - last_fault < SETTLE_S and not all_terminal():
            time.sleep(0.2)
        settle_s = time.monotonic() - last_fault
        elapsed = time.monotonic() - t0
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
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
    print(f"\nchaos: {JOBS} jobs x {FRAMES} frames, 3 workers holding {concurrency} each, {kills} kill -9, {stops} SIGSTOP/SIGCONT, "
          f"redis faults {redis_faults} (SIGTERM to exit {sigterm_exit_s}); outcomes {outcomes}; reclaims {reclaims}, "
          f"duplicates rejected {duplicates}, leases lost {lost}; all terminal {settle_s:.1f} s after the last fault; "
          f"{elapsed:.1f} s")
    assert set(final) == {f"c{i:02d}" for i in range(JOBS)}
    assert all(s in TERMINAL for s in final.values()), final
    assert settle_s < SETTLE_S
    assert client.xlen(settings.keys.jobs) == 0
    assert kills > 0
    assert redis_faults == ["kill -9", "stopped 3 leases", "SIGSTOP 3 leases + SIGTERM"], (
        f"only {redis_faults}: the jobs ended before every fault ran")
    assert sigterm_exit_s is not None and sigterm_exit_s <= GRACE_S + LEASE_S + 1.5, sigterm_exit_s
    assert "model process" in logs  # the child-process configuration took part
    server.stop()
