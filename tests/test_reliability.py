"""Integration tier: leases, reclaim, fencing, attempts, dead letters, cancellation, shutdown, outages.

Workers run as subprocesses with the fake segmenter and a short lease, against a real redis-server
(fakeredis differs on claims and idle times, so none of this runs on it).
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.commands.core import Script

from producer.control import cancel, status
from producer.local_redis import RedisServer
from producer.submission import submit
from runtime.settings import Settings
from schemas import messages
from schemas.errors import UnknownJobError
from schemas.names import TERMINAL_ENTRY_ID, JobState
from schemas.prompts import ObjectPrompt
from tests.fakes import ChaosHooks, ColourSegmenter, Faults
from tests.workers import WorkerProcess, log_time, wait_for
from worker.broker.claim import take
from worker.broker.lease import Lease, LeaseLost
from worker.broker.publish import ResultPublisher, frame_result
from worker.broker.scripts import Scripts
from worker.model.segment import FrameMasks
from worker.service.loop import Worker

pytestmark = pytest.mark.integration

N = 24
SIZE = (96, 64)


def state(client: redis.Redis, settings: Settings, job_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(settings.keys.job(job_id)).items()}


def result_ids(client: redis.Redis, settings: Settings, job_id: str) -> list[str]:
    return [i.decode() for i, _ in client.xrange(settings.keys.results(job_id))]


def assert_complete_exactly_once(client: redis.Redis, settings: Settings, job_id: str, n: int = N) -> None:
    ids = result_ids(client, settings, job_id)
    assert ids == ["0-1"] + [f"{k + 1}-0" for k in range(n)] + [TERMINAL_ENTRY_ID], ids
    last = messages.decode(client.xrange(settings.keys.results(job_id))[-1][1])
    assert isinstance(last, messages.Completed)
    assert (settings.storage_root / last.render_path).is_file()
    assert not list((settings.storage_root / f"jobs/{job_id}").glob(".*partial*"))


def started_events(client: redis.Redis, settings: Settings, job_id: str) -> list[messages.Started]:
    out = []
    for _, fields in client.xrange(settings.keys.events):
        msg = messages.decode(fields)
        if isinstance(msg, messages.Started) and msg.job_id == job_id:
            out.append(msg)
    return out


def frames_done(client: redis.Redis, settings: Settings, job_id: str) -> int:
    return int(client.hget(settings.keys.job(job_id), "frames_done") or 0)


# ---- 1. lease and heartbeat ---------------------------------------------------------------------
def test_long_job_is_never_handed_to_a_second_worker_while_the_first_lives(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A job ten leases long, with CPU-bound (GIL-holding) model work, stays with its first worker."""
    submit(video, prompt, settings=settings, client=redis_client, job_id="long")
    lease_s = 0.5
    a = WorkerProcess(settings, "a", tmp_path, lease_s=lease_s, delay_s=10 * lease_s / N, busy=True)
    wait_for(lambda: state(redis_client, settings, "long").get("state") == "running", what="a starts")
    b = WorkerProcess(settings, "b", tmp_path, lease_s=lease_s, delay_s=0.01)
    try:
        wait_for(lambda: state(redis_client, settings, "long").get("state") == "completed", timeout_s=60,
                 what="job completes")
    finally:
        a.signal(signal.SIGTERM)
        b.signal(signal.SIGTERM)
        a.wait()
        b.wait()
    assert [s.worker for s in started_events(redis_client, settings, "long")] == ["a"]
    assert state(redis_client, settings, "long")["attempt"] == "1"
    assert_complete_exactly_once(redis_client, settings, "long")


