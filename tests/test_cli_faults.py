"""The command lines against broken infrastructure: Redis with nothing listening, Redis hung (SIGSTOP),
Redis out of memory (maxmemory with noeviction), Redis killed mid-submit, a broken worker. Each ends in
one line that names the URL (never its password) and what to check, and exits 1; nothing half-done
stays behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.local_redis import RedisServer, free_port
from runtime.faults import redis_fault
from runtime.settings import Settings
from schemas import messages
from schemas.errors import JobFailed, RedisFull
from schemas.names import Keys
from schemas.prompts import ObjectPrompt
from tests.videos import disc_center, make_video, slow_down_jpeg_writes
from tests.workers import ROOT, wait_for, worker_env

N = 12
SIZE = (96, 64)
PASSWORD = "s3cret-Pw"


def point() -> str:
    x, y = disc_center(0, N, SIZE)
    return f"1:{x:.0f},{y:.0f}"


def cli_env(redis_url: str, storage_root: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": redis_url, "STORAGE_ROOT": str(storage_root), "VSEG_BLOCK_MS": "200",
            "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **extra}


def run_cli(args: list[str], env: dict[str, str], timeout_s: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout_s)
    return out, time.monotonic() - t0


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The single non-empty line on stderr (no traceback, no other noise)."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1, out.stderr
    return lines[0]


COMMANDS = {
    "submit": ["producer", "submit", "{video}", "--point", point(), "--job-id", "j1"],
    "watch": ["producer", "watch", "j1", "--out", "{tmp}/out"],
    "status": ["producer", "status", "j1"],
    "cancel": ["producer", "cancel", "j1"],
    "worker check": ["worker", "check"],
}


def command(name: str, video: Path, tmp: Path) -> list[str]:
    return [a.format(video=video, tmp=tmp) for a in COMMANDS[name]]


# ---- nothing listening: no redis-server needed ------------------------------------------------------

@pytest.mark.parametrize("with_password", [False, True], ids=["no-password", "password"])
@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_cli_against_a_dead_redis_says_so_in_one_line(name: str, with_password: bool, video: Path,
                                                            tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://{'vseg:' + PASSWORD + '@' if with_password else ''}127.0.0.1:{port}/0"
    storage = tmp_path / "storage"
    out, took = run_cli(command(name, video, tmp_path), cli_env(url, storage))
    assert out.returncode == 1, (out.stdout, out.stderr)
    line = one_line(out)
    shown = f"redis://vseg:***@127.0.0.1:{port}/0" if with_password else url
    assert f"cannot reach Redis at {shown}" in line and "check that redis-server is running" in line, line
    assert PASSWORD not in out.stderr + out.stdout
    assert took < 8, f"{name} took {took:.1f} s to report a dead Redis"
    assert not (storage / "jobs").exists(), "submit decoded frames although Redis was down"
    assert not (tmp_path / "out").exists(), "watch made its output directory although Redis was down"


# ---- a real redis-server: hung, full, killed ---------------------------------------------------------

@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (SIGSTOP'd, filled up or killed without touching the shared one)."""
    server = RedisServer(data_dir=tmp_path / "redis")
    server.data_dir.mkdir()
    server.extra_args = ["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


@pytest.mark.integration
@pytest.mark.parametrize("name", ["status", "worker check"])
def test_a_hung_redis_is_reported_within_the_socket_timeout(name: str, private_redis: RedisServer, video: Path,
                                                            tmp_path: Path) -> None:
    assert private_redis.proc is not None
    env = cli_env(private_redis.url, tmp_path / "storage", VSEG_SOCKET_TIMEOUT_S="2")
    os.kill(private_redis.proc.pid, signal.SIGSTOP)
    try:
        out, took = run_cli(command(name, video, tmp_path), env, timeout_s=30)
    finally:
        os.kill(private_redis.proc.pid, signal.SIGCONT)
    assert out.returncode == 1, (out.stdout, out.stderr)
    line = one_line(out)
    assert f"cannot reach Redis at {private_redis.url} (Timeout" in line, line
    assert took < 8, f"{name} took {took:.1f} s against a hung Redis"


def fill_up(client: redis.Redis) -> None:
    """SET until Redis at maxmemory (noeviction) refuses. The refused SET's own buffer, freed, can leave
    used memory just under the limit (small writes would pass): maxmemory then goes a little lower, as
    when the data set keeps growing, so that every write is refused."""
    blob = b"x" * 65536
    for k in range(10_000):
        try:
            client.set(f"filler:{k}", blob)
        except redis.exceptions.OutOfMemoryError:
            used = int(client.info("memory")["used_memory"])
            client.config_set("maxmemory", str(used - 256 * 1024))
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                client.set("filler:small", "x")
            return
    raise AssertionError("Redis never ran out of memory: is maxmemory set?")


def nothing_left_of(client: redis.Redis, settings: Settings, job_id: str) -> None:
    keys = settings.keys
    assert not client.exists(keys.job(job_id)), "a job hash without its job"
    queued = [messages.decode(fields) for _, fields in client.xrange(keys.jobs)]
    assert not [j for j in queued if getattr(j, "job_id", None) == job_id], "a jobs entry was left"
    assert not client.exists(keys.frames(job_id)) and not client.exists(keys.producer(job_id))
    assert not client.exists(f"{keys.job(job_id)}:submit-lock"), "the submit lock was left"
    assert not (settings.storage_root / "jobs" / job_id).exists(), "frames of a job that was never enqueued"


@pytest.mark.integration
def test_submit_cancel_and_status_against_a_full_redis(private_redis: RedisServer, video: Path, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    settings = Settings.load(environ={}, redis_url=private_redis.url, storage_root=storage)
    env = cli_env(private_redis.url, storage)
    client = redis.Redis.from_url(private_redis.url)
    out, _ = run_cli(["producer", "submit", str(video), "--point", point(), "--job-id", "before", "--no-stream"], env)
    assert out.returncode == 0, out.stderr
    fill_up(client)

    out, took = run_cli(["producer", "submit", str(video), "--point", point(), "--job-id", "full"], env)
    assert out.returncode == 1, (out.stdout, out.stderr)
    line = one_line(out)
    assert f"Redis at {private_redis.url} is out of memory" in line and "maxmemory" in line, line
    assert "results_ttl_s" in line and took < 8
    nothing_left_of(client, settings, "full")

    status, _ = run_cli(["producer", "status", "before"], env)  # a read: works while Redis is full
    assert status.returncode == 0 and "job before: queued" in status.stdout, status.stderr
    cancel, _ = run_cli(["producer", "cancel", "before"], env)  # a write: refused
    assert cancel.returncode == 1 and "is out of memory" in one_line(cancel)
    assert client.hget(settings.keys.job("before"), "cancel") is None

    client.config_set("maxmemory", "0")  # room again: the same submit goes through
    out, _ = run_cli(["producer", "submit", str(video), "--point", point(), "--job-id", "full"], env)
    assert out.returncode == 0 and out.stdout.strip() == "full", out.stderr
    assert client.hget(settings.keys.job("full"), "state") == b"queued"
    assert (storage / "jobs/full/frames").is_dir()


@pytest.mark.integration
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_redis_filling_up_at_the_enqueue_leaves_nothing_half_done(
    stream: bool, private_redis: RedisServer, video: Path, prompt: list[ObjectPrompt], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis reaches maxmemory between the lock and the enqueue script (frames already decoded and, when
    streamed, announced): the script refuses the job (redis-py's OutOfMemoryError, RedisFull on the
    command line), no job, no frames stream, no frames on disk; room again, it goes."""
    import producer.submission as submit_module

    storage = tmp_path / "storage"
    settings = Settings.load(environ={}, redis_url=private_redis.url, storage_root=storage)
    client = redis.Redis.from_url(private_redis.url)
    real_enqueue = submit_module.enqueue_job
    seen: list[bool] = []

    def fill_then_enqueue(c: redis.Redis, keys: object, job: object, extra: object = None) -> bool:
        seen.append((storage / "jobs/j/frames").is_dir())
        fill_up(client)
        return real_enqueue(c, keys, job, extra)  # type: ignore[arg-type]

    monkeypatch.setattr(submit_module, "enqueue_job", fill_then_enqueue)
    with pytest.raises(redis.exceptions.OutOfMemoryError) as refused:
        submit_module.submit(video, prompt, settings=settings, job_id="j", stream=stream)
    assert isinstance(redis_fault(refused.value, settings.redis_url), RedisFull)  # what the CLI says
    assert seen == [True], "the enqueue was not reached with frames on disk"
    nothing_left_of(client, settings, "j")

    monkeypatch.setattr(submit_module, "enqueue_job", real_enqueue)
    client.config_set("maxmemory", "0")
    done = submit_module.submit(video, prompt, settings=settings, job_id="j", stream=stream)
    assert done.created and client.hget(settings.keys.job("j"), "state") == b"queued"


@pytest.mark.integration
def test_redis_killed_mid_stream_ends_the_submit_with_one_line(private_redis: RedisServer, tmp_path: Path) -> None:
    long_video = make_video(tmp_path / "long.mp4", num_frames=60, size_wh=(320, 240), fps=30)
    x, y = disc_center(0, 60, (320, 240))
    env = cli_env(private_redis.url, tmp_path / "storage", VSEG_PRODUCER_TTL_S="1")
    client = redis.Redis.from_url(private_redis.url)
    gate = tmp_path / "gate"  # decoding waits after 20 frames until the test has killed Redis (tests/gated_producer.py)
    proc = subprocess.Popen([sys.executable, "-m", "tests.gated_producer", str(gate), "20", "submit", str(long_video),
                             "--point", f"1:{x:.0f},{y:.0f}", "--job-id", "cut"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: client.exists(Keys().job("cut")) or proc.poll() is not None, timeout_s=30, what="the enqueue")
        assert proc.poll() is None, "the submit finished before Redis was killed"
        private_redis.kill()
        gate.touch()
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        gate.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert f"ERROR   producer: cannot reach Redis at {private_redis.url}" in last, err
    assert took < 20, f"the submit took {took:.1f} s to give up"


@pytest.mark.integration
def test_a_frames_stream_closed_by_the_worker_stops_the_producer(
    settings: Settings, redis_client: redis.Redis, video: Path, prompt: list[ObjectPrompt],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut off long enough for the worker to close the frames stream (liveness key gone), the producer
    finds its next announcement refused and stops with JobFailed, not a raw Redis error."""
    from producer.submission import submit

    slow_down_jpeg_writes(monkeypatch, 0.05)
    frames_stream = settings.keys.frames("closed")

    def close_it() -> None:  # what the worker does for a producer it believes dead
        wait_for(lambda: redis_client.exists(settings.keys.job("closed")), timeout_s=10, what="the enqueue")
        redis_client.xadd(frames_stream, {"error": "producer lost: the producer stopped"})

    closer = threading.Thread(target=close_it)
    closer.start()
    try:
        with pytest.raises(JobFailed, match=r"its frames stream was closed while its video was being decoded "
                                            r"\(producer lost: the producer stopped\), so decoding stopped"):
            submit(video, prompt, settings=settings, client=redis_client, job_id="closed")
    finally:
        closer.join()
    last = redis_client.xrevrange(frames_stream, count=1)[0][1]
    assert b"error" in last and redis_client.ttl(frames_stream) > 0


# ---- giving up when Redis is what failed -------------------------------------------------------------

def test_giving_up_on_an_unreachable_redis_asks_it_nothing(tmp_path: Path) -> None:
    """Redis down: never enqueued, the frames go at once; maybe enqueued, they stay for the worker; and no
    call waits out a dead Redis's retries."""
    from producer.streaming import abandon as _abandon

    dead = Settings.load(environ={}, redis_url=f"redis://127.0.0.1:{free_port()}/0", storage_root=tmp_path)
    client = redis.Redis.from_url(dead.redis_url)
    error = redis.ConnectionError("Connection refused")
    for maybe_enqueued in (False, True):
        frames_dir = tmp_path / "jobs/j/frames"
        frames_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        _abandon(client, dead, "j", frames_dir, error, maybe_enqueued=maybe_enqueued)
        assert time.monotonic() - t0 < 0.5
        assert frames_dir.exists() == maybe_enqueued
        assert (tmp_path / "jobs/j").exists() == maybe_enqueued  # the emptied job directory goes too


@pytest.mark.integration
def test_the_heartbeat_does_not_wait_for_an_unreachable_redis_at_the_end(tmp_path: Path) -> None:
    from producer.liveness import ProducerHeartbeat

    server = RedisServer(data_dir=tmp_path).start()
    client = redis.Redis.from_url(server.url)
    try:
        beat = ProducerHeartbeat(client, "t:producer:j", ttl_s=0.3)
        beat.__enter__()
    finally:
        server.kill()
    time.sleep(0.3)  # the thread's refreshes fail meanwhile
    t0 = time.monotonic()
    beat.__exit__(redis.ConnectionError, redis.ConnectionError("Connection refused"), None)
    assert time.monotonic() - t0 < 2.5


# ---- worker check --------------------------------------------------------------------------------------

def health(name: str, host: str, **fields: object) -> str:
    return json.dumps({"worker": name, "host": host, "at": time.time(), "jobs_done": 0, **fields})


@pytest.mark.integration
def test_worker_check_reports_a_broken_worker(settings: Settings, redis_client: redis.Redis) -> None:
    host = socket.gethostname()
    keys = settings.keys
    env = worker_env(settings)
    redis_client.set(keys.worker_health("elsewhere"), health("elsewhere", "other-host", state="broken", reason="x"),
                     ex=30)
    redis_client.set(keys.worker_health("live"), health("live", host, state="idle"), ex=30)
    out, _ = run_cli(["worker", "check"], env)
    assert out.returncode == 0 and f"healthy: 1 worker(s) on {host}" in out.stdout, (out.stdout, out.stderr)

    redis_client.set(keys.worker_health("wb"), health("wb", host, state="broken",
                                                      reason="lease thread died: ConnectionError"), ex=30)
    out, _ = run_cli(["worker", "check"], env)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stdout.strip() == f"unhealthy: worker wb on {host} is broken: lease thread died: ConnectionError"

    redis_client.delete(keys.worker_health("live"), keys.worker_health("wb"))
    out, _ = run_cli(["worker", "check"], env)
    assert out.returncode == 1 and f"unhealthy: 0 live worker(s) on {host} (0 broken)" in out.stdout


@pytest.mark.integration
@pytest.mark.parametrize("left", ["nothing", "the stream without its group"])
def test_stats_and_worker_check_on_an_empty_redis_answer_with_zeros(
        left: str, settings: Settings, redis_client: redis.Redis) -> None:
    """Redis restarted empty (or a stream no worker has made a group on yet): figures, not a traceback."""
    if left != "nothing":
        redis_client.xadd(settings.keys.jobs, {"type": "x", "data": "y"})
    env = worker_env(settings)
    out, _ = run_cli(["producer", "stats"], env)
    assert out.returncode == 0 and "Traceback" not in out.stderr, (out.stdout, out.stderr)
    rows = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()[1:] if line.startswith("  ")}
    expected = "1" if left != "nothing" else "0"
    assert rows["waiting"] == expected and rows["pending"] == "0" and rows["consumers"] == "0", out.stdout
    assert "(not created yet: no worker has started)" in out.stdout.splitlines()[0]
    out, _ = run_cli(["worker", "check"], env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, (out.stdout, out.stderr)
    assert out.stdout.startswith(f"unhealthy: 0 live worker(s) on {socket.gethostname()} (0 broken)"), out.stdout


@pytest.mark.integration
def test_unknown_job_messages_hide_the_password(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path / "redis")
    server.data_dir.mkdir()
    server.extra_args = ["--requirepass", PASSWORD]
    server.start(password=PASSWORD)
    try:
        url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
        env = cli_env(url, tmp_path / "storage")
        for args in (["producer", "status", "nope"], ["producer", "cancel", "nope"],
                     ["producer", "watch", "nope", "--out", str(tmp_path / "o")], ["worker", "check"]):
            out, _ = run_cli(args, env)
            assert out.returncode != 0 and PASSWORD not in out.stdout + out.stderr, (args, out.stdout, out.stderr)
            assert f"redis://:***@127.0.0.1:{server.port}/0" in out.stdout + out.stderr, (args, out.stdout, out.stderr)
        wrong = cli_env(f"redis://:wrong-{PASSWORD}@127.0.0.1:{server.port}/0", tmp_path / "storage")
        out, _ = run_cli(["producer", "status", "nope"], wrong)
        assert out.returncode == 1 and "refused the credentials" in one_line(out) and PASSWORD not in out.stderr
    finally:
        server.stop()
