"""The worker's Prometheus metrics (names and labels are contract: the README's "Metrics" table).

Counters that the worker already keeps for its logs (WorkerStats: outcomes, reclaims, leases lost,
Redis errors) are read at scrape time by a collector, so no code path counts twice. What only the job's
runner sees (frames, their times, first results, sessions and objects in flight) it records here as it
happens. The model's figures appear here even when the model runs in a process of its own: frames are
counted as the worker receives them, and the model process reports its GPU memory with every frame.

Served by runtime/metrics.py on `metrics_port` with /healthz (the worker's heartbeat thread runs) and
/readyz (the model is loaded, Redis answers, and the worker is not shutting down).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.service.health import WorkerStats

JOB_OUTCOMES = ("completed", "failed", "cancelled", "dead", "handed_back")
# seconds: a CPU frame of a large model takes tens of seconds, a CUDA frame of tiny a few milliseconds
FRAME_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
FIRST_RESULT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class _StatsCollector(Collector):
    """The WorkerStats counters, as they are at scrape time."""

    def __init__(self, stats: WorkerStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        jobs = CounterMetricFamily("vseg_jobs", "Jobs this worker ended, by outcome (handed_back: given back to "
                                   "the group at shutdown, not ended)", labels=["outcome"])
        for outcome in JOB_OUTCOMES:
            value = s.handed_back if outcome == "handed_back" else s.outcomes.get(outcome, 0)
            jobs.add_metric([outcome], value)
        yield jobs
        yield CounterMetricFamily("vseg_reclaims", "Job entries taken over from a worker whose lease expired",
                                  value=s.reclaimed)
        yield CounterMetricFamily("vseg_leases_lost", "Jobs stopped because their lease was lost or abandoned",
                                  value=s.leases_lost)
        yield CounterMetricFamily("vseg_redis_errors", "Redis calls that failed (down, hung, full), in the loop "
                                  "or under a job", value=s.redis_faults + s.redis_errors)


class WorkerMetrics:
    """One worker's metrics in their own registry (several workers in one test process do not mix)."""

    def __init__(self, stats: WorkerStats, *, model: str, image_size: int, device: str, random_weights: bool,
                 gpu_memory: Callable[[], int | None] | None = None, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(_StatsCollector(stats))
        self.frames = Counter("vseg_frames", "Frames whose results were published (skipped: live frames dropped "
                              "to keep up)", ["skipped"], registry=r)
        for skipped in ("false", "true"):
            self.frames.labels(skipped=skipped)
        self.frame_seconds = Histogram("vseg_frame_seconds", "Model time per frame, as the job's thread waited for it",
                                       buckets=FRAME_BUCKETS, registry=r)
        self.first_result_seconds = Histogram("vseg_first_result_seconds", "From a job's start on this worker to "
                                              "its first published result", buckets=FIRST_RESULT_BUCKETS, registry=r)
        self.latency_seconds = Histogram("vseg_latency_seconds", "From a frame's announcement by the producer "
                                         "(streamed and live jobs) to its published result", buckets=LATENCY_BUCKETS,
                                         registry=r)
        self.sessions_active = Gauge("vseg_sessions_active", "Model sessions open (jobs being segmented)", registry=r)
        self.objects_active = Gauge("vseg_objects_active", "Objects tracked by the open sessions", registry=r)
        if gpu_memory is not None:
            self.gpu_memory = Gauge("vseg_gpu_memory_bytes", "GPU memory the model's process holds (PyTorch's "
                                    "reserved bytes)", registry=r)
            self.gpu_memory.set_function(lambda: float(gpu_memory() or 0))
        Info("vseg_model", "The model this worker runs", registry=r).info(
            {"model": model, "image_size": str(image_size), "device": device,
             "random_weights": str(random_weights).lower()})
        self._lock = threading.Lock()

    def job(self, first_frame: int = 0) -> JobMetrics:
        return JobMetrics(self, first_frame)


class JobMetrics:
    """One job's contributions to the worker's metrics: its session and objects while it runs, its
    frames as they are published. `close` takes its gauges back whatever ended it."""

    def __init__(self, metrics: WorkerMetrics, first_frame: int = 0) -> None:
        self.m = metrics
        self.started_at = time.monotonic()
        self._session = False
        self._objects = 0
        self._published = first_frame  # a resumed job's earlier frames were an earlier attempt's
        self._first = False

    def session_opened(self) -> None:
        if not self._session:
            self._session = True
            self.m.sessions_active.inc()

    def frame_segmented(self, seconds: float, num_objects: int) -> None:
        self.m.frame_seconds.observe(seconds)
        if num_objects != self._objects:
            self.m.objects_active.inc(num_objects - self._objects)
            self._objects = num_objects

    def published(self, frames_done: int, announced_at: Callable[[int], float | None], *, skipped: int = 0,
                  latencies: Sequence[float] = ()) -> None:
        """`frames_done` frames are out now, `skipped` of the new ones passed over (a live job keeping up);
        `latencies`: a live job's, capture to publication, of the new processed ones; otherwise they are
        measured from `announced_at(k)`, frame k's wall-clock announcement time (None where the frame was
        never announced: a finished frame directory)."""
        new = frames_done - self._published
        if new <= 0:
            return
        newly = range(self._published, frames_done)
        self._published = frames_done
        self.m.frames.labels(skipped="false").inc(new - skipped)
        if skipped:
            self.m.frames.labels(skipped="true").inc(skipped)
        if not self._first:
            self._first = True
            self.m.first_result_seconds.observe(time.monotonic() - self.started_at)
        if latencies:
            for seconds in latencies:
                self.m.latency_seconds.observe(seconds)
            return
        now = time.time()
        for k in newly:
            if (at := announced_at(k)) is not None:
                self.m.latency_seconds.observe(max(0.0, now - at))

    def close(self) -> None:
        if self._objects:
            self.m.objects_active.dec(self._objects)
            self._objects = 0
        if self._session:
            self._session = False
            self.m.sessions_active.dec()
