"""The camera fleet end to end (producer/fleet.py): `serve` daemons as subprocesses (`python -m producer.fleet`)
on real live sources (ffmpeg over TCP, GStreamer's RTSP server), a real `python -m worker` with the fake
segmenter, a real Redis. Each camera streams as job `<camera>-1`; a source killed past its outage_s fails
its job and the daemon starts `<camera>-2` by itself, streaming once the source is back; SIGHUP removes
one camera (its job completes), adds one, and a bad file changes nothing; SIGTERM completes every job and
exits 0. Two daemons on one file hold each camera once; one killed with SIGKILL, the other takes its
cameras over; no camera ever has two jobs in flight (a watcher reads the job hashes all along). Unit
tests first: what a camera's status makes of its jobs' figures, the `cameras` table, the metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from producer.cameras import Camera, CameraKeys
from producer.fleet_status import CameraStatus, FleetCollector, _announced, format_table
from runtime.settings import Settings
from schemas.names import TERMINAL_STATES
from tests.live_servers import LiveServer, free_port, hls_playlist, missing_tools, rtsp_source, ts_over_tcp
from tests.videos import make_video
from tests.workers import ROOT, LoggedProcess, WorkerProcess, stop_all, wait_for, worker_env

SIZE = (96, 64)
LEASE_S = 2.0
PROMPT = "--point 1:48,32"
SECRET = "s3cret-pw"
# the daemon's and the worker's patience, short for the tests (the defaults are tens of seconds)
FAST = {"VSEG_PRODUCER_TTL_S": "2", "VSEG_SOURCE_OPEN_TIMEOUT_S": "2", "VSEG_SOURCE_READ_TIMEOUT_S": "2",
        "VSEG_SOURCE_WATCHDOG_S": "3", "VSEG_GRACE_S": "20", "VSEG_MAX_LATENCY_S": "1"}


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if (why := missing_tools("ffmpeg")) is not None:
        pytest.skip(why)
    return make_video(tmp_path_factory.mktemp("fleet") / "clip.mp4", num_frames=60, size_wh=SIZE, fps=30)


class Daemon(LoggedProcess):
    """`python -m producer.fleet serve` in a subprocess, its log in a file."""

    def __init__(self, settings: Settings, cameras: Path, log_dir: Path, name: str, *, metrics_port: int = 0,
                 env: dict[str, str] | None = None) -> None:
        args = [sys.executable, "-m", "producer.fleet", "serve", "--cameras", str(cameras), "--lease-s", str(LEASE_S)]
        if metrics_port:
            args += ["--metrics-port", str(metrics_port)]
        super().__init__(args, {**worker_env(settings), **FAST, **(env or {})}, log_dir, name)

    def started(self) -> None:
        """Wait until it serves (its first log line says so); AssertionError with its log if it exited."""
        wait_for(lambda: "serving" in self.log() or self.proc.poll() is not None, 60, "the daemon started")
        assert self.proc.poll() is None, self.log()[-3000:]


class Watcher:
    """Reads every job hash of the cameras all along: no camera may ever have two jobs in flight."""

    def __init__(self, client: redis.Redis, settings: Settings, cameras: list[str]) -> None:
        self.client, self.settings, self.cameras = client, settings, cameras
        self.keys = CameraKeys(settings.key_prefix)
        self.overlaps: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def in_flight(self, camera: str) -> list[str]:
        last = int(self.client.get(self.keys.seq(camera)) or 0)
        jobs = [f"{camera}-{n}" for n in range(1, last + 1)]
        states = [self.client.hget(self.settings.keys.job(job), "state") for job in jobs]
        return [job for job, state in zip(jobs, states) if state is not None and state.decode() not in TERMINAL_STATES]

    def _run(self) -> None:
        while not self.done.wait(0.02):
            for camera in self.cameras:
                try:
                    flying = self.in_flight(camera)
                except redis.RedisError:  # the test is over (Redis stopped after a failure)
                    return
                if len(flying) > 1:
                    self.overlaps.append(f"{camera}: {flying}")

    def stop(self) -> list[str]:
        self.done.set()
        self.thread.join(10)
        return self.overlaps


def write_cameras(path: Path, cameras: dict[str, str], **extra: dict[str, object]) -> Path:
    entries = [{"name": name, "url": url, "prompts": [PROMPT], **extra.get(name, {})} for name, url in cameras.items()]
    path.write_text(yaml.safe_dump({"cameras": entries}))
    return path


def state(client: redis.Redis, settings: Settings, job: str) -> str | None:
    raw = client.hget(settings.keys.job(job), "state")
    return raw.decode() if raw is not None else None


def streaming(client: redis.Redis, settings: Settings, job: str, frames: int = 5) -> bool:
    values = client.hmget(settings.keys.job(job), ["state", "frames_done"])
    return values[0] == b"running" and int(values[1] or 0) >= frames


def camera_state(client: redis.Redis, settings: Settings, camera: str) -> dict[str, str]:
    raw = client.hgetall(CameraKeys(settings.key_prefix).state(camera))
    return {k.decode(): v.decode() for k, v in raw.items()}


def secrets_in(client: redis.Redis) -> list[str]:
    """Every key of Redis whose value holds SECRET (strings, hashes, streams, sets)."""
    found = []
    for raw in client.scan_iter(count=1000):
        key, kind = raw.decode(), client.type(raw).decode()
        read = {"string": client.get, "hash": client.hgetall, "stream": client.xrange, "set": client.smembers,
                "zset": lambda k: client.zrange(k, 0, -1), "list": lambda k: client.lrange(k, 0, -1)}[kind]
        values = read(raw)
        if SECRET.encode() in repr(values).encode():
            found.append(key)
    return found


def cameras_table(settings: Settings) -> str:
    out = subprocess.run([sys.executable, "-m", "producer.fleet", "cameras"], cwd=ROOT, env=worker_env(settings),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    w = WorkerProcess(settings, "fleet-worker", tmp_path, lease_s=1.0, delay_s=0.01, extra=["--concurrency", "4"],
                      env={"VSEG_MAX_LATENCY_S": "1"})
    try:
        yield w
    finally:
        stop_all(w)


def test_a_cameras_status_follows_its_jobs_figures() -> None:
    status = CameraStatus("gate")
    status.starting("gate-1")
    assert (status.state, status.job, status.source_up) == ("starting", "gate-1", False)
    status.enqueued("gate-1")
    status.observe("gate-1", {"frames_done": "10", "dropped": "0"}, 12, now=100.0)
    assert (status.fps, status.source_up, status.frames) == (None, True, 12)  # one sample: no rate yet
    down = {"frames_done": "40", "dropped": "10", "source_outages": "1", "source_state": "down",
            "source_down_since": "1700000000.5", "latency_p50_s": "0.2", "latency_p95_s": "0.4"}
    status.observe("gate-1", down, 45, now=102.0)
    assert status.fps == 10.0  # (40 - 10 skipped) - 10 frames segmented in 2 s
    assert (status.source_up, status.down_since, status.outages, status.reconnects) == (False, 1700000000.5, 1, 0)
    status.observe("gate-1", {**down, "source_state": "up"}, 50, now=103.0)
    assert (status.source_up, status.down_since, status.outages, status.reconnects) == (True, None, 1, 1)
    status.restarting("job gate-1 ended failed: lost")
    status.enqueued("gate-2")
    status.observe("gate-2", {"frames_done": "5"}, 6, now=110.0)
    assert (status.outages, status.reconnects, status.frames, status.restarts, status.fps) == (1, 1, 56, 1, None)
    status.observe("gate-1", {"frames_done": "999"}, 999, now=111.0)  # a stale read of the last job: ignored
    assert status.frames == 56
    record = status.record("host:1:ab", "rtsp://cam/1")
    assert record["state"] == "streaming" and record["job"] == "gate-2" and record["restarts"] == "1"


def test_the_cameras_table_says_dash_where_a_figure_is_unknown() -> None:
    down_at = time.time() - 5
    table = format_table([
        {"camera": "gate", "state": "streaming", "job": "gate-3", "fps": "12.345", "latency_p50_s": "0.21",
         "latency_p95_s": "0.5", "outages": "2", "restarts": "1", "daemon": "h:1:ab"},
        {"camera": "yard", "state": "streaming", "job": "yard-1", "down_since": f"{down_at:.3f}", "fps": "",
         "outages": "1", "restarts": "0"},
        {"camera": "lobby", "state": "disabled"},
        {"camera": "dock"},
    ]).splitlines()
    assert table[0].split() == ["CAMERA", "STATE", "JOB", "FPS", "P50", "P95", "OUTAGES", "RESTARTS", "DAEMON"]
    assert table[1].split() == ["gate", "streaming", "gate-3", "12.3", "0.21s", "0.50s", "2", "1", "h:1:ab"]
    shown = time.strftime("%H:%M:%S", time.localtime(down_at))
    assert table[2].split()[:6] == ["yard", "source", "down", "since", shown, "yard-1"]
    assert table[2].split()[6:] == ["-", "-", "-", "1", "0", "-"]
    assert table[3].split() == ["lobby", "disabled", "-", "-", "-", "-", "-", "-", "-"]
    assert table[4].split() == ["dock", "unassigned", "-", "-", "-", "-", "-", "-", "-"]


def test_frames_written_come_from_the_frames_streams_last_entry() -> None:
    assert _announced([]) is None
    assert _announced([(b"5-0", {b"frame_idx": b"4"})]) == 5  # frame k at (k+1)-0
    assert _announced([(b"5-1", {b"outage_s": b"1.5"})]) == 5  # a note after frame 4
    assert _announced([(b"7-0", {b"end": b"6"})]) == 6  # the end marker at (N+1)-0


def test_the_metrics_are_labelled_by_camera() -> None:
    status = CameraStatus("gate")
    status.enqueued("gate-1")
    status.observe("gate-1", {"frames_done": "10", "latency_p50_s": "0.2", "latency_p95_s": "0.3"}, 10, now=1.0)
    status.observe("gate-1", {"frames_done": "20", "latency_p50_s": "0.2", "latency_p95_s": "0.3",
                              "dropped_at_ingest": "40"}, 20, now=3.0)  # 2 s: 10 written and 40 dropped
    registry = CollectorRegistry()
    registry.register(FleetCollector(lambda: [(Camera("gate", "rtsp://cam/1"), status),
                                              (Camera("yard", "rtsp://cam/2"), None)]))
    text = generate_latest(registry).decode()
    for line in ('vseg_camera_held{camera="gate"} 1.0', 'vseg_camera_source_up{camera="gate"} 1.0',
                 'vseg_camera_latency_seconds{camera="gate",quantile="0.95"} 0.3',
                 'vseg_camera_frames_written_total{camera="gate"} 20.0', 'vseg_camera_restarts_total{camera="gate"} 0.0',
                 'vseg_camera_frames_dropped_at_ingest_total{camera="gate"} 40.0',
                 'vseg_camera_ingest_fps{camera="gate"} 25.0',
                 'vseg_camera_outages_total{camera="gate"} 0.0', 'vseg_camera_reconnects_total{camera="gate"} 0.0'):
        assert line in text, text
    assert "yard" not in text  # not held here: its holder exports its series


@pytest.mark.integration
def test_a_daemon_streams_restarts_reloads_and_stops_its_cameras(clip: Path, settings: Settings, worker: WorkerProcess,
                                                                 redis_client: redis.Redis, tmp_path: Path) -> None:
    rtsp = missing_tools("rtsp") is None
    with ExitStack() as stack:
        a: LiveServer = stack.enter_context(ts_over_tcp(clip))
        b: LiveServer = stack.enter_context(ts_over_tcp(clip))
        c: LiveServer = stack.enter_context(rtsp_source(clip) if rtsp else ts_over_tcp(clip))
        h = stack.enter_context(hls_playlist(clip, tmp_path / "hls"))  # a finished playlist: each job completes
        camera_a = {"outage_s": 3, "username": "viewer", "password_env": "CAM_A_PASSWORD"}
        path = write_cameras(tmp_path / "cameras.yaml", {"a": a.url, "b": b.url, "h": h}, a=camera_a)
        watcher = Watcher(redis_client, settings, ["a", "b", "c", "h"])
        port = free_port()
        daemon = Daemon(settings, path, tmp_path, "daemon", metrics_port=port, env={"CAM_A_PASSWORD": SECRET})
        try:
            daemon.started()
            for job in ("a-1", "b-1"):
                wait_for(lambda job=job: streaming(redis_client, settings, job), 90, f"{job} streaming")
            wait_for(lambda: camera_state(redis_client, settings, "b").get("fps"), 30, "b's processed fps published")
            table = cameras_table(settings)
            assert table.splitlines()[0].split()[:4] == ["CAMERA", "STATE", "JOB", "FPS"], table
            rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
            assert rows["a"][1:3] == ["streaming", "a-1"] and rows["b"][1:3] == ["streaming", "b-1"], table
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            assert 'vseg_camera_source_up{camera="a"} 1.0' in metrics and "vseg_camera_frames_written_total" in metrics
            assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).status == 200

            wait_for(lambda: state(redis_client, settings, "h-1") in ("running", "completed"), 60, "h-1 (HLS) ran")

            before = int(redis_client.hget(settings.keys.job("b-1"), "frames_done") or 0)
            b.kill()  # a short outage, within b's outage_s: b-1 goes on, and says it is down meanwhile
            wait_for(lambda: redis_client.hget(settings.keys.job("b-1"), "source_state") == b"down", 30, "b-1 down")
            wait_for(lambda: camera_state(redis_client, settings, "b").get("down_since"), 30, "b's outage published")
            assert "source down since" in cameras_table(settings)
            b.start()
            wait_for(lambda: int(redis_client.hget(settings.keys.job("b-1"), "frames_done") or 0) > before + 5, 60,
                     "b-1 streaming again after the outage")
            assert state(redis_client, settings, "b-1") == "running" and not redis_client.exists(settings.keys.job("b-2"))
            assert redis_client.hget(settings.keys.job("b-1"), "source_outages") == b"1"

            a.kill()  # past a's outage_s (3 s): a-1 fails, the daemon tries a-2 until the source is back
            wait_for(lambda: camera_state(redis_client, settings, "a").get("down_since"), 30, "a's outage published")
            assert camera_state(redis_client, settings, "a")["source_up"] == "0"
            wait_for(lambda: state(redis_client, settings, "a-1") == "failed", 60, "a-1 failed")
            wait_for(lambda: camera_state(redis_client, settings, "a").get("reason", "").startswith(
                "job a-2 was never enqueued"), 60, "a-2 tried while the source is down")  # its id is used again
            a.start()
            wait_for(lambda: streaming(redis_client, settings, "a-2"), 90, "a-2 streaming once the source is back")
            assert redis_client.get(CameraKeys(settings.key_prefix).seq("a")) == b"2"  # a-2 reused while the source was down
            wait_for(lambda: int(camera_state(redis_client, settings, "a").get("restarts") or 0) >= 1, 10,
                     "a's restart published")
            assert "a-1" in daemon.log() and "ended failed" in daemon.log()

            write_cameras(path, {"a": a.url, "c": c.url}, a=camera_a)  # b and h removed, c added, a unchanged
            daemon.signal(signal.SIGHUP)
            wait_for(lambda: state(redis_client, settings, "b-1") == "completed", 60, "b-1 completed")
            wait_for(lambda: streaming(redis_client, settings, "c-1"), 90, "c-1 streaming")
            assert state(redis_client, settings, "a-2") == "running"  # untouched
            assert redis_client.hget(settings.keys.job("a-2"), "camera") == b"a"
            door = {"door": [[0, 0], [40, 0], [40, 40]]}  # zones alone changed: a-2 runs on, with them
            write_cameras(path, {"a": a.url, "c": c.url}, a={**camera_a, "zones": door})
            daemon.signal(signal.SIGHUP)
            wait_for(lambda: redis_client.hget(settings.keys.job("a-2"), "zones"), 30, "a-2's zones replaced")
            assert json.loads(redis_client.hget(settings.keys.job("a-2"), "zones"))["zones"][0]["name"] == "door"
            assert state(redis_client, settings, "a-2") == "running" and not redis_client.exists(settings.keys.job("a-3"))
            write_cameras(path, {"a": a.url, "c": c.url}, a=camera_a, c={"prompts": ["--point 1:40,30"]})
            daemon.signal(signal.SIGHUP)  # c changed: c-1 completes, then c-2 starts
            wait_for(lambda: state(redis_client, settings, "c-1") == "completed", 60, "c-1 completed")
            if not rtsp:
                c.restart()  # ffmpeg's TCP listen mode serves one client (an RTSP server serves any number)
            wait_for(lambda: streaming(redis_client, settings, "c-2"), 90, "c-2 streaming")
            assert state(redis_client, settings, "a-2") == "running"  # untouched
            path.write_text("cameras: [")
            daemon.signal(signal.SIGHUP)
            wait_for(lambda: "cameras file not reloaded" in daemon.log(), 30, "the bad file logged")
            assert [line for line in daemon.log().splitlines() if "cameras file not reloaded" in line][0].count(
                str(path)) == 1
            assert state(redis_client, settings, "a-2") == "running" and state(redis_client, settings, "c-2") == "running"

            daemon.signal(signal.SIGTERM)
            assert daemon.wait(60) == 0, daemon.log()[-3000:]
        finally:
            daemon.signal(signal.SIGKILL)
            daemon.wait(30)
        for job in ("a-2", "c-2"):
            wait_for(lambda job=job: state(redis_client, settings, job) in TERMINAL_STATES, 60, f"{job} ended")
            assert state(redis_client, settings, job) == "completed", job
        h_jobs = [k.decode().split(":")[-1].strip("{}") for k in redis_client.scan_iter(settings.keys.job("h-*"))]
        assert h_jobs and all(state(redis_client, settings, job) == "completed" for job in h_jobs), h_jobs
        assert not watcher.stop()
        assert SECRET not in daemon.log() and not secrets_in(redis_client)  # a's password: in the reader only
        assert redis_client.get(CameraKeys(settings.key_prefix).lease("a")) is None  # freed on the way out


@pytest.mark.integration
def test_two_daemons_hold_each_camera_once_and_take_over_from_a_killed_one(clip: Path, settings: Settings,
                                                                         worker: WorkerProcess,
                                                                         redis_client: redis.Redis,
                                                                         tmp_path: Path) -> None:
    keys = CameraKeys(settings.key_prefix)
    with ts_over_tcp(clip) as x, ts_over_tcp(clip) as y:
        sources = {"x": x, "y": y}
        path = write_cameras(tmp_path / "cameras.yaml", {"x": x.url, "y": y.url})
        watcher = Watcher(redis_client, settings, ["x", "y"])
        daemons = [Daemon(settings, path, tmp_path, "d1"), Daemon(settings, path, tmp_path, "d2")]
        try:
            for d in daemons:
                d.started()
            for job in ("x-1", "y-1"):
                wait_for(lambda job=job: streaming(redis_client, settings, job), 90, f"{job} streaming")
            owners = {name: redis_client.get(keys.lease(name)).decode() for name in ("x", "y")}
            pids = {d.proc.pid: d for d in daemons}
            holders = {name: pids[int(owner.split(":")[1])] for name, owner in owners.items()}
            for name, owner in owners.items():
                assert camera_state(redis_client, settings, name)["daemon"] == owner
            victim = holders["x"]
            survivor = next(d for d in daemons if d is not victim)
            moved = [name for name, d in holders.items() if d is victim]

            victim.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            victim.wait(30)
            for name in moved:  # ffmpeg's TCP listen mode serves one client, and exits when it goes
                sources[name].restart()
            for name in moved:
                wait_for(lambda name=name: (redis_client.get(keys.lease(name)) or b"::").split(b":")[1]
                         == str(survivor.proc.pid).encode(), 30, f"{name}'s lease taken over")
            took_s = time.monotonic() - killed_at
            for name in moved:
                wait_for(lambda name=name: streaming(redis_client, settings, f"{name}-2"), 90, f"{name}-2 streaming")
                assert state(redis_client, settings, f"{name}-1") == "failed"  # its producer died with the daemon
            print(f"leases taken over {took_s:.1f} s after the kill (lease {LEASE_S:g} s)")
            survivor.signal(signal.SIGTERM)
            assert survivor.wait(60) == 0, survivor.log()[-3000:]
        finally:
            for d in daemons:
                d.signal(signal.SIGKILL)
                d.wait(30)
        for name in ("x", "y"):
            job = f"{name}-{2 if name in moved else 1}"
            wait_for(lambda job=job: state(redis_client, settings, job) in TERMINAL_STATES, 60, f"{job} ended")
            assert state(redis_client, settings, job) == "completed", job
        assert not watcher.stop()
