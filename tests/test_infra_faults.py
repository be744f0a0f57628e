"""Integration tier: infrastructure faults under a running worker (README "Guarantees", issue 18).

Each test runs a real redis-server of its own (AOF on, `appendfsync always`), mostly with subprocess
workers (`python -m worker` with the fake segmenter of tests/fakes.py) and short leases: Redis stopped or frozen (SIGSTOP) for
longer than a lease, restarted empty, full (maxmemory, noeviction), not yet up; SIGTERM during an
outage; a result path whose writes fail; a model that never returns. The invariant throughout: every
job ends in one terminal state, and a completed job holds every frame exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.local_redis import RedisServer, free_port
from producer.submission import submit
from runtime.logs import EXIT_BROKEN
from runtime.settings import Settings
from schemas import messages
from schemas.errors import RetryableError, WorkerBroken
from schemas.names import TERMINAL_ENTRY_ID
from schemas.prompts import ObjectPrompt
from tests.fakes import FROM_ENV, ColourSegmenter
from tests.videos import disc_center, make_video
from tests.workers import ROOT, WorkerProcess, log_time, stop_all, wait_for, worker_env
from worker.broker.lease import Lease
from worker.broker.publish import ResultPublisher
from worker.service.loop import Worker

pytestmark = pytest.mark.integration

N = 24
SIZE = (96, 64)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(data_dir=tmp_path / "redis", appendonly=True)
    srv.data_dir.mkdir()
    srv.start()
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        os.kill(srv.proc.pid, signal.SIGCONT)
    srv.stop()


@pytest.fixture
def cfg(server: RedisServer, storage_root: Path) -> Settings:
    return Settings.load(environ={}, redis_url=server.url, storage_root=storage_root, block_ms=200,
                         retry_backoff_s=0.2)


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(server.url, socket_timeout=5)
    yield c
    c.close()


def answers(c: redis.Redis) -> bool:
    try:
        return bool(c.ping())
    except redis.RedisError:
        return False


def state(c: redis.Redis, settings: Settings, job_id: str) -> dict[str, str]:
    try:
        return {k.decode(): v.decode() for k, v in c.hgetall(settings.keys.job(job_id)).items()}
    except redis.ConnectionError:
        return {}


def frames_done(c: redis.Redis, settings: Settings, job_id: str) -> int:
    return int(state(c, settings, job_id).get("frames_done", 0))


def assert_every_frame_once(c: redis.Redis, settings: Settings, job_id: str, n: int = N) -> None:
    entries = c.xrange(settings.keys.results(job_id))
    ids = [i.decode() for i, _ in entries]
    assert ids == ["0-1"] + [f"{k + 1}-0" for k in range(n)] + [TERMINAL_ENTRY_ID], ids
    last = messages.decode(entries[-1][1])
    assert isinstance(last, messages.Completed), last
    assert (settings.storage_root / last.render_path).is_file()
    assert not list((settings.storage_root / f"jobs/{job_id}").glob(".*partial*"))


def freeze(server: RedisServer) -> None:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)


def thaw(server: RedisServer) -> None:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGCONT)


# ---- outages longer than a lease ----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["stopped", "sigstopped"])
def test_outage_of_three_leases_mid_job_then_the_job_completes_with_every_frame_once(
    how: str, video: Path, prompt: list[ObjectPrompt], server: RedisServer, cfg: Settings,
    client: redis.Redis, tmp_path: Path
) -> None:
    """Redis stopped (then started on the same port) or frozen with SIGSTOP (the socket stays open and
    nothing answers) for three leases mid-job: the worker presumes its lease lost and stops writing;
    once Redis is back its renewal finds the job still its own (no other worker took it), so the job
    resumes where it paused, in the same attempt, and every frame ends up once."""
    lease_s = 1.0
    submit(video, prompt, settings=cfg, client=client, job_id="out")
    w = WorkerProcess(cfg, "w", tmp_path, lease_s=lease_s, delay_s=0.1)
    try:
        wait_for(lambda: frames_done(client, cfg, "out") >= 4, what="frames before the outage")
        if how == "stopped":
            server.stop()
        else:
            freeze(server)
        time.sleep(3 * lease_s)  # deliberate: the outage, three leases
        if how == "stopped":
            server.start()
        else:
            thaw(server)
        wait_for(lambda: state(client, cfg, "out").get("state") == "completed", timeout_s=60, what="job completes")
        assert w.alive()
    finally:
        stop_all(w)
    assert_every_frame_once(client, cfg, "out")
    assert state(client, cfg, "out")["attempt"] == "1"  # resumed, not rerun
    log = w.log()
    assert "presumed lost" in log and "writes resume" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


HOUSEKEPT_EMPTY = "housekeeping: the jobs stream"  # the line housekeeping logs once when it finds the stream gone


@pytest.mark.parametrize("when", ["idle", "mid-job"])
def test_redis_restarted_empty_then_housekeeping_and_the_same_worker_completes_the_next_job(
    when: str, video: Path, prompt: list[ObjectPrompt], tmp_path: Path, storage_root: Path
) -> None:
    """No persistence (or a failover to a replica without the group): Redis is shut down and started empty on
    the same port. An idle worker, or one mid-job (its job is logged as vanished), runs its housekeeping on
    the empty Redis (every 0.05 s here: `housekeeping_s`), which recreates the stream and group instead of
    dying on XINFO's "no such key"; then the same worker process completes the next job."""
    srv = RedisServer(data_dir=tmp_path / "redis-empty", appendonly=False)
    srv.data_dir.mkdir()
    srv.start()
    settings = Settings.load(environ={}, redis_url=srv.url, storage_root=storage_root, block_ms=200)
    c = redis.Redis.from_url(srv.url, socket_timeout=5)
    w = WorkerProcess(settings, "w", tmp_path, lease_s=1.0, delay_s=0.1, env={"VSEG_HOUSEKEEPING_S": "0.05"})
    try:
        if when == "mid-job":
            submit(video, prompt, settings=settings, client=c, job_id="lost")
            wait_for(lambda: frames_done(c, settings, "lost") >= 4, what="frames")
        else:
            wait_for(lambda: "ready" in w.log() and c.exists(settings.keys.worker_health("w")), what="worker ready")
        pid = w.proc.pid
        c.shutdown(nosave=True)  # the shutdown a user types; the connection drops with it
        srv.proc.wait(10)  # type: ignore[union-attr]
        if when == "idle":  # the worker sees Redis gone before it comes back empty (else a read may reconnect first)
            wait_for(lambda: "unavailable" in w.log(), timeout_s=20, what="the worker notices Redis is down")
        srv.start()  # empty: no AOF, no RDB
        if when == "mid-job":
            wait_for(lambda: "vanished" in w.log(), timeout_s=20, what="the worker notices the job vanished")
        wait_for(lambda: HOUSEKEPT_EMPTY in w.log(), timeout_s=20, what="housekeeping on the empty Redis")
        wait_for(lambda: c.exists(settings.keys.jobs), timeout_s=10, what="the jobs stream recreated")
        wait_for(lambda: c.exists(settings.keys.worker_health("w")), timeout_s=10, what="the health key rewritten")
        submit(video, prompt, settings=settings, client=c, job_id="next")
        wait_for(lambda: state(c, settings, "next").get("state") == "completed", timeout_s=30, what="next job")
        assert w.alive() and w.proc.pid == pid
        assert_every_frame_once(c, settings, "next")
    finally:
        stop_all(w)
        srv.stop()
    log = w.log()
    assert log.count(HOUSEKEPT_EMPTY) == 1, log[-3000:]  # logged once, not at every round
    if when == "mid-job":
        assert "lost" in log and "submit it again" in log
    assert "Traceback" not in log, log[-3000:]


