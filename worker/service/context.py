"""What the parts of one worker share (its loop, the handling of an entry, a job's runner): settings,
client, registered scripts, model, name, counters, health key and shutdown state; and the one step that
ends every job, whatever ended it. Nothing about a single job lives here: that is the job's own
(worker/service/entry.py, worker/service/runner.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from runtime.cleanup import producer_finished, remove_frames
from runtime.settings import Settings
from schemas import messages
from schemas.errors import VsegError
from schemas.names import JobState, Keys
from worker.broker.lease import Lease
from worker.broker.publish import ResultPublisher, no_interrupt
from worker.broker.scripts import Scripts
from worker.model.segment import Segmenter
from worker.service.health import Health, WorkerStats
from worker.service.metrics import WorkerMetrics
from worker.service.shutdown import Shutdown

log = logging.getLogger(__name__)


@dataclass
class SlotState:
    """One job slot's (worker/service/slots.py): whether its job has opened its session yet (until then its
    memory is not in the device's free figure, so admission counts it apart: worker/service/capacity.py)."""

    session_open: bool = False


@dataclass
class WorkerContext:
    settings: Settings
    client: redis.Redis
    scripts: Scripts
    segmenter: Segmenter
    name: str
    stats: WorkerStats
    health: Health
    shutdown: Shutdown
    on_fatal: Callable[[str], None]  # the job's thread is wedged: leave now (called from a helper thread)
    metrics: WorkerMetrics
    slot: SlotState = field(default_factory=SlotState)  # the slot this context runs jobs in
    lane: str = ""  # the jobs stream this worker reads: its model's (worker/model/models.py)

    @property
    def keys(self) -> Keys:
        return self.settings.keys.for_lane(self.lane)

    def lease(self, entry_id: str, job_id: str, on_stall: Callable[[str], None] | None = None) -> Lease:
        """A lease on `entry_id` for this worker (not yet renewing: use it as a context manager)."""
        return Lease(self.client, self.keys, entry_id, self.name, self.settings.lease_s, stall_s=self.settings.stall_s,
                     job=job_id, on_stall=on_stall, scripts=self.scripts)

    def publisher(self, job_id: str, num_frames: int, lease: Lease, *, interruptible: bool = True) -> ResultPublisher:
        """A publisher under `lease`; `interruptible`: a write waiting out Redis still stops for a shutdown
        (a job's writes; not a dead letter's, which is written whole or not at all)."""
        return ResultPublisher(self.client, self.keys, job_id, num_frames, lease, redis_url=self.settings.redis_url,
                               interrupt=self.shutdown.check if interruptible else no_interrupt)

    def fail(self, pub: ResultPublisher, job_id: str, error: Exception) -> None:
        """End the job `failed` with `error` (a permanent error, or one we did not expect: logged in full)."""
        level = logging.WARNING if isinstance(error, VsegError) else logging.ERROR
        log.log(level, "job %s failed: %s: %s", job_id, type(error).__name__, error, exc_info=level == logging.ERROR)
        self.finish(pub, messages.Failed(job_id, str(error), type(error).__name__), JobState.FAILED,
                    error=f"{type(error).__name__}: {error}")

    def cancelled(self, pub: ResultPublisher, job_id: str) -> None:
        """End the job `cancelled`, with the frames it had published."""
        log.warning("job %s cancelled", job_id)
        frames_done = int(self.client.hget(self.keys.job(job_id), "frames_done") or 0)
        self.finish(pub, messages.Cancelled(job_id, frames_done), JobState.CANCELLED)

    def finish(self, pub: ResultPublisher, msg: messages.Terminal, outcome: JobState, error: str = "") -> None:
        """The job's terminal step (worker/broker/publish.py), counted; then its frames may go."""
        pub.terminal(msg, ttl_s=self.settings.results_ttl_s, error=error)
        self.stats.jobs_done += 1
        self.stats.outcomes[outcome.value] = self.stats.outcomes.get(outcome.value, 0) + 1
        self._release_frames(msg.job_id)

    def _release_frames(self, job_id: str) -> None:
        """After the job's terminal state: its frames stream expires with its results, and its frames go if
        the producer has finished too; otherwise the producer removes them when it does (runtime/cleanup.py)."""
        try:
            self.client.expire(self.keys.frames(job_id), self.settings.results_ttl_s)
            self.client.expire(self.keys.control(job_id), self.settings.results_ttl_s)
            if producer_finished(self.client, self.settings, job_id):
                remove_frames(self.settings, job_id)
        except (redis.RedisError, VsegError, OSError) as e:  # disk space, not correctness: log and go on
            log.warning("could not remove the frames of job %s (%s)", job_id, e)
