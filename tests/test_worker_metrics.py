"""The worker's metrics endpoint (worker/service/metrics.py, runtime/metrics.py) after real jobs: its
counters match what happened, /healthz follows the heartbeat thread, /readyz follows Redis, a real
Prometheus scrapes it, and its JSON logs name the job on every record about it."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import redis

from producer.control import cancel
from producer.local_redis import RedisServer
from producer.submission import submit
from runtime.settings import Settings
from schemas import messages
from schemas.names import JobState
from schemas.prompts import ObjectPrompt
from tests import prom
from tests.fakes import ColourSegmenter
from tests.videos import disc_prompt, make_video
from tests.workers import WorkerProcess, wait_for
from worker.service.loop import Worker

pytestmark = pytest.mark.integration

N = 12
SIZE = (96, 64)


def point(obj_id: int, dy: float = 0) -> ObjectPrompt:
    return disc_prompt(obj_id, 0, N, SIZE, dy)


def job_state(client: redis.Redis, settings: Settings, job_id: str) -> str:
    return (client.hget(settings.keys.job(job_id), "state") or b"").decode()


def ended(client: redis.Redis, settings: Settings, job_id: str) -> bool:
    return job_state(client, settings, job_id) in {"completed", "failed", "cancelled", "dead"}


def scrape(port: int) -> dict[str, float]:
    status, kind, body = prom.get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and kind.startswith("text/plain"), (status, kind, body)
    return prom.samples(body)


def test_counters_match_what_happened_and_prometheus_scrapes_them(settings: Settings, redis_client: redis.Redis,
                                                                   video: Path, tmp_path: Path) -> None:
    # a job whose first worker dies at frame 3: the metered worker reclaims it
    crasher = WorkerProcess(settings, "crasher", tmp_path, faults={"m-reclaimed": {"crash_at": 3}})
    submit(video, [point(1)], settings=settings, job_id="m-reclaimed")
    assert crasher.wait(60) == -signal.SIGKILL
    port = prom.free_port()
    worker = WorkerProcess(settings, "metered", tmp_path, delay_s=0.05,
                           env={"VSEG_METRICS_PORT": str(port), "VSEG_MAX_OBJECTS": "1", "VSEG_LOG_FORMAT": "json"})
    try:
        wait_for(lambda: ended(redis_client, settings, "m-reclaimed"), 60, "the reclaimed job")
        submit(video, [point(1)], settings=settings, job_id="m-ok")
        wait_for(lambda: ended(redis_client, settings, "m-ok"), 60, "m-ok")
        submit(video, [point(1), point(2, dy=4)], settings=settings, job_id="m-too-many")  # over this worker's limit
        wait_for(lambda: ended(redis_client, settings, "m-too-many"), 60, "m-too-many")
        # long enough that the cancel lands mid-job on any machine (12 frames at 0.05 s left it about 0.45 s)
        long_video = make_video(tmp_path / "long.mp4", num_frames=200, size_wh=SIZE, fps=10)
        submit(long_video, [point(1)], settings=settings, job_id="m-cancelled", stream=False)
        wait_for(lambda: int(redis_client.hget(settings.keys.job("m-cancelled"), "frames_done") or 0) >= 2, 60,
                 "m-cancelled under way")
        cancel("m-cancelled", settings=settings)
        wait_for(lambda: ended(redis_client, settings, "m-cancelled"), 60, "m-cancelled")
        states = {j: job_state(redis_client, settings, j) for j in ("m-reclaimed", "m-ok", "m-too-many", "m-cancelled")}
        assert states == {"m-reclaimed": "completed", "m-ok": "completed", "m-too-many": "failed",
                          "m-cancelled": JobState.CANCELLED.value}
        cancelled_frames = int(redis_client.hget(settings.keys.job("m-cancelled"), "frames_done") or 0)
        started = [messages.decode(f) for _, f in redis_client.xrange(settings.keys.events)]
        resumed = [m for m in started if isinstance(m, messages.Started) and m.job_id == "m-reclaimed" and m.attempt == 2]
        assert len(resumed) == 1 and 0 < resumed[0].resume_from < N  # it went on after the crasher's frames
        redone = N - resumed[0].resume_from  # the frames the metered worker computed of the reclaimed job
        wait_for(lambda: scrape(port)['vseg_jobs_total{outcome="cancelled"}'] == 1, 10, "the metrics to settle")
        m = scrape(port)
        assert m['vseg_jobs_total{outcome="completed"}'] == 2
        assert m['vseg_jobs_total{outcome="failed"}'] == 1
        assert m['vseg_jobs_total{outcome="dead"}'] == 0 and m['vseg_jobs_total{outcome="handed_back"}'] == 0
        assert m["vseg_reclaims_total"] == 1 and m["vseg_leases_lost_total"] == 0
        assert m['vseg_frames_total{skipped="false"}'] == redone + N + cancelled_frames
        assert m['vseg_frames_total{skipped="true"}'] == 0  # file jobs skip nothing (live jobs may)
        assert m["vseg_frame_seconds_count"] >= redone + N + cancelled_frames
        assert m["vseg_first_result_seconds_count"] == 3  # the failed job published nothing
        assert m["vseg_latency_seconds_count"] == redone + N  # streamed jobs' frames; m-cancelled was not streamed
        assert m["vseg_sessions_active"] == 0 and m["vseg_objects_active"] == 0
        info = [k for k in m if k.startswith("vseg_model_info{")]
        assert info == ['vseg_model_info{device="cpu",image_size="1024",model="fake-colour",random_weights="false"}']
        assert "vseg_gpu_memory_bytes" not in m  # on the CPU there is none
        assert prom.get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        assert prom.get(f"http://127.0.0.1:{port}/readyz")[0] == 200
        if prom.PROMETHEUS:  # Debian's prometheus, installed by scripts/setup.sh
            with prom.prometheus({"worker": [f"127.0.0.1:{port}"]}, tmp_path) as url:
                got = prom.wait_for(url, 'vseg_jobs_total{outcome="completed"}', 20)
                assert float(got[0]["value"][1]) == 2
        # JSON logs: one object a line; every record about a job names it, its attempt and the worker
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        records = [json.loads(line) for line in worker.log().splitlines() if line.strip()]
        about_ok = [r for r in records if "m-ok" in r["message"]]
        assert about_ok and all(r.get("job_id") == "m-ok" and r.get("worker") == "metered" for r in about_ok)
        assert any(r.get("attempt") == 1 and "completed" in r["message"] for r in about_ok)
        assert all("job_id" not in r for r in records if "exiting" in r["message"])
    finally:
        worker.kill()
        crasher.kill()


def test_healthz_follows_the_heartbeat_thread_and_readyz_follows_redis(tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    server = RedisServer(data_dir=tmp_path / "redis").start()
    try:
        settings = Settings(redis_url=server.url, storage_root=tmp_path / "storage", device="cpu")
        client = redis.Redis.from_url(server.url, socket_timeout=1.0)
        worker = Worker(settings=settings, segmenter=ColourSegmenter(), client=client, name="probed")
        worker.health.stale_s = 1.5
        from runtime.metrics import MetricsServer

        with MetricsServer(worker.metrics.registry, health=worker.health.alive, ready=worker.ready).start() as http:
            assert prom.get(f"{http.url}/healthz")[0] == 503  # no heartbeat yet
            worker.health.start()
            wait_for(lambda: prom.get(f"{http.url}/readyz")[0] == 200, 10, "ready")
            status, _, body = prom.get(f"{http.url}/healthz")
            assert status == 200 and body.startswith("ok: heartbeat")
            server.stop()  # Redis down: still alive, no longer ready
            wait_for(lambda: prom.get(f"{http.url}/readyz")[0] == 503, 10, "unready with Redis down")
            assert "Redis has not answered" in prom.get(f"{http.url}/readyz")[2]
            assert prom.get(f"{http.url}/healthz")[0] == 200
            worker.health.stop()  # the heartbeat thread stopped: unhealthy
            status, _, body = prom.get(f"{http.url}/healthz")
            assert status == 503 and "heartbeat thread is not running" in body
            worker.stopping = True
            assert "shutting down" in prom.get(f"{http.url}/readyz")[2]
    finally:
        server.stop()