# ---- SIGTERM whatever Redis does ---------------------------------------------------------------------
def test_sigterm_during_an_outage_exits_within_grace_plus_a_lease_and_another_worker_completes(
    video: Path, prompt: list[ObjectPrompt], server: RedisServer, cfg: Settings, client: redis.Redis,
    tmp_path: Path
) -> None:
    lease_s, grace_s = 2.0, 1.0
    submit(video, prompt, settings=cfg, client=client, job_id="term")
    a = WorkerProcess(cfg, "a", tmp_path, lease_s=lease_s, delay_s=0.2, extra=["--grace", str(grace_s)])
    b: WorkerProcess | None = None
    try:
        wait_for(lambda: frames_done(client, cfg, "term") >= 3, what="frames")
        freeze(server)  # hung: the worker's calls wait for their socket timeout
        a.signal(signal.SIGTERM)
        code = a.wait(grace_s + lease_s + 30)
        assert code == 0, a.log()[-3000:]
        # the worker's own reaction, from its log's clock (SIGTERM received to its last line): the interpreter's
        # teardown after it (torch and all) is the machine's speed, not the worker waiting on Redis
        took = log_time(a.log(), "exiting: WorkerStats") - log_time(a.log(), "SIGTERM: finishing the current job")
        assert took <= grace_s + lease_s + 1.5, f"exited {took:.1f} s after the SIGTERM"
        thaw(server)
        b = WorkerProcess(cfg, "b", tmp_path, lease_s=lease_s, delay_s=0.01)
        wait_for(lambda: state(client, cfg, "term").get("state") == "completed", timeout_s=60, what="b completes")
    finally:
        thaw(server)
        stop_all(a, *([b] if b else []))
    assert_every_frame_once(client, cfg, "term")


