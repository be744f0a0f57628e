"""What the camera fleet is doing now: each camera's state as its daemon knows it, published to Redis for
`python -m producer cameras` (another process, any host) and exported to Prometheus.

A daemon (producer/fleet.py) keeps a `CameraStatus` per camera it holds: the camera thread says what it
does (starting, streaming, restarting and why, stopping), and the publisher thread, once a second, reads
the camera's current job (its hash: frames done and skipped, latency p50/p95, the source's state and
outages as the producer and the worker write them; its frames stream: frames written) and writes

    <prefix>:camera:{name}   hash: camera, state, job, daemon, url (redacted), fps, latency_p50_s,
                             latency_p95_s, source_up, down_since, outages, reconnects, restarts, frames,
                             reason, updated_at; expires after ttl_s unless refreshed
    <prefix>:cameras         sorted set: every camera name a daemon's file has, scored by when it said so

Counts (outages, reconnects, restarts, frames) are this daemon's, since it took the camera. Processed fps
is the rate of frames the worker segmented (published minus skipped) over the last few seconds.
"""

from __future__ import annotations

import argparse
import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from producer.cameras import Camera, CameraKeys
from runtime.connection import quick_client
from runtime.metrics import MetricsServer, Probe
from runtime.settings import Settings

log = logging.getLogger(__name__)

PUBLISH_EVERY_S = 1.0
FPS_WINDOW_S = 5.0  # processed fps: frames segmented over about this long
INDEX_KEEP_S = 24 * 3600.0  # names nobody has published for this long leave the index
JOB_FIELDS = ("frames_done", "dropped", "latency_p50_s", "latency_p95_s", "source_state", "source_down_since",
              "source_outages")
RECORD_FIELDS = ("camera", "state", "job", "daemon", "url", "reason", "restarts", "outages", "reconnects", "frames",
                 "updated_at", "source_up", "down_since", "fps", "latency_p50_s", "latency_p95_s")
COLUMNS = ("CAMERA", "STATE", "JOB", "FPS", "P50", "P95", "OUTAGES", "RESTARTS", "DAEMON")


