"""Integration tier: a streamed job whose producer dies or is interrupted fails at once, with an error
that says so, instead of each attempt waiting out the stall timeout for frames that never come; a
producer that is alive but slow, or whose liveness key is briefly lost, is still waited for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from producer.liveness import ProducerHeartbeat
from runtime.settings import Settings
from schemas import messages
from schemas.errors import PermanentError, RetryableError
from schemas.names import frame_entry_id, frames_end_entry_id
from tests.videos import disc_center, make_video
from tests.workers import ROOT, WorkerProcess, wait_for, worker_env
from worker.sources.frames import StreamedFrames

pytestmark = pytest.mark.integration

KEY = "t:producer:j"
STREAM = "t:frames:j"


def announce(client: redis.Redis, frames_dir: Path, k: int) -> None:
    (frames_dir / f"{k:05d}.jpg").write_bytes(b"jpeg")
    client.xadd(STREAM, {"frame_idx": k}, id=frame_entry_id(k))


def test_heartbeat_keeps_its_key_alive_and_deletes_it_at_the_end(redis_client: redis.Redis) -> None:
    with ProducerHeartbeat(redis_client, KEY, ttl_s=0.6) as beat:
        assert 0 < redis_client.pttl(KEY) <= 600
        assert redis_client.get(KEY) == beat.value.encode() and str(os.getpid()) in beat.value
        time.sleep(1.5)  # well past the TTL: only the refreshes keep it
        assert redis_client.exists(KEY)
    assert not redis_client.exists(KEY)


def test_heartbeat_puts_back_a_key_that_was_lost(redis_client: redis.Redis) -> None:
    """As after a Redis restart without persistence: the next refresh restores it."""
    with ProducerHeartbeat(redis_client, KEY, ttl_s=0.9):
        redis_client.delete(KEY)
        wait_for(lambda: redis_client.exists(KEY), timeout_s=2.0, what="the next refresh to restore the key")


def test_heartbeat_rejects_a_ttl_that_is_not_positive(redis_client: redis.Redis) -> None:
    with pytest.raises(ValueError, match="ttl_s must be positive, but got 0"):
        ProducerHeartbeat(redis_client, KEY, ttl_s=0)


def test_a_dead_producer_fails_the_wait_within_its_ttl(redis_client: redis.Redis, tmp_path: Path) -> None:
    announce(redis_client, tmp_path, 0)  # one frame, then the producer's key is gone and nothing more comes
    frames = StreamedFrames(redis_client, STREAM, tmp_path, block_ms=100, stall_s=60, producer_key=KEY,
                            producer_ttl_s=0.8)
    assert frames.wait(0)
    t0 = time.monotonic()
    with pytest.raises(PermanentError, match=r"the producer stopped: its liveness key t:producer:j has been gone "
                                             r"for \d+ s with 1 frames announced and no end marker"):
        frames.wait(1)
    assert time.monotonic() - t0 < 5  # not the 60 s stall timeout
    last = redis_client.xrevrange(STREAM, count=1)[0][1]  # closed for the dead producer
    assert last[b"error"].startswith(b"producer lost: the producer stopped")
    with pytest.raises(redis.ResponseError, match="equal or smaller"):  # a producer only cut off is refused
        redis_client.xadd(STREAM, {"frame_idx": 1}, id=frame_entry_id(1))


def test_a_live_but_silent_producer_is_waited_for_until_the_stall_timeout(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    frames = StreamedFrames(redis_client, STREAM, tmp_path, block_ms=100, stall_s=1.5, producer_key=KEY,
                            producer_ttl_s=0.6)
    t0 = time.monotonic()
    with ProducerHeartbeat(redis_client, KEY, ttl_s=0.6), pytest.raises(RetryableError, match="producer stalled"):
        frames.wait(0)
    assert time.monotonic() - t0 >= 1.5


def test_a_briefly_lost_key_does_not_fail_the_job(redis_client: redis.Redis, tmp_path: Path) -> None:
    frames = StreamedFrames(redis_client, STREAM, tmp_path, block_ms=100, stall_s=30, producer_key=KEY,
                            producer_ttl_s=2.0)

    def producer() -> None:
        with ProducerHeartbeat(redis_client, KEY, ttl_s=2.0):
            time.sleep(0.2)  # deliberate: the worker is waiting for frame 0 by now
            redis_client.delete(KEY)  # lost (Redis restarted); the next refresh, within 0.7 s, restores it
            time.sleep(2.5)  # deliberate: longer than the TTL, so only the restored key keeps the job alive
            announce(redis_client, tmp_path, 0)
            redis_client.xadd(STREAM, {"end": 1}, id=frames_end_entry_id(1))

    thread = threading.Thread(target=producer)
    thread.start()
    try:
        assert list(frames) == [0]
    finally:
        thread.join()


def test_a_finished_producer_needs_no_key(redis_client: redis.Redis, tmp_path: Path) -> None:
    """A job retried after its producer finished (end marker written, key deleted) reads every frame."""
    for k in range(3):
        announce(redis_client, tmp_path, k)
    redis_client.xadd(STREAM, {"end": 3}, id=frames_end_entry_id(3))
    frames = StreamedFrames(redis_client, STREAM, tmp_path, block_ms=100, stall_s=30, producer_key=KEY,
                            producer_ttl_s=0.2)
    time.sleep(0.3)  # deliberate: longer than the TTL of a key that never existed
    assert list(frames) == [0, 1, 2]


def test_an_older_producer_without_a_key_is_not_checked(redis_client: redis.Redis, tmp_path: Path) -> None:
    frames = StreamedFrames(redis_client, STREAM, tmp_path, block_ms=100, stall_s=1.0, producer_key=KEY,
                            producer_ttl_s=0.0)  # the job message of an older producer has no TTL
    with pytest.raises(RetryableError, match="producer stalled"):
        frames.wait(0)


# ---- a real producer process, killed or interrupted mid-stream ------------------------------------

N = 900
SIZE = (320, 240)


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("live") / "long.mp4", num_frames=N, size_wh=SIZE, fps=30)


GATED_FROM = 20  # the producer's JPEGs after this many wait for the test's gate (tests/gated_producer.py)


def submit_process(settings: Settings, video: Path, job_id: str, gate: Path) -> subprocess.Popen[bytes]:
    """`producer submit` whose decoding stops after GATED_FROM frames until `gate` exists."""
    x, y = disc_center(0, N, SIZE)
    env = {**worker_env(settings), "VSEG_PRODUCER_TTL_S": "1"}
    return subprocess.Popen([sys.executable, "-m", "tests.gated_producer", str(gate), str(GATED_FROM), "submit",
                             str(video), "--point", f"1:{x:.0f},{y:.0f}", "--job-id", job_id, "--no-render"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for_terminal(client: redis.Redis, settings: Settings, job_id: str, timeout_s: float) -> messages.Message:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entries = client.xrevrange(settings.keys.results(job_id), count=1)
        if entries:
            last = messages.decode(entries[0][1])
            if isinstance(last, (messages.Completed, messages.Failed, messages.Dead)):
                return last
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end within {timeout_s} s")


@pytest.mark.parametrize("sig, expected, model_process", [
    (signal.SIGKILL, "the producer stopped: its liveness key", "off"),
    (signal.SIGKILL, "the producer stopped: its liveness key", "on"),  # the check runs in the model's process
    (signal.SIGINT, "KeyboardInterrupt: the producer was interrupted", "off"),
])
def test_a_producer_stopped_mid_stream_fails_its_job_at_once(
    sig: int, expected: str, model_process: str, long_video: Path, settings: Settings, redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    job_id = f"stopped-{sig}-{model_process}"
    gate = tmp_path / "gate"
    worker = WorkerProcess(settings, "w-live", tmp_path, lease_s=2.0, delay_s=0.002,  # stall timeout: 60 s
                           env={"VSEG_MODEL_PROCESS": model_process})
    proc = submit_process(settings, long_video, job_id, gate)
    try:
        # enqueued and its first frames announced: the producer now waits at the gate, mid-stream on any machine
        wait_for(lambda: proc.poll() is not None or (redis_client.exists(settings.keys.job(job_id))
                                                      and redis_client.xlen(settings.keys.frames(job_id)) >= 1),
                 timeout_s=60, what="the job enqueued with its first frames")
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        proc.send_signal(sig)
        gate.touch()  # the frames in flight may finish: the producer's pool threads are joined at its exit
        out = proc.communicate(timeout=30)[0].decode()
        announced = redis_client.xlen(settings.keys.frames(job_id))
        t0 = time.monotonic()
        last = wait_for_terminal(redis_client, settings, job_id, timeout_s=20)
        assert time.monotonic() - t0 < 15, "the worker waited for the stall timeout"
        assert isinstance(last, messages.Failed) and expected in last.error, (last, out, worker.log())
        assert announced < N, "the producer finished before it was stopped"  # cannot: the gate held it
        state = redis_client.hgetall(settings.keys.job(job_id))
        assert state[b"state"] == b"failed" and state[b"attempt"] == b"1", state  # not retried: nothing to wait for
        frames = [e for e in redis_client.xrange(settings.keys.results(job_id))
                  if isinstance(messages.decode(e[1]), messages.FrameResult)]
        assert len(frames) <= announced
        if sig == signal.SIGINT:
            assert proc.returncode == 130 and "interrupted" in out, out
        # The stream is closed (by the producer's marker, or by the worker for a dead producer) and expires
        # with the results, and the frames are removed: a dead producer leaks neither Redis memory nor disk.
        # (The worker does this just after writing the terminal entry: wait for it.)
        last_marker = redis_client.xrevrange(settings.keys.frames(job_id), count=1)[0][1]
        assert b"error" in last_marker
        wait_for(lambda: redis_client.ttl(settings.keys.frames(job_id)) > 0, timeout_s=10, what="the stream's expiry")
        wait_for(lambda: not (settings.storage_root / f"jobs/{job_id}/frames").exists(), timeout_s=10,
                 what="the frames' removal")
    finally:
        gate.touch()
        if proc.poll() is None:
            proc.kill()
        worker.kill()


@pytest.mark.parametrize("state", ["queued", "cancelled", None])
def test_giving_up_asks_redis_whether_the_job_was_enqueued(
    state: str | None, settings: Settings, redis_client: redis.Redis
) -> None:
    """An interrupt can land after the enqueue but before its result is stored: whether a worker must be
    told is read from Redis. Enqueued: the stream gets an error marker, and the frames stay for the
    worker unless the job has already ended; never enqueued: stream and frames go."""
    from producer.streaming import abandon as _abandon

    keys = settings.keys
    frames_dir = settings.storage_root / "jobs/j/frames"
    frames_dir.mkdir(parents=True)
    redis_client.xadd(keys.frames("j"), {"frame_idx": 0}, id=frame_entry_id(0))
    if state:
        redis_client.hset(keys.job("j"), "state", state)
    _abandon(redis_client, settings, "j", frames_dir, KeyboardInterrupt())
    if state:
        last = redis_client.xrevrange(keys.frames("j"), count=1)[0][1]
        assert last == {b"error": b"KeyboardInterrupt: the producer was interrupted"}
        assert frames_dir.is_dir() == (state == "queued")
    else:
        assert not redis_client.exists(keys.frames("j")) and not frames_dir.exists()
