"""One camera's standing live job (`CameraRunner`, run by the fleet daemon, producer/fleet.py): a job
`<camera>-<n>` at a time through `submit_live`; one that ends for any reason but a stop is logged and
replaced with backoff (1 s doubling to 60 s; 1 s again after a job that ran STABLE_S). Job n+1 starts only
once job n has ended (one still running a while after its ingest ended is cancelled, and waited for): a
camera never runs twice."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import cast

import redis

from producer.cameras import Camera, CameraKeys
from producer.control import request_cancel
from producer.fleet_status import CameraStatus
from producer.live_submit import submit_live
from producer.submission import job_exists
from runtime.settings import Settings
from schemas.errors import VsegError
from schemas.names import TERMINAL_STATES, JobState

log = logging.getLogger(__name__)

BACKOFF_MIN_S, BACKOFF_MAX_S = 1.0, 60.0
STABLE_S = 30.0  # a job that ran this long resets the backoff
SETTLE_POLL_S = 0.2


class CameraRunner:
    """One camera's standing live job, on its own thread, until `request_stop` (see the module doc)."""

    def __init__(self, camera: Camera, settings: Settings, client: redis.Redis, status: CameraStatus,
                 after: Sequence[CameraRunner] = ()) -> None:
        self.camera, self.settings, self.client, self.status, self.after = camera, settings, client, status, after
        self.keys = CameraKeys(settings.key_prefix)
        self.stop = threading.Event()
        self.settle_s = max(2 * settings.producer_ttl_s, 10.0)
        self.thread = threading.Thread(target=self._run, name=f"camera-{camera.name}", daemon=True)
        self.job_id: str | None = None  # the job running now (enqueued)

    def start(self) -> CameraRunner:
        self.thread.start()
        return self

    def request_stop(self, why: str) -> None:
        if not self.stop.is_set():
            log.info("camera %s: stopping (%s)", self.camera.name, why)
            self.status.stopping(why)
            self.stop.set()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def _run(self) -> None:
        for previous in self.after:  # the runner this one replaces (a changed camera) ends first
            while previous.alive() and not self.stop.is_set():
                previous.thread.join(SETTLE_POLL_S)
        backoff = BACKOFF_MIN_S
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                ended = self._one_job()
            except (redis.RedisError, VsegError) as e:
                ended = f"{type(e).__name__}: {self.camera.scrub(str(e))}"
            except Exception as e:  # noqa: BLE001 - the camera's thread outlives any one failure
                log.exception("camera %s: unexpected failure", self.camera.name)
                ended = f"{type(e).__name__}: {self.camera.scrub(str(e))}"
            if ended is None or self.stop.is_set():
                break
            if time.monotonic() - started >= STABLE_S:
                backoff = BACKOFF_MIN_S
            self.status.restarting(ended)
            log.warning("camera %s: %s; a new job in %g s", self.camera.name, ended, backoff)
            if self.stop.wait(backoff):
                break
            backoff = min(2 * backoff, BACKOFF_MAX_S)
        self.status.stopped()
        log.info("camera %s: stopped", self.camera.name)

    def _one_job(self) -> str | None:
        """Run one job to its end: why it ended, or None when stopped."""
        camera = self.camera
        job_id = self._next_job_id()
        if job_id is None:
            return None
        self.status.starting(job_id)
        log.info("camera %s: job %s from %s", camera.name, job_id, camera.shown)
        try:
            done = submit_live(camera.source, camera.prompts, settings=camera.settings_for(self.settings),
                               client=self.client, job_id=job_id, stop=self.stop, auto=camera.auto,
                               labels=camera.labels, text=camera.text, on_enqueued=self._enqueued, max_fps=camera.fps,
                               zones=camera.zones, camera=camera.name,
                               stop_reason=lambda: f"camera {camera.name}: {self.status.reason or 'stopped'}")
            ended = ("its ingest ended (the source ended for good, or the job was stopped from outside)"
                     if done.created else "a job with its id existed already (another daemon's)")
        except (VsegError, redis.RedisError, OSError) as e:
            ended = camera.scrub(" ".join(str(e).split())) or type(e).__name__
        if self.stop.is_set():
            return None
        state = self._settle(job_id)
        return None if state is None else f"job {job_id} {state}: {ended}"

    def _enqueued(self, job_id: str) -> None:
        self.job_id = job_id
        self.status.enqueued(job_id)

    def update_zones(self, camera: Camera) -> None:
        """The file's zones changed (only they): the next jobs get them, and the running one now."""
        self.camera = camera
        if self.job_id is not None:
            self.client.hset(self.settings.keys.job(self.job_id), "zones", camera.zones.to_json())
            log.info("camera %s: job %s's zones and lines replaced (%d zone(s), %d line(s))", camera.name,
                     self.job_id, len(camera.zones.zones), len(camera.zones.lines))

    def _next_job_id(self) -> str | None:
        """`<name>-<n>`: the counter's number again if that job was never enqueued, else the next one once
        the last job has ended. None if stopped meanwhile."""
        name, seq = self.camera.name, self.keys.seq(self.camera.name)
        current = cast(bytes | None, self.client.get(seq))
        if current is not None:
            previous = f"{name}-{int(current)}"
            if not job_exists(self.client, self.settings.keys, previous):
                return previous
            if self._settle(previous) is None:
                return None
        return f"{name}-{int(cast(int, self.client.incr(seq)))}"

    def _settle(self, job_id: str) -> str | None:
        """Wait for `job_id` to end (cancelled if it has not SETTLE_S from now); how it ended, or None if stopped."""
        cancel_at: float | None = time.monotonic() + self.settle_s
        while True:
            state, error = (v.decode() if v is not None else None for v in cast(
                list[bytes | None], self.client.hmget(self.settings.keys.job(job_id), ["state", "error"])))
            if state is None:
                return "was never enqueued (or has expired)"
            if state in TERMINAL_STATES:
                why = f" ({self.camera.scrub(error)})" if error and state != JobState.COMPLETED else ""
                return f"ended {state}{why}"
            if self.stop.is_set():
                return None
            self.status.waiting(job_id)
            if cancel_at is not None and time.monotonic() >= cancel_at:
                log.warning("camera %s: job %s is still %s %g s after its ingest ended: cancelling it",
                            self.camera.name, job_id, state, self.settle_s)
                request_cancel(job_id, settings=self.settings, client=self.client)
                cancel_at = None
            self.stop.wait(SETTLE_POLL_S)