@dataclass
class CameraStatus:
    """One held camera's state: set by its thread (`starting`...`stopped`) and by the publisher (`observe`)."""

    name: str
    state: str = "starting"  # starting, streaming, restarting, stopping, stopped
    job: str = ""
    reason: str = ""  # why it is restarting, or what it waits for (redacted)
    restarts: int = 0
    fps: float | None = None
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    source_up: bool | None = None
    down_since: float | None = None
    outages: int = 0
    reconnects: int = 0
    frames: int = 0
    dropped_at_ingest: int = 0
    ingest_fps: float | None = None
    _done: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # job -> (outages, reconnects,
    # frames, dropped at ingest) as last seen
    _samples: collections.deque[tuple[float, int]] = field(default_factory=lambda: collections.deque(maxlen=64))
    _ingest: collections.deque[tuple[float, int]] = field(default_factory=lambda: collections.deque(maxlen=64))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def starting(self, job_id: str) -> None:
        self._set("starting", job_id, "opening the source")

    def enqueued(self, job_id: str) -> None:
        self._set("streaming", job_id, "")

    def restarting(self, reason: str) -> None:
        with self._lock:
            self.state, self.reason, self.source_up = "restarting", reason, False
            self.restarts += 1

    def waiting(self, job_id: str) -> None:
        self._set("restarting", self.job, f"waiting for job {job_id} to end")

    def stopping(self, why: str) -> None:
        self._set("stopping", self.job, why)

    def stopped(self) -> None:
        self._set("stopped", self.job, self.reason)

    def _set(self, state: str, job: str, reason: str) -> None:
        with self._lock:
            self.state, self.job, self.reason = state, job, reason
            if state in ("starting", "restarting"):
                self.source_up = False

    def observe(self, job_id: str, fields: dict[str, str], announced: int | None, now: float) -> None:
        """What the job's hash and frames stream say now (the publisher's read): the figures shown."""
        with self._lock:
            if job_id != self.job:
                return
            if job_id not in self._done:
                self._samples.clear()
                self._ingest.clear()
            per_job = self._done.get(job_id, (0, 0, 0, 0))
            outages = _int(fields.get("source_outages"))
            down = fields.get("source_state") == "down"
            reconnects = max(0, outages - (1 if down else 0))  # outages the source came back from
            frames = announced if announced is not None else per_job[2]
            dropped = max(_int(fields.get("dropped_at_ingest")), per_job[3])
            self.outages += outages - per_job[0]
            self.reconnects += reconnects - per_job[1]
            self.frames += max(0, frames - per_job[2])
            self.dropped_at_ingest += dropped - per_job[3]
            self._done = {job_id: (outages, reconnects, max(frames, per_job[2]), dropped)}
            self._ingest.append((now, max(frames, per_job[2]) + dropped))  # frames the source sent, kept or not
            while len(self._ingest) > 2 and now - self._ingest[1][0] >= FPS_WINDOW_S:
                self._ingest.popleft()
            (i0, m0), (i1, m1) = self._ingest[0], self._ingest[-1]
            self.ingest_fps = (m1 - m0) / (i1 - i0) if i1 - i0 >= 1.0 and self.state == "streaming" else None
            self.latency_p50_s = _float(fields.get("latency_p50_s"))
            self.latency_p95_s = _float(fields.get("latency_p95_s"))
            streaming = self.state == "streaming"
            self.source_up = streaming and not down
            self.down_since = _float(fields.get("source_down_since")) if down and streaming else None
            self._samples.append((now, _int(fields.get("frames_done")) - _int(fields.get("dropped"))))
            while len(self._samples) > 2 and now - self._samples[1][0] >= FPS_WINDOW_S:
                self._samples.popleft()
            (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
            self.fps = (n1 - n0) / (t1 - t0) if t1 - t0 >= 1.0 and streaming else None

    def record(self, owner: str, url: str) -> dict[str, str]:
        """The state hash's fields."""
        with self._lock:
            values: dict[str, object] = {
                "camera": self.name, "state": self.state, "job": self.job, "daemon": owner, "url": url,
                "reason": self.reason, "restarts": self.restarts, "outages": self.outages,
                "reconnects": self.reconnects, "frames": self.frames, "dropped_at_ingest": self.dropped_at_ingest,
                "ingest_fps": "" if self.ingest_fps is None else f"{self.ingest_fps:.2f}",
                "updated_at": f"{time.time():.3f}",
                "source_up": "" if self.source_up is None else int(self.source_up),
                "down_since": "" if self.down_since is None else f"{self.down_since:.3f}",
                "fps": "" if self.fps is None else f"{self.fps:.2f}",
                "latency_p50_s": _text(self.latency_p50_s), "latency_p95_s": _text(self.latency_p95_s)}
        return {k: str(v) for k, v in values.items()}


View = Callable[[], Sequence[tuple[Camera, "CameraStatus | None"]]]  # every camera of the file; its status if held


class StatusPublisher:
    """The thread that reads each held camera's job and publishes every camera's state (module doc)."""

    def __init__(self, client: redis.Redis, keys: CameraKeys, settings: Settings, owner: str, view: View,
                 ttl_s: float) -> None:
        self.client, self.keys, self.jobs, self.owner, self.view = client, keys, settings.keys, owner, view
        self.ttl_ms = int(ttl_s * 1000)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-status", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the thread, then publish once more (the final states: stopped)."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.publish_once()

    def _run(self) -> None:
        while not self._stop.wait(PUBLISH_EVERY_S):
            self.publish_once()

    def publish_once(self) -> None:
        try:
            self._publish(self.view())
        except redis.RedisError as e:
            log.warning("cannot publish the cameras' state (%s); trying again in %g s", e, PUBLISH_EVERY_S)

    def forget(self, name: str) -> None:
        """A camera gone from the file: its state and its place in the index go."""
        try:
            self.client.delete(self.keys.state(name))
            self.client.zrem(self.keys.index, name)
        except redis.RedisError as e:
            log.warning("cannot remove camera %s's state (%s)", name, e)

    def _publish(self, cameras: Sequence[tuple[Camera, CameraStatus | None]]) -> None:
        held = [(status, status.job) for _camera, status in cameras if status is not None and status.job]
        read = self.client.pipeline(transaction=False)
        for _status, job in held:
            read.hmget(self.jobs.job(job), list(JOB_FIELDS))
            read.xrevrange(self.jobs.frames(job), count=1)
        replies = read.execute() if held else []
        now = time.monotonic()
        for i, (observed, job) in enumerate(held):
            values, last = replies[2 * i], replies[2 * i + 1]
            fields = {k: v.decode() for k, v in zip(JOB_FIELDS, values) if v is not None}
            observed.observe(job, fields, _announced(last), now)
        write = self.client.pipeline(transaction=False)
        at = time.time()
        for camera, status in cameras:
            if status is None and camera.enabled:
                continue  # held by another daemon, or by none yet: its holder publishes it
            record = (status.record(self.owner, camera.shown) if status is not None else
                      {**dict.fromkeys(RECORD_FIELDS, ""), "camera": camera.name, "state": "disabled",
                       "url": camera.shown, "updated_at": f"{at:.3f}"})
            write.hset(self.keys.state(camera.name), mapping=cast(Any, record))
            write.pexpire(self.keys.state(camera.name), self.ttl_ms)
        if cameras:
            write.zadd(self.keys.index, {camera.name: at for camera, _ in cameras})
        write.zremrangebyscore(self.keys.index, "-inf", at - INDEX_KEEP_S)
        write.execute()


def _announced(last: list[tuple[bytes, dict[bytes, bytes]]]) -> int | None:
    """Frames written, from the frames stream's last entry: frame k is announced at (k+1)-0, notes after it
    at N-1, N-2, and the end marker at (N+1)-0."""
    if not last:
        return None
    entry_id, fields = last[0]
    ms = int(entry_id.split(b"-")[0])
    return ms - 1 if b"end" in fields else ms


class FleetCollector(Collector):
    """The held cameras' figures at each scrape, labelled by camera."""

    def __init__(self, view: View) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        statuses = [s for _c, s in self.view() if s is not None]
        held = GaugeMetricFamily("vseg_camera_held", "1 for each camera this daemon runs", labels=["camera"])
        up = GaugeMetricFamily("vseg_camera_source_up", "1 while the camera's source sends frames", labels=["camera"])
        fps = GaugeMetricFamily("vseg_camera_processed_fps", "Frames segmented per second (last few seconds)",
                                labels=["camera"])
        ingest = GaugeMetricFamily("vseg_camera_ingest_fps", "Frames received from the source per second, kept or "
                                   "dropped at ingest (last few seconds)", labels=["camera"])
        latency = GaugeMetricFamily("vseg_camera_latency_seconds", "Capture-to-result latency of the camera's job",
                                    labels=["camera", "quantile"])
        counters = {name: CounterMetricFamily(f"vseg_camera_{name}", text, labels=["camera"]) for name, text in (
            ("outages", "Times the camera's source went down"),
            ("reconnects", "Outages the source came back from (the producer reconnected)"),
            ("restarts", "New jobs submitted after one ended for any reason but a stop"),
            ("frames_written", "Frames written and announced by the camera's jobs"),
            ("frames_dropped_at_ingest", "Frames dropped at ingest (not encoded: live_buffer_frames, fps)"))}
        for s in statuses:
            held.add_metric([s.name], 1)
            up.add_metric([s.name], 1 if s.source_up else 0)
            if s.fps is not None:
                fps.add_metric([s.name], s.fps)
            if s.ingest_fps is not None:
                ingest.add_metric([s.name], s.ingest_fps)
            for quantile, value in (("0.5", s.latency_p50_s), ("0.95", s.latency_p95_s)):
                if value is not None:
                    latency.add_metric([s.name, quantile], value)
            for name, value in (("outages", s.outages), ("reconnects", s.reconnects), ("restarts", s.restarts),
                                ("frames_written", s.frames), ("frames_dropped_at_ingest", s.dropped_at_ingest)):
                counters[name].add_metric([s.name], value)
        yield from (held, up, fps, ingest, latency, *counters.values())


def serve_metrics(settings: Settings, view: View, health: Probe, ready: Probe) -> MetricsServer | None:
    """The per-camera series, /healthz and /readyz on settings.metrics_port (0: none)."""
    if not settings.metrics_port:
        return None
    registry = CollectorRegistry(auto_describe=True)
    registry.register(FleetCollector(view))
    return MetricsServer(registry, host=settings.metrics_host, port=settings.metrics_port, health=health,
                         ready=ready).start()


def read_cameras(client: redis.Redis, keys: CameraKeys, *, fresh_s: float = 60.0) -> list[dict[str, str]]:
    """Every camera some daemon has published within `fresh_s`, by name, with its state hash's fields (none
    when no daemon holds it)."""
    names = sorted(n.decode() for n in cast(list[bytes], client.zrangebyscore(keys.index, time.time() - fresh_s,
                                                                                "+inf")))
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.state(name))
    states = cast(list[dict[bytes, bytes]], pipe.execute()) if names else []
    return [{**{k.decode(): v.decode() for k, v in raw.items()}, "camera": name} for name, raw in zip(names, states)]


