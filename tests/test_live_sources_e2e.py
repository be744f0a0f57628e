"""Live jobs from real live sources started by the tests (tests/live_servers.py), through the worker:
MPEG-TS over TCP and over HTTP (ffmpeg at real-time rate) and RTSP from a real RTSP server
(GStreamer's). The source killed and restarted mid-job: the producer reconnects, the job goes on, and
its progress reports the outage. A producer killed mid-stream fails its job through the liveness key."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import redis

from producer.cli_live import live_status_lines
from producer.control import request_stop
from producer.live_submit import submit_live
from runtime.settings import Settings
from schemas import messages
from tests.live_servers import LiveServer, missing_tools, rtsp_source, ts_over_http, ts_over_tcp
from tests.test_live_jobs import FPS, SIZE, frames_of, point, start_worker, terminal
from tests.videos import make_video
from tests.workers import ROOT, wait_for, worker_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("src") / "clip.mp4", num_frames=60, size_wh=SIZE, fps=FPS)


@pytest.fixture
def live_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, max_latency_s=1.0, producer_ttl_s=3.0, source_watchdog_s=3.0,
                               source_read_timeout_s=2.0, source_outage_s=20.0)


def frames_done(client: redis.Redis, settings: Settings, job: str) -> int:
    return int(client.hget(settings.keys.job(job), "frames_done") or 0)


def run_live(settings: Settings, client: redis.Redis, url: str, job: str, *, after: int = 20,
             during: Callable[[], None] = lambda: None) -> messages.Completed:
    """A live job on `url` until `after` frames are published (and `during` has run), then stopped."""
    errors: list[BaseException] = []

    def ingest() -> None:
        try:
            submit_live(url, [point()], settings=settings, job_id=job)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    producer = threading.Thread(target=ingest, daemon=True)
    producer.start()
    wait_for(lambda: client.exists(settings.keys.job(job)) or errors, 30, "the live job enqueued")
    assert not errors, errors
    worker = start_worker(settings, client, delay_s=0.0)
    wait_for(lambda: frames_done(client, settings, job) >= after, 30, f"{after} frames published")
    during()
    request_stop(job, settings=settings, client=client)
    producer.join(15)
    worker.join(30)
    assert not errors, errors
    done = terminal(client, settings, job)
    assert isinstance(done, messages.Completed), done
    results = frames_of([messages.decode(f) for _, f in client.xrange(settings.keys.results(job))])
    assert [r.frame_idx for r in results] == list(range(done.num_frames))
    processed = [r for r in results if not r.skipped]
    assert processed and all([o.obj_id for o in r.objects] == [1] for r in processed)
    assert all(r.captured_at is not None for r in results)
    return done


SOURCES: dict[str, Callable[[Path], AbstractContextManager[LiveServer]]] = {
    "tcp": ts_over_tcp, "http": ts_over_http, "rtsp": rtsp_source}


@pytest.fixture(params=sorted(SOURCES))
def source(request: pytest.FixtureRequest, clip: Path) -> Iterator[LiveServer]:
    needs = ("rtsp",) if request.param == "rtsp" else ("ffmpeg",)
    if (why := missing_tools(*needs)) is not None:
        pytest.skip(why)
    with SOURCES[request.param](clip) as server:
        yield server


def test_a_live_job_from_a_real_source(source: LiveServer, live_settings: Settings, redis_client: redis.Redis) -> None:
    done = run_live(live_settings, redis_client, source.url, "cam")
    assert done.num_frames >= 20 and done.render_path.endswith(".m3u8")


def test_the_source_killed_and_restarted_mid_job_reconnects_and_the_job_goes_on(
        clip: Path, live_settings: Settings, redis_client: redis.Redis) -> None:
    if (why := missing_tools("ffmpeg")) is not None:
        pytest.skip(why)
    with ts_over_tcp(clip) as server:
        def outage() -> None:
            server.kill()
            before = frames_done(redis_client, live_settings, "flaky")
            # visible while it lasts, not only once the source is back
            key = live_settings.keys.job("flaky")
            wait_for(lambda: redis_client.hget(key, "source_state") == b"down", 20, "the job hash saying down")
            state = {k.decode(): v.decode() for k, v in redis_client.hgetall(key).items()}
            assert state["source_outages"] == "1" and float(state["source_down_since"]) <= time.time()
            assert any(line.startswith("source state: down since ") for line in live_status_lines(state)), state
            def down_events() -> list[messages.Progress]:  # written just after the hash: waited for
                return [m for m in (messages.decode(f) for _, f in redis_client.xrange(live_settings.keys.events))
                        if isinstance(m, messages.Progress) and m.job_id == "flaky" and m.source_state == "down"]

            wait_for(lambda: down_events(), 10, "the progress event saying down")
            down = down_events()
            assert len(down) == 1 and down[0].source_outages == 1 and down[0].source_down_since is not None
            server.restart()
            wait_for(lambda: frames_done(redis_client, live_settings, "flaky") >= before + 20, 40,
                     "frames after the source came back")

        run_live(live_settings, redis_client, server.url, "flaky", during=outage)
    progress = [m for m in (messages.decode(f) for _, f in redis_client.xrange(live_settings.keys.events))
                if isinstance(m, messages.Progress) and m.job_id == "flaky"]
    assert progress[-1].source_outages >= 1 and progress[-1].source_down_s > 0
    assert progress[-1].source_state == "up" and progress[-1].source_down_since is None
    state = redis_client.hgetall(live_settings.keys.job("flaky"))
    assert state[b"source_state"] == b"up" and b"source_down_since" not in state and state[b"source_outages"] == b"1"


def test_a_producer_killed_mid_stream_fails_its_live_job(live_settings: Settings, redis_client: redis.Redis,
                                                         tmp_path: Path) -> None:
    long_clip = make_video(tmp_path / "long.mp4", num_frames=300, size_wh=SIZE, fps=FPS)
    env = {**worker_env(live_settings), "VSEG_PRODUCER_TTL_S": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "producer", "submit", str(long_clip), "--live", "--point", "1:20,20",
                             "--job-id", "orphan"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "orphan"
        worker = start_worker(live_settings, redis_client, delay_s=0.0)
        wait_for(lambda: frames_done(redis_client, live_settings, "orphan") >= 5, 30, "frames published")
        proc.send_signal(signal.SIGKILL)
        worker.join(40)
    finally:
        proc.kill()
    done = terminal(redis_client, live_settings, "orphan")
    assert isinstance(done, messages.Failed) and "producer stopped" in done.error, done