# ---- 2. crash recovery --------------------------------------------------------------------------
def test_killed_worker_job_is_reclaimed_and_completes_with_every_frame_once(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    submit(video, prompt, settings=settings, client=redis_client, job_id="crash")
    a = WorkerProcess(settings, "a", tmp_path, lease_s=1.0, delay_s=0.1)
    wait_for(lambda: frames_done(redis_client, settings, "crash") >= 5, what="a publishes frames")
    a.kill()
    b = WorkerProcess(settings, "b", tmp_path, lease_s=1.0, delay_s=0.01)
    try:
        wait_for(lambda: state(redis_client, settings, "crash").get("state") == "completed", what="b completes")
    finally:
        b.signal(signal.SIGTERM)
        b.wait()
    assert_complete_exactly_once(redis_client, settings, "crash")
    assert state(redis_client, settings, "crash")["attempt"] == "2"
    assert "reclaimed job entry" in b.log() and "already on" in b.log()  # Redis rejected b's duplicates


def test_model_process_workers_kill_9_leaves_no_orphan_and_the_job_completes_once(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """The same with the model in a child process of each worker (VSEG_MODEL_PROCESS=on, the CUDA
    default): killing the worker takes its model process with it, and the next worker's model
    process finishes the job, every frame once."""
    import re

    on = {"VSEG_MODEL_PROCESS": "on"}
    submit(video, prompt, settings=settings, client=redis_client, job_id="mp")
    a = WorkerProcess(settings, "a", tmp_path, lease_s=1.0, delay_s=0.1, env=on)
    wait_for(lambda: frames_done(redis_client, settings, "mp") >= 5, what="a publishes frames")
    child = int(re.search(r"model process (\d+) ready", a.log()).group(1))  # type: ignore[union-attr]
    a.kill()

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")  # exited, unreaped
        except OSError:
            return True

    wait_for(lambda: gone(child), timeout_s=15, what="a's model process exits")
    b = WorkerProcess(settings, "b", tmp_path, lease_s=1.0, delay_s=0.01, env=on)
    try:
        wait_for(lambda: state(redis_client, settings, "mp").get("state") == "completed", what="b completes")
    finally:
        b.signal(signal.SIGTERM)
        assert b.wait() == 0
    assert_complete_exactly_once(redis_client, settings, "mp")
    assert "model process" in b.log() and "ready" in b.log()


# ---- 3. fencing -----------------------------------------------------------------------------------
def test_stale_worker_writes_nothing_after_losing_its_lease(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    submit(video, prompt, settings=settings, client=redis_client, job_id="stale")
    a = WorkerProcess(settings, "a", tmp_path, lease_s=1.0, delay_s=0.1)
    wait_for(lambda: frames_done(redis_client, settings, "stale") >= 3, what="a publishes frames")
    a.signal(signal.SIGSTOP)
    frozen_at = frames_done(redis_client, settings, "stale")
    b = WorkerProcess(settings, "b", tmp_path, lease_s=1.0, delay_s=0.2)
    try:
        wait_for(lambda: len(started_events(redis_client, settings, "stale")) == 2, what="b takes over")
        a.signal(signal.SIGCONT)
        wait_for(lambda: "lease lost" in a.log(), what="a notices it lost the lease")
        wait_for(lambda: state(redis_client, settings, "stale").get("state") == "completed", what="b completes")
    finally:
        for w in (a, b):
            w.signal(signal.SIGCONT)
            w.signal(signal.SIGTERM)
            w.wait()
    assert frozen_at < N
    assert_complete_exactly_once(redis_client, settings, "stale")
    assert [s.worker for s in started_events(redis_client, settings, "stale")] == ["a", "b"]


def publisher_of_a_claimed_job(client: redis.Redis, settings: Settings, job_id: str,
                               num_frames: int) -> tuple[str, Lease, ResultPublisher]:
    """A job entry read by consumer "a", its lease and a publisher writing under that lease."""
    keys = settings.keys
    client.xgroup_create(keys.jobs, keys.group, id="0", mkstream=True)
    entry = client.xadd(keys.jobs, {"type": "job", "data": b""}).decode()
    client.xreadgroup(keys.group, "a", {keys.jobs: ">"})
    assert take(client, Scripts(client), keys, entry, job_id, "a", 5000)  # the fence: the job hash's owner
    lease = Lease(client, keys, entry, "a", lease_s=5, job=job_id)
    return entry, lease, ResultPublisher(client, keys, job_id, num_frames, lease, patience_s=1)


def take_over(client: redis.Redis, settings: Settings, entry: str, job_id: str, consumer: str = "b") -> None:
    """Another worker takes the job over, as after a's lease ran out: the entry (XCLAIM, as XAUTOCLAIM does),
    then the fence in the job hash (`take`)."""
    keys = settings.keys
    client.xclaim(keys.jobs, keys.group, consumer, 0, [entry])
    client.hset(keys.job(job_id), "lease_until", 0)  # a's lease has run out
    assert take(client, Scripts(client), keys, entry, job_id, consumer, 5000)


def test_fenced_writes_are_refused_once_another_worker_owns_the_entry(
    settings: Settings, redis_client: redis.Redis
) -> None:
    keys = settings.keys
    entry, lease, pub = publisher_of_a_claimed_job(redis_client, settings, "j", 3)
    masks = FrameMasks(0, (1,), __import__("numpy").zeros((1, 4, 4), bool), __import__("numpy").ones(1, "float32"))
    assert pub.frame(frame_result("j", masks, random_weights=False))
    take_over(redis_client, settings, entry, "j")  # b takes it over
    with pytest.raises(LeaseLost):
        pub.frame(frame_result("j", FrameMasks(1, (1,), masks.masks, masks.scores), random_weights=False))
    with pytest.raises(LeaseLost):
        pub.terminal(messages.Completed("j", "x.mp4", 3, 1), ttl_s=60)
    assert not lease.renew() and lease.lost.is_set()
    assert [i.decode() for i, _ in redis_client.xrange(keys.results("j"))] == ["1-0"]
    assert redis_client.xpending(keys.jobs, keys.group)["pending"] == 1  # still b's, not acknowledged


def test_the_lua_scripts_write_the_states_they_are_given(settings: Settings, redis_client: redis.Redis) -> None:
    """The scripts take the JobState (and the events MAXLEN) as arguments: a finished job ends in its
    terminal state with a copy of its entry on the events stream; a stalled one is `retrying`, parked with
    the placeholder consumer; one handed back is `queued` again, its attempt given back."""
    keys = settings.keys
    entry, lease, pub = publisher_of_a_claimed_job(redis_client, settings, "j", 3)
    assert pub.terminal(messages.Cancelled("j", 0), ttl_s=60)
    assert state(redis_client, settings, "j")["state"] == JobState.CANCELLED
    assert isinstance(messages.decode(redis_client.xrevrange(keys.events, count=1)[0][1]), messages.Cancelled)
    assert redis_client.xlen(keys.jobs) == 0
    for job_id in ("stalled", "back"):
        redis_client.hset(keys.job(job_id), mapping={"state": JobState.RUNNING.value, "attempt": 1})
        entry = redis_client.xadd(keys.jobs, {"type": "job", "data": b""}).decode()
        redis_client.xreadgroup(keys.group, "a", {keys.jobs: ">"})
        assert take(redis_client, Scripts(redis_client), keys, entry, job_id, "a", 5000)
        if job_id == "stalled":
            Lease(redis_client, keys, entry, "a", lease_s=5, job=job_id)._abandon()  # as its heartbeat does
            assert redis_client.xpending_range(keys.jobs, keys.group, entry, entry, 1)[0]["consumer"] == b"abandoned"
        else:
            Worker(settings=settings, segmenter=ColourSegmenter(), client=redis_client, name="a").hand_back(entry, job_id)
    assert state(redis_client, settings, "stalled")["state"] == JobState.RETRYING
    assert state(redis_client, settings, "stalled")["attempt"] == "1"  # the stalled attempt counts
    assert state(redis_client, settings, "back")["state"] == JobState.QUEUED
    assert state(redis_client, settings, "back")["attempt"] == "0"


def test_frame_entries_are_written_in_one_pipelined_round_trip_and_duplicates_rejected(
    settings: Settings, redis_client: redis.Redis
) -> None:
    import numpy as np

    keys = settings.keys
    entry, _, pub = publisher_of_a_claimed_job(redis_client, settings, "p", 4)
    results = [frame_result("p", FrameMasks(k, (1,), np.zeros((1, 4, 4), bool), np.ones(1, "float32")),
                            random_weights=False) for k in range(4)]
    round_trips = []
    real_pipeline = redis_client.pipeline

    def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        execute = pipe.execute
        pipe.execute = lambda *a, **k: (round_trips.append(len(pipe.command_stack)), execute(*a, **k))[1]
        return pipe

    redis_client.pipeline = counting_pipeline  # type: ignore[method-assign]
    assert pub.frames(results[:3]) == 3
    assert pub.frames(results[2:]) == 1  # frame 2 again: Redis rejects it, frame 3 is new
    assert round_trips == [3, 2]
    assert pub.duplicates_rejected == 1
    assert [i.decode() for i, _ in redis_client.xrange(keys.results("p"))] == ["1-0", "2-0", "3-0", "4-0"]
    assert frames_done(redis_client, settings, "p") == 4
    take_over(redis_client, settings, entry, "p")  # b takes the job over
    with pytest.raises(LeaseLost, match="frame entry 1-0"):
        pub.frames(results[:2])


# ---- 4. attempts and dead letters -------------------------------------------------------------------
def test_job_that_kills_its_worker_every_time_is_dead_lettered_and_others_flow(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    submit(video, prompt, settings=settings, client=redis_client, job_id="poison")
    submit(video, prompt, settings=settings, client=redis_client, job_id="after")
    spawned = 0
    while state(redis_client, settings, "poison").get("state") != "dead" and spawned < 6:
        w = WorkerProcess(settings, f"w{spawned}", tmp_path, lease_s=0.5, delay_s=0.01, extra=["--max-attempts", "3"],
                          faults={"poison": {"crash_at": 3}})  # the fake segmenter SIGKILLs its worker at frame 3
        spawned += 1
        w.wait(60) if spawned <= 3 else None
        if spawned > 3:
            wait_for(lambda: state(redis_client, settings, "poison").get("state") == "dead", what="dead letter")
            wait_for(lambda: state(redis_client, settings, "after").get("state") == "completed", what="next job")
            w.signal(signal.SIGTERM)
            w.wait()
    assert spawned == 4  # three runs died, the fourth worker dead-lettered it and went on
    dead = [f for _, f in redis_client.xrange(settings.keys.dead)]
    assert len(dead) == 1 and dead[0][b"attempts"] == b"3"
    assert "died" in dead[0][b"error"].decode() or "attempt" in dead[0][b"error"].decode()
    last = messages.decode(redis_client.xrange(settings.keys.results("poison"))[-1][1])
    assert isinstance(last, messages.Dead) and last.attempts == 3
    assert redis_client.xlen(settings.keys.jobs) == 0


def test_transient_error_retries_with_backoff_and_permanent_fails_at_once(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    submit(video, prompt, settings=settings, client=redis_client, job_id="blip")
    submit(video, prompt, settings=settings, client=redis_client, job_id="perm")
    (settings.storage_root / "jobs/perm/frames/00002.jpg").unlink()
    hooks = ChaosHooks(ColourSegmenter(), faults={"blip": Faults(transient_at=4)})  # RetryableError once, at frame 4
    worker = Worker(settings=settings, segmenter=hooks, client=redis_client, name="inproc")
    worker.run(burst=True)
    blip = state(redis_client, settings, "blip")
    assert blip["state"] == "completed" and blip["attempt"] == "2" and "RetryableError" in blip["error"]
    assert_complete_exactly_once(redis_client, settings, "blip")
    perm = state(redis_client, settings, "perm")
    assert perm["state"] == "failed" and perm["attempt"] == "1" and "missing 00002.jpg" in perm["error"]


# ---- 5. idempotent submission ----------------------------------------------------------------------
class TimesOutAfterWriting:
    """A client whose first script call runs on the server but whose reply is lost, as in a client timeout."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def register_script(self, script: str) -> Script:
        return Script(self, script)  # type: ignore[arg-type]  # its calls come back through evalsha below

    def evalsha(self, *args: Any) -> Any:
        result = self._client.evalsha(*args)
        if not self.failed:
            self.failed = True
            raise redis.TimeoutError("reply lost")
        return result


def test_retry_after_client_timeout_and_racing_submits_give_one_job(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis
) -> None:
    flaky = TimesOutAfterWriting(redis_client)
    with pytest.raises(redis.TimeoutError):
        submit(video, prompt, settings=settings, client=flaky, job_id="retry")  # type: ignore[arg-type]
    assert not submit(video, prompt, settings=settings, client=redis_client, job_id="retry").created

    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(
        submit(video, prompt, settings=settings, client=redis.Redis.from_url(settings.redis_url), job_id="race").created
    )) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert redis_client.xlen(settings.keys.jobs) == 2
    worker = Worker(settings=settings, segmenter=ColourSegmenter(), client=redis_client, name="inproc")
    assert worker.run(burst=True) == 2
    assert len(started_events(redis_client, settings, "race")) == 1


# ---- 6. cancellation -----------------------------------------------------------------------------------
def test_cancel_running_job_stops_it_within_a_few_frames_and_it_is_not_retried(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    submit(video, prompt, settings=settings, client=redis_client, job_id="stopme")
    w = WorkerProcess(settings, "w", tmp_path, lease_s=0.5, delay_s=0.15)
    try:
        wait_for(lambda: frames_done(redis_client, settings, "stopme") >= 3, what="frames")
        at_cancel = frames_done(redis_client, settings, "stopme")
        assert cancel("stopme", settings=settings, client=redis_client) == "requested"
        wait_for(lambda: state(redis_client, settings, "stopme").get("state") == "cancelled", what="cancelled")
        time.sleep(1.5)  # three leases: nobody retries it
    finally:
        w.signal(signal.SIGTERM)
        w.wait()
    last = messages.decode(redis_client.xrange(settings.keys.results("stopme"))[-1][1])
    assert isinstance(last, messages.Cancelled) and last.frames_done - at_cancel <= 3
    st = state(redis_client, settings, "stopme")
    assert st["state"] == "cancelled" and st["attempt"] == "1"
    assert redis_client.xlen(settings.keys.jobs) == 0
    assert cancel("stopme", settings=settings, client=redis_client) == "cancelled"  # already ended


def test_cancel_queued_job_and_unknown_job(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis
) -> None:
    submit(video, prompt, settings=settings, client=redis_client, job_id="queued")
    assert cancel("queued", settings=settings, client=redis_client) == "cancelled"
    assert redis_client.xlen(settings.keys.jobs) == 0
    assert status("queued", settings=settings, client=redis_client)["state"] == "cancelled"
    assert isinstance(messages.decode(redis_client.xrange(settings.keys.results("queued"))[-1][1]), messages.Cancelled)
    assert Worker(settings=settings, segmenter=ColourSegmenter(), client=redis_client).run(burst=True) == 0
    with pytest.raises(UnknownJobError):
        cancel("never", settings=settings, client=redis_client)


# ---- 7. graceful shutdown --------------------------------------------------------------------------------
def test_sigterm_finishes_the_current_job_within_the_grace_period(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    submit(video, prompt, settings=settings, client=redis_client, job_id="finish")
    w = WorkerProcess(settings, "w", tmp_path, lease_s=1.0, delay_s=0.05, extra=["--grace", "30"])
    wait_for(lambda: frames_done(redis_client, settings, "finish") >= 2, what="frames")
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0
    assert_complete_exactly_once(redis_client, settings, "finish")


def test_sigterm_hands_back_after_grace_and_second_sigterm_exits_at_once(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    submit(video, prompt, settings=settings, client=redis_client, job_id="handback")
    a = WorkerProcess(settings, "a", tmp_path, lease_s=30.0, delay_s=0.3, extra=["--grace", "0.5"])
    wait_for(lambda: frames_done(redis_client, settings, "handback") >= 1, what="frames")
    a.signal(signal.SIGTERM)
    assert a.wait(15) == 0
    st = state(redis_client, settings, "handback")
    assert st["state"] == "queued" and st["attempt"] == "0"  # handed back, the attempt not counted
    # with a 30 s lease, only an immediate hand-back lets b take it now
    b = WorkerProcess(settings, "b", tmp_path, lease_s=30.0, delay_s=0.3, extra=["--grace", "60"])
    wait_for(lambda: len(started_events(redis_client, settings, "handback")) == 2, timeout_s=10, what="b takes it")
    b.signal(signal.SIGTERM)
    # two signals that land before the handler runs count as one: wait until the first was handled
    wait_for(lambda: "SIGTERM: finishing the current job" in b.log(), timeout_s=10, what="b to handle the SIGTERM")
    b.signal(signal.SIGTERM)
    assert b.wait(30) == 0  # a shutdown, not a failure: the job is handed back and the worker exits normally
    # the worker's own reaction, from its log's clock (the interpreter's teardown after it is the machine's speed)
    log = b.log()
    assert log_time(log, "exiting: WorkerStats") - log_time(log, "second SIGTERM") < 1.5, log[-2000:]
    assert "second SIGTERM: handing back the current job and exiting now" in log
    assert state(redis_client, settings, "handback")["state"] == "queued"
    c = WorkerProcess(settings, "c", tmp_path, lease_s=30.0, delay_s=0.0)
    try:
        wait_for(lambda: state(redis_client, settings, "handback").get("state") == "completed", what="c completes")
    finally:
        c.signal(signal.SIGTERM)
        c.wait()
    assert state(redis_client, settings, "handback")["attempt"] == "1"
    assert_complete_exactly_once(redis_client, settings, "handback")


# ---- 8. Redis outages ----------------------------------------------------------------------------------------
@pytest.fixture
def own_redis(tmp_path: Path) -> Any:
    server = RedisServer(data_dir=tmp_path / "redis-data", appendonly=True)
    server.data_dir.mkdir()
    server.start()
    yield server
    server.stop()


def test_redis_restart_mid_job_loses_and_duplicates_nothing(
    video: Path, prompt: list[ObjectPrompt], own_redis: RedisServer, storage_root: Path, tmp_path: Path
) -> None:
    settings = Settings.load(environ={}, redis_url=own_redis.url, storage_root=storage_root, block_ms=200)
    client = redis.Redis.from_url(own_redis.url)
    submit(video, prompt, settings=settings, client=client, job_id="outage")
    w = WorkerProcess(settings, "w", tmp_path, lease_s=4.0, delay_s=0.1)
    try:
        wait_for(lambda: frames_done(client, settings, "outage") >= 4, what="frames")
        own_redis.kill()
        time.sleep(1.0)  # deliberate: down for a quarter of the lease
        own_redis.start()
        wait_for(lambda: state(client, settings, "outage").get("state") == "completed", timeout_s=60, what="done")
    finally:
        w.signal(signal.SIGTERM)
        w.wait()
    assert_complete_exactly_once(client, settings, "outage")
    assert state(client, settings, "outage")["attempt"] == "1"


def test_accepted_job_survives_redis_kill_9_with_aof(
    video: Path, prompt: list[ObjectPrompt], own_redis: RedisServer, storage_root: Path
) -> None:
    settings = Settings.load(environ={}, redis_url=own_redis.url, storage_root=storage_root, block_ms=200)
    client = redis.Redis.from_url(own_redis.url)
    assert submit(video, prompt, settings=settings, client=client, job_id="durable").created
    own_redis.kill()
    own_redis.start()
    worker = Worker(settings=settings, segmenter=ColourSegmenter(), client=client, name="after-crash")
    assert worker.run(burst=True) == 1
    assert_complete_exactly_once(client, settings, "durable")


# ---- 9. bounded memory ------------------------------------------------------------------------------------------
def test_idle_consumers_are_removed_only_when_they_hold_nothing(settings: Settings, redis_client: redis.Redis) -> None:
    keys = settings.keys
    settings_fast = Settings.load(environ={}, redis_url=settings.redis_url, lease_s=0.1)
    redis_client.xgroup_create(keys.jobs, keys.group, id="0", mkstream=True)
    redis_client.xadd(keys.jobs, {"type": "job", "data": b""})
    redis_client.xreadgroup(keys.group, "holder", {keys.jobs: ">"})  # holds one entry
    redis_client.xgroup_createconsumer(keys.jobs, keys.group, "empty")  # holds nothing
    time.sleep(0.4)  # deliberate: both consumers idle for more than three leases (0.3 s)
    assert {c["name"].decode() for c in redis_client.xinfo_consumers(keys.jobs, keys.group)} == {"holder", "empty"}
    worker = Worker(settings=settings_fast, segmenter=ColourSegmenter(), client=redis_client, name="me")
    worker.housekeeping(force=True)
    names = {c["name"].decode() for c in redis_client.xinfo_consumers(keys.jobs, keys.group)}
    assert names == {"holder"} and worker.stats.consumers_removed == 1


# ---- 10. trust boundaries -----------------------------------------------------------------------------------------
def test_job_cannot_leave_storage_root_and_limits_apply_at_the_worker(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    keys = settings.keys
    for job_id, frames_dir, num_frames in (("escape", "../outside", 3), ("abs", "/etc", 3),
                                           ("huge", "jobs/huge/frames", 10**6)):
        job = messages.JobMessage(job_id, frames_dir, num_frames, 96, 64, 10.0, tuple(prompt))
        redis_client.hset(keys.job(job_id), mapping={"state": "queued"})
        redis_client.xadd(keys.jobs, messages.encode(job))  # type: ignore[arg-type]
    Worker(settings=settings, segmenter=ColourSegmenter(), client=redis_client).run(burst=True)
    assert "stay inside it" in state(redis_client, settings, "escape")["error"]
    assert "stay inside it" in state(redis_client, settings, "abs")["error"]
    assert "over the limit" in state(redis_client, settings, "huge")["error"]
    from runtime.limits import LimitError

    small = Settings.load(environ={}, redis_url=settings.redis_url, storage_root=settings.storage_root, max_frames=5)
    with pytest.raises(LimitError, match="VSEG_MAX_FRAMES"):
        submit(video, prompt, settings=small, client=redis_client, job_id="toolong")
    tiny = Settings.load(environ={}, redis_url=settings.redis_url, storage_root=settings.storage_root, max_pixels=100)
    with pytest.raises(LimitError, match="pixels"):
        submit(video, prompt, settings=tiny, client=redis_client, job_id="toobig")
    assert not redis_client.exists(keys.job("toolong")) and not (settings.storage_root / "jobs/toolong/frames").exists()


def test_password_and_acl_user_in_redis_url(
    video: Path, prompt: list[ObjectPrompt], tmp_path: Path, storage_root: Path
) -> None:
    server = RedisServer(data_dir=tmp_path / "auth")
    server.data_dir.mkdir()
    server.extra_args = ["--requirepass", "s3cret", "--user", "svc", "on", ">pw2", "~*", "&*", "+@all"]
    server.start(password="s3cret")
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping() or redis.Redis(port=server.port).xlen("x")
        for url in (f"redis://:s3cret@127.0.0.1:{server.port}/0", f"redis://svc:pw2@127.0.0.1:{server.port}/0"):
            settings = Settings.load(environ={}, redis_url=url, storage_root=storage_root)
            from runtime.connection import connect

            client = connect(settings)
            job = f"auth{len(url)}"
            submit(video, prompt, settings=settings, client=client, job_id=job)
            Worker(settings=settings, segmenter=ColourSegmenter(), client=client).run(burst=True)
            assert state(client, settings, job)["state"] == "completed"
    finally:
        server.stop()


# ---- 11. visibility --------------------------------------------------------------------------------------------------
def test_status_and_worker_check_cli(
    video: Path, prompt: list[ObjectPrompt], settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from tests.workers import ROOT, worker_env

    env = worker_env(settings)
    check = subprocess.run([sys.executable, "-m", "worker", "check"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert check.returncode == 1, check.stdout
    submit(video, prompt, settings=settings, client=redis_client, job_id="seen")
    # held at frame 5 (the fake model blocks there), so the job is still running when status asks, on any machine
    w = WorkerProcess(settings, "w", tmp_path, lease_s=1.0, delay_s=0.1, faults={"seen": {"block_at": 5}})
    try:
        wait_for(lambda: frames_done(redis_client, settings, "seen") >= 2, what="frames")
        check = subprocess.run([sys.executable, "-m", "worker", "check"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
        out = subprocess.run([sys.executable, "-m", "producer", "status", "seen"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0 and "running" in out.stdout and "attempt: 1" in out.stdout
        assert f"/{N} frames" in out.stdout
    finally:
        w.kill()  # wedged on purpose: a SIGTERM would wait out the grace
    missing = subprocess.run([sys.executable, "-m", "producer", "status", "nope"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "no job 'nope'" in missing.stderr


def test_rediss_url_with_a_private_ca(
    video: Path, prompt: list[ObjectPrompt], tmp_path: Path, storage_root: Path
) -> None:
    """TLS: redis-server with a certificate signed by a CA the test makes; the URL names the CA file."""
    import shutil
    import subprocess

    assert shutil.which("openssl"), "openssl is needed to make the test certificates"
    d = tmp_path / "tls"
    d.mkdir()

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=vseg-test-ca")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.crt", "-days", "2", "-extfile", "san.ext")
    from producer.local_redis import free_port, redis_server_binary

    tls_port = free_port()
    binary = redis_server_binary()
    assert binary is not None
    proc = subprocess.Popen(  # plain TCP off (--port 0): only TLS is served
        [binary, "--port", "0", "--bind", "127.0.0.1", "--dir", str(d), "--save", "", "--tls-port", str(tls_port),
         "--tls-cert-file", str(d / "server.crt"), "--tls-key-file", str(d / "server.key"),
         "--tls-ca-cert-file", str(d / "ca.crt"), "--tls-auth-clients", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={d / 'ca.crt'}"
    try:
        settings = Settings.load(environ={}, redis_url=url, storage_root=storage_root)
        from runtime.connection import connect

        client = connect(settings)
        wait_for(lambda: _pings(client), timeout_s=10, what="TLS redis-server")
        submit(video, prompt, settings=settings, client=client, job_id="tls")
        Worker(settings=settings, segmenter=ColourSegmenter(), client=client).run(burst=True)
        assert state(client, settings, "tls")["state"] == "completed"
        plain = redis.Redis(port=tls_port, socket_timeout=2)
        with pytest.raises(redis.ConnectionError):
            plain.ping()  # a client that does not speak TLS is refused
    finally:
        proc.terminate()
        proc.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