def test_an_idle_worker_exits_at_once_on_sigterm_with_redis_hung(
    server: RedisServer, cfg: Settings, client: redis.Redis, tmp_path: Path
) -> None:
    w = WorkerProcess(cfg, "idle", tmp_path, lease_s=6.0)
    try:
        wait_for(lambda: "ready" in w.log(), what="worker ready")
        freeze(server)
        time.sleep(0.5)  # deliberate: past a read's block_ms (200 ms), the next read is one nothing answers
        w.signal(signal.SIGTERM)
        assert w.wait(15) == 0
        # the worker's own reaction, from its log's clock: the interpreter's teardown after it (torch and all)
        # is the machine's speed, not the worker waiting on Redis
        signalled, exiting = log_time(w.log(), "SIGTERM: idle"), log_time(w.log(), "exiting: WorkerStats")
        assert exiting - signalled < 1.5, w.log()[-2000:]
    finally:
        thaw(server)
        stop_all(w)


# ---- Redis not up yet ---------------------------------------------------------------------------------
def test_worker_started_before_redis_waits_then_serves(
    video: Path, prompt: list[ObjectPrompt], tmp_path: Path, storage_root: Path
) -> None:
    port = free_port()
    settings = Settings.load(environ={}, redis_url=f"redis://127.0.0.1:{port}/0", storage_root=storage_root,
                             block_ms=200)
    w = WorkerProcess(settings, "early", tmp_path, lease_s=1.0, delay_s=0.01)
    srv = RedisServer(port=port, data_dir=tmp_path / "late", appendonly=True)
    srv.data_dir.mkdir()
    try:
        wait_for(lambda: w.log().count("waiting for Redis at") >= 2, timeout_s=20, what="the worker waits")
        assert w.alive()
        check = subprocess.run([sys.executable, "-m", "worker", "check"], cwd=ROOT, env=worker_env(settings),
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 1  # not ready while it cannot reach Redis
        srv.start()
        c = redis.Redis(port=port, socket_timeout=5)
        submit(video, prompt, settings=settings, client=c, job_id="late")
        wait_for(lambda: state(c, settings, "late").get("state") == "completed", timeout_s=30, what="job completes")
        assert_every_frame_once(c, settings, "late")
    finally:
        stop_all(w)
        srv.stop()
    assert f"127.0.0.1:{port}" in w.log() and "Traceback" not in w.log()


# ---- Redis full ----------------------------------------------------------------------------------------
def fill_to_maxmemory(c: redis.Redis) -> None:
    """Redis full: fill it a little, then set maxmemory (noeviction) below what it uses, so every write
    that may grow memory is refused until free_memory (deterministic, unlike filling to the byte)."""
    for n in range(200):
        c.set(f"fill:{n}", b"x" * 1024)
    c.config_set("maxmemory-policy", "noeviction")
    c.config_set("maxmemory", int(c.info("memory")["used_memory"]) // 2)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        c.set("fill:probe", b"x")


def free_memory(c: redis.Redis) -> None:
    c.config_set("maxmemory", 0)
    for key in c.scan_iter("fill:*", count=1000):
        c.delete(key)


def test_redis_full_before_and_during_a_job(
    video: Path, prompt: list[ObjectPrompt], server: RedisServer, cfg: Settings, client: redis.Redis,
    tmp_path: Path
) -> None:
    """A worker started while Redis is full stays up and says what to do; a job whose writes are refused
    mid-way waits (its lease still renews), then goes on once memory is freed: every frame once."""
    submit(video, prompt, settings=cfg, client=client, job_id="full1")
    fill_to_maxmemory(client)
    w = WorkerProcess(cfg, "w", tmp_path, lease_s=1.0, delay_s=0.1)
    try:
        wait_for(lambda: "out of memory" in w.log(), timeout_s=20, what="the worker reports Redis full")
        time.sleep(1.0)  # deliberate: a lease of Redis full, and the worker stays up
        assert w.alive()
        free_memory(client)
        wait_for(lambda: state(client, cfg, "full1").get("state") == "completed", timeout_s=40, what="job 1")
        assert_every_frame_once(client, cfg, "full1")

        submit(video, prompt, settings=cfg, client=client, job_id="full2")
        wait_for(lambda: frames_done(client, cfg, "full2") >= 4, what="job 2 frames")
        fill_to_maxmemory(client)
        seen = w.log().count("out of memory")
        wait_for(lambda: w.log().count("out of memory") > seen, timeout_s=20, what="job 2 writes refused")
        time.sleep(1.5)  # longer than a lease: the job keeps its lease while it waits
        assert w.alive()
        assert state(client, cfg, "full2")["state"] == "running"
        free_memory(client)
        wait_for(lambda: state(client, cfg, "full2").get("state") == "completed", timeout_s=40, what="job 2")
        assert w.alive()
    finally:
        free_memory(client)
        stop_all(w)
    assert_every_frame_once(client, cfg, "full2")
    log = w.log()
    assert "raise maxmemory" in log and "results_ttl_s" in log
    assert "Traceback" not in log, log[-3000:]


def test_redis_full_longer_than_stall_s_retries_the_attempt_and_keeps_the_input(
    video: Path, prompt: list[ObjectPrompt], server: RedisServer, cfg: Settings, client: redis.Redis,
    tmp_path: Path
) -> None:
    """Full for longer than stall_s: the attempt fails with RedisFull (retried with backoff); the job's
    frames stay on disk for the retry, which completes once memory is freed."""
    submit(video, prompt, settings=cfg, client=client, job_id="fullong")
    w = WorkerProcess(cfg, "w", tmp_path, lease_s=1.0, delay_s=0.1, extra=["--stall", "2", "--max-attempts", "10"])
    try:
        wait_for(lambda: frames_done(client, cfg, "fullong") >= 4, what="frames")
        fill_to_maxmemory(client)
        wait_for(lambda: "RedisFull" in w.log(), timeout_s=30, what="the attempt fails with RedisFull")
        assert (cfg.storage_root / "jobs/fullong/frames").is_dir()
        free_memory(client)
        wait_for(lambda: state(client, cfg, "fullong").get("state") == "completed", timeout_s=60, what="completes")
        assert w.alive()
    finally:
        free_memory(client)
        stop_all(w)
    assert_every_frame_once(client, cfg, "fullong")
    assert int(state(client, cfg, "fullong")["attempt"]) >= 2


# ---- no thread dies silently -------------------------------------------------------------------------
def test_sink_thread_killed_by_failing_writes_fails_or_retries_the_job_never_stalls(
    video: Path, prompt: list[ObjectPrompt], cfg: Settings, client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The result path's writes raise: with the queue full and the sink thread gone, the model's thread
    neither blocks on put nor on close. A permanent error fails the job; a retryable one retries it."""
    real_frames = ResultPublisher.frames
    calls = {"n": 0}

    def failing(self: ResultPublisher, results: Any, interrupt: Any = None) -> int:
        calls["n"] += 1
        if self.job_id == "sinkperm" and calls["n"] == 2:
            raise RuntimeError("the result path broke")
        if self.job_id == "sinkretry" and calls["n"] == 2:
            raise RetryableError("the result path hiccupped")
        return real_frames(self, results, interrupt)

    monkeypatch.setattr(ResultPublisher, "frames", failing)
    slow = ColourSegmenter()
    for job_id, expected in (("sinkperm", "failed"), ("sinkretry", "completed")):
        calls["n"] = 0
        submit(video, prompt, settings=cfg, client=client, job_id=job_id)
        t0 = time.monotonic()
        Worker(settings=cfg, segmenter=slow, client=client, name="inproc").run(burst=True)
        assert time.monotonic() - t0 < 30
        st = state(client, cfg, job_id)
        assert st["state"] == expected, st
    assert "the result path broke" in state(client, cfg, "sinkperm")["error"]
    assert state(client, cfg, "sinkretry")["attempt"] == "2"
    assert_every_frame_once(client, cfg, "sinkretry")


@pytest.mark.parametrize("model_process", ["off", "on"])
def test_stalled_job_is_abandoned_reclaimed_and_dead_lettered_after_max_attempts(
    model_process: str, video: Path, prompt: list[ObjectPrompt], server: RedisServer, cfg: Settings,
    client: redis.Redis, tmp_path: Path
) -> None:
    """The model never returns from frame 3. After stall_s the lease stops being renewed and the job is
    handed back (claimable at once), the attempt counted. In-process, the wedged worker exits with
    EXIT_BROKEN for its supervisor; with its model in a child process, the child is killed and the same
    worker goes on. Past max_attempts the job is dead-lettered and the next job still flows."""
    submit(video, prompt, settings=cfg, client=client, job_id="wedge")
    submit(video, prompt, settings=cfg, client=client, job_id="after")
    extra = ["--stall", "1.5", "--max-attempts", "2"]
    env = {"VSEG_MODEL_PROCESS": model_process}
    wedge = {"wedge": {"block_at": 3}}
    workers: list[WorkerProcess] = []
    try:
        if model_process == "off":
            for i in range(2):  # each run wedges its worker, which exits for its supervisor
                w = WorkerProcess(cfg, f"w{i}", tmp_path, lease_s=0.5, delay_s=0.01, extra=extra, env=env, faults=wedge)
                workers.append(w)
                assert w.wait(30) == EXIT_BROKEN, w.log()[-3000:]
                assert "stalled" in w.log() and "wedged" in w.log()
        w = WorkerProcess(cfg, "last", tmp_path, lease_s=0.5, delay_s=0.01, extra=extra, env=env, faults=wedge)
        workers.append(w)
        wait_for(lambda: state(client, cfg, "wedge").get("state") == "dead", timeout_s=60, what="dead letter")
        wait_for(lambda: state(client, cfg, "after").get("state") == "completed", timeout_s=30, what="next job")
        assert w.alive()
    finally:
        stop_all(*workers)
    st = state(client, cfg, "wedge")
    assert "stalled" in st["error"], st
    dead = [f for _, f in client.xrange(cfg.keys.dead)]
    assert len(dead) == 1 and dead[0][b"attempts"] == b"2"
    assert_every_frame_once(client, cfg, "after")
    if model_process == "on":
        assert "killing model process" in workers[-1].log()


# ---- a broken worker exits non-zero ---------------------------------------------------------------------
def test_dead_lease_thread_hands_the_job_back_and_the_worker_exits_broken(
    video: Path, prompt: list[ObjectPrompt], cfg: Settings, client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    submit(video, prompt, settings=cfg, client=client, job_id="nolease")

    def broken_renew(self: Lease) -> bool:
        raise RuntimeError("injected: the heartbeat crashed")

    monkeypatch.setattr(Lease, "renew", broken_renew)
    from tests.fakes import ChaosHooks

    worker = Worker(settings=Settings.load(environ={}, redis_url=cfg.redis_url, storage_root=cfg.storage_root,
                                           block_ms=200, lease_s=0.6),
                    segmenter=ChaosHooks(ColourSegmenter(), delay_s=0.1), client=client, name="brk")
    with pytest.raises(WorkerBroken, match="lease thread"):
        worker.run(burst=True)
    st = state(client, cfg, "nolease")
    assert st["state"] == "queued" and st["attempt"] == "0", st  # handed back, the attempt not counted
    health = json.loads(client.get(cfg.keys.worker_health("brk")) or b"{}")
    assert health["state"] == "broken" and "lease thread" in health["reason"]
    assert health["host"] == socket.gethostname()
    check = subprocess.run([sys.executable, "-m", "worker", "check"], cwd=ROOT, env=worker_env(cfg),
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and "broken" in check.stdout + check.stderr


def test_model_process_that_cannot_restart_makes_the_worker_exit_broken(
    video: Path, prompt: list[ObjectPrompt], cfg: Settings, client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.model.process import ModelProcess

    mp = ModelProcess(Settings.load(environ={}, model_process="on", segmenter=FROM_ENV))
    try:
        os.kill(mp.pid or 0, signal.SIGKILL)
        wait_for(lambda: not mp._proc.is_alive(), what="the model process dies")

        def cannot_start(self: ModelProcess) -> None:
            raise RuntimeError("injected: CUDA is gone")

        monkeypatch.setattr(ModelProcess, "_start", cannot_start)
        submit(video, prompt, settings=cfg, client=client, job_id="nomodel")
        worker = Worker(settings=cfg, segmenter=mp, client=client, name="nomodel-w")
        with pytest.raises(WorkerBroken, match="could not be started again"):
            worker.run(burst=True)
    finally:
        mp.close()
    st = state(client, cfg, "nomodel")
    assert st["state"] == "queued" and st["attempt"] == "0", st


# ---- with the real model -------------------------------------------------------------------------------
@pytest.mark.e2e
def test_outage_of_three_leases_with_the_real_sam2_then_every_frame_once(
    tmp_path: Path, server: RedisServer, cfg: Settings, client: redis.Redis
) -> None:
    """The scenario of issue 18 with SAM 2 itself (random weights, 256, CPU): Redis stopped mid-job for
    three leases and started again on the same port; the job completes with every frame once."""
    n = 30
    clip = make_video(tmp_path / "real.mp4", num_frames=n, size_wh=(160, 120), fps=10)
    x, y = disc_center(0, n, (160, 120))
    submit(clip, [ObjectPrompt(1, 0, ((x, y),), (1,))], settings=cfg, client=client, job_id="real")
    lease_s = 2.0
    env = {**worker_env(cfg), "VSEG_CHECKPOINT_DIR": str(tmp_path / "ckpt"), "HF_HUB_OFFLINE": "1"}
    log_path = tmp_path / "real-worker.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "worker", "--checkpoint", "random", "--image-size", "256",
                                 "--device", "cpu", "--lease", str(lease_s), "--name", "real"], cwd=ROOT, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: frames_done(client, cfg, "real") >= 5, timeout_s=120, what="frames from SAM 2")
            server.stop()
            time.sleep(3 * lease_s)  # deliberate: the outage, three leases
            server.start()
            wait_for(lambda: state(client, cfg, "real").get("state") == "completed", timeout_s=180,
                     what="the job completes")
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert_every_frame_once(client, cfg, "real", n=n)
    log = log_path.read_text(errors="replace")
    assert "presumed" in log and "Traceback" not in log, log[-3000:]
