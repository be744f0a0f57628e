"""The worker loop: read jobs from the consumer group, segment, publish, render, acknowledge.

A job's entry is acknowledged (and deleted from vseg:jobs, which holds only jobs in flight) only
after its terminal entry is on its result stream. A message that does not decode is poison: it goes
to vseg:dead with the reason and the worker keeps going. A job that fails (missing frames, model
error) gets a `failed` entry and event; the worker keeps going.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import cv2
import msgpack
import redis

from schemas import messages
from schemas.errors import SchemaError, StorageError, VsegError
from schemas.names import validate_job_id
from schemas.prompts import object_ids, validate_prompts
from schemas.settings import Settings
from schemas.storage import check_frame_dir, frame_name, job_render_rel, resolve_inside
from worker.publish import ResultPublisher, frame_result
from worker.render import MaskVideoWriter
from worker.segment import Segmenter

log = logging.getLogger(__name__)

HEALTH_TTL_S = 30


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


class Worker:
    def __init__(
        self,
        *,
        settings: Settings,
        segmenter: Segmenter,
        client: redis.Redis,
        name: str | None = None,
    ) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.segmenter = segmenter
        self.client = client
        self.name = name or default_worker_name()
        self.jobs_done = 0
        self._health_at = 0.0

    # ---- group and health -------------------------------------------------------------------
    def ensure_group(self) -> None:
        """Create the consumer group (from the stream's start, so jobs queued before any worker count)."""
        try:
            self.client.xgroup_create(self.keys.jobs, self.keys.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.keys.group, self.keys.jobs)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def heartbeat(self, **status: Any) -> None:
        """Refresh this worker's health key (at most once a second)."""
        now = time.monotonic()
        if now - self._health_at < 1.0 and not status:
            return
        self._health_at = now
        value = json.dumps({"worker": self.name, "at": time.time(), "jobs_done": self.jobs_done, **status})
        self.client.set(self.keys.worker_health(self.name), value, ex=HEALTH_TTL_S)

    # ---- main loop ----------------------------------------------------------------------------
    def run(self, *, burst: bool = False) -> int:
        """Process jobs until stopped (or, with burst, until the queue is empty). Returns jobs handled."""
        self.ensure_group()
        log.info("worker %s ready (model %s%s)", self.name, self.segmenter.name,
                 ", RANDOM WEIGHTS" if self.segmenter.random_weights else "")
        backoff_s = 0.1
        while True:
            try:
                self.heartbeat(state="idle")
                reply = self.client.xreadgroup(
                    self.keys.group, self.name, {self.keys.jobs: ">"}, count=1,
                    block=None if burst else self.settings.block_ms,
                )
                backoff_s = 0.1
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("Redis unavailable (%s); retrying in %.1f s", e, backoff_s)
                time.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):  # the stream or group was deleted under us: recreate and go on
                    log.warning("consumer group missing (%s); recreating it", e)
                    self.ensure_group()
                    continue
                raise
            if not reply:
                if burst:
                    log.info("queue empty: burst mode exits after %d jobs", self.jobs_done)
                    return self.jobs_done
                continue
            for entry_id, fields in reply[0][1]:
                self.handle(entry_id.decode() if isinstance(entry_id, bytes) else entry_id, fields)

    def handle(self, entry_id: str, fields: dict[Any, Any]) -> None:
        """Process one entry of the jobs stream, whatever it holds."""
        try:
            msg = messages.decode(fields)
            if not isinstance(msg, messages.JobMessage):
                raise SchemaError(f"expected a job entry on {self.keys.jobs}, got a {msg.TYPE.value} entry")
        except SchemaError as e:
            self.dead_letter(entry_id, fields, e)
            return
        self.run_job(msg)
        self.finish_entry(entry_id)
        self.jobs_done += 1

    def finish_entry(self, entry_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.keys.jobs, self.keys.group, entry_id)
        pipe.xdel(self.keys.jobs, entry_id)
        pipe.execute()

    def dead_letter(self, entry_id: str, fields: dict[Any, Any], error: Exception) -> None:
        """Move a poison message to vseg:dead with the reason; fail its job if it names one."""
        log.error("dead-lettering entry %s of %s: %s", entry_id, self.keys.jobs, error)
        dead: dict[Any, Any] = dict(fields)
        dead.update({"error": str(error), "error_type": type(error).__name__, "source_stream": self.keys.jobs,
                     "source_id": entry_id, "worker": self.name, "at": str(time.time())})
        self.client.xadd(self.keys.dead, dead)
        job_id = _job_id_of(fields)
        if job_id is not None:
            ResultPublisher(self.client, self.keys, job_id, _num_frames_of(fields)).terminal(
                messages.Failed(job_id, str(error), type(error).__name__), ttl_s=self.settings.results_ttl_s
            )
            self.client.hset(self.keys.job(job_id), mapping={"state": "dead", "error": str(error)})
        self.finish_entry(entry_id)

    # ---- one job ------------------------------------------------------------------------------
    def run_job(self, job: messages.JobMessage) -> None:
        """Segment, publish and render one job; always ends with exactly one terminal entry."""
        pub = ResultPublisher(self.client, self.keys, job.job_id, job.num_frames)
        t0 = time.monotonic()
        log.info("job %s: %d frames %dx%d, %d prompts", job.job_id, job.num_frames, job.width, job.height,
                 len(job.prompts))
        writer: MaskVideoWriter | None = None
        try:
            frames_dir = resolve_inside(self.settings.storage_root, job.frames_dir)
            check_frame_dir(frames_dir, job.num_frames)
            validate_prompts(job.prompts, width=job.width, height=job.height, num_frames=job.num_frames)
            pub.started(messages.Started(
                job_id=job.job_id, worker=self.name, num_frames=job.num_frames, obj_ids=tuple(object_ids(job.prompts)),
                model=self.segmenter.name, random_weights=self.segmenter.random_weights,
            ))
            render_rel = job_render_rel(job.job_id)
            writer = MaskVideoWriter(resolve_inside(self.settings.storage_root, render_rel),
                                     fps=job.fps, width=job.width, height=job.height)
            timings = self._propagate(job, frames_dir, pub, writer, t0)
            t_render = time.monotonic()
            writer.close()
            writer = None
            timings["render_close_s"] = time.monotonic() - t_render
            timings["total_s"] = time.monotonic() - t0
            pub.terminal(messages.Completed(
                job_id=job.job_id, render_path=render_rel, num_frames=job.num_frames,
                num_objects=len(object_ids(job.prompts)), timings_s={k: round(v, 4) for k, v in timings.items()},
                random_weights=self.segmenter.random_weights,
            ), ttl_s=self.settings.results_ttl_s)
            log.info("job %s completed in %.1f s (%.2f frames/s)", job.job_id, timings["total_s"],
                     job.num_frames / max(timings["total_s"], 1e-9))
        except Exception as e:  # any failure of this job fails the job, never the worker
            if writer is not None:
                writer.abort()
            level = logging.WARNING if isinstance(e, VsegError) else logging.ERROR
            log.log(level, "job %s failed: %s: %s", job.job_id, type(e).__name__, e, exc_info=level == logging.ERROR)
            pub.terminal(messages.Failed(job.job_id, str(e), type(e).__name__), ttl_s=self.settings.results_ttl_s)

    def _propagate(
        self, job: messages.JobMessage, frames_dir: Path, pub: ResultPublisher, writer: MaskVideoWriter, t0: float
    ) -> dict[str, float]:
        timings = {"first_result_s": 0.0, "segment_s": 0.0, "publish_s": 0.0, "render_s": 0.0}
        expected = 0
        t_seg = time.monotonic()
        for out in self.segmenter.segment(frames_dir, job.num_frames, job.prompts):
            t1 = time.monotonic()
            timings["segment_s"] += t1 - t_seg
            if out.frame_idx != expected:
                raise VsegError(f"segmenter yielded frame {out.frame_idx}, expected {expected}")
            pub.frame(frame_result(job.job_id, out, random_weights=self.segmenter.random_weights))
            if expected == 0:
                timings["first_result_s"] = time.monotonic() - t0
            t2 = time.monotonic()
            image = cv2.imread(str(frames_dir / frame_name(out.frame_idx)), cv2.IMREAD_COLOR)
            if image is None:
                raise StorageError(f"cannot read frame {frames_dir / frame_name(out.frame_idx)} for rendering")
            writer.write(image, out.obj_ids, out.masks)
            t3 = time.monotonic()
            timings["publish_s"] += t2 - t1
            timings["render_s"] += t3 - t2
            expected += 1
            if expected % self.settings.progress_every == 0 or expected == job.num_frames:
                pub.progress(expected, expected / max(t3 - t0, 1e-9))
            self.heartbeat(state="busy", job_id=job.job_id, frames_done=expected)
            t_seg = time.monotonic()
        if expected != job.num_frames:
            raise VsegError(f"segmenter stopped after {expected} of {job.num_frames} frames")
        return timings


def _raw_data(fields: dict[Any, Any]) -> dict[Any, Any] | None:
    raw = fields.get(b"data", fields.get("data"))
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=False) if isinstance(raw, bytes) else None
    except Exception:
        return None
    return data if isinstance(data, dict) else None


def _job_id_of(fields: dict[Any, Any]) -> str | None:
    data = _raw_data(fields)
    try:
        return validate_job_id(data["job_id"]) if data else None
    except (KeyError, VsegError):
        return None


def _num_frames_of(fields: dict[Any, Any]) -> int:
    data = _raw_data(fields) or {}
    n = data.get("num_frames")
    return n if isinstance(n, int) and n > 0 else 0