def describe_state(row: dict[str, str]) -> str:
    """The STATE column: streaming, source down since T, restarting, disabled, ... (unassigned: no daemon holds it)."""
    state = row.get("state", "")
    if not state:
        return "unassigned"
    if state == "streaming" and row.get("down_since"):
        at = float(row["down_since"])
        fmt = "%H:%M:%S" if time.time() - at < 12 * 3600 else "%Y-%m-%d %H:%M:%S"
        return f"source down since {time.strftime(fmt, time.localtime(at))}"
    return state


def format_table(rows: Sequence[dict[str, str]]) -> str:
    """The `cameras` table: one line a camera, `-` where a figure is not known."""
    lines = [COLUMNS]
    for row in rows:
        lines.append((row["camera"], describe_state(row), row.get("job") or "-", _dash(row.get("fps"), "{:.1f}"),
                      _dash(row.get("latency_p50_s"), "{:.2f}s"), _dash(row.get("latency_p95_s"), "{:.2f}s"),
                      row.get("outages") or "-", row.get("restarts") or "-", row.get("daemon") or "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def add_cameras_parser(subparsers: Any) -> None:
    """`cameras`: the fleet's table (what `producer serve` daemons publish)."""
    subparsers.add_parser("cameras", help="show every camera of the `serve` daemons: state, current job, processed "
                                          "fps, latency p50/p95, outages, restarts")


def run_cameras(args: argparse.Namespace, settings: Settings) -> int:
    client = quick_client(settings)
    try:
        rows = read_cameras(client, CameraKeys(settings.key_prefix))
    finally:
        client.close()
    if not rows:
        print("no cameras: no `python -m producer serve` daemon has published any to this Redis")
        return 0
    print(format_table(rows))
    return 0


def _int(text: str | None) -> int:
    try:
        return int(float(text)) if text else 0
    except ValueError:
        return 0


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _text(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _dash(text: str | None, fmt: str) -> str:
    value = _float(text)
    return "-" if value is None else fmt.format(value)
