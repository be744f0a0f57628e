"""Following a job's result stream: a Python iterator for backends, and `watch` that writes masks.json."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis
from tqdm import tqdm

from runtime.connection import connect
from runtime.faults import redact_url
from runtime.settings import Settings
from schemas import messages
from schemas.errors import JobFailed, SchemaError, UnknownJobError, VsegError
from schemas.names import validate_job_id
from schemas.rle import rle_to_json

log = logging.getLogger(__name__)

TERMINAL = messages.TERMINAL_TYPES


def require_job(job_id: str, *, settings: Settings, client: redis.Redis) -> None:
    """Raise JobIdError for a malformed id, UnknownJobError if Redis has neither the job's state nor its
    results; redis-py's errors if Redis cannot be reached (raised, not waited out)."""
    validate_job_id(job_id)
    keys = settings.keys
    if not client.exists(keys.job(job_id)) and not client.exists(keys.results(job_id)):
        raise UnknownJobError(f"no job {job_id!r} in Redis at {redact_url(settings.redis_url)} "
                              f"(wrong REDIS_URL or expired?)")


def follow(
    job_id: str,
    *,
    settings: Settings,
    client: redis.Redis | None = None,
    timeout_s: float | None = None,
) -> Iterator[messages.Message]:
    """Yield the job's result entries from the start (Started, FrameResult..., then the terminal entry:
    Completed, Failed, Cancelled or Dead), with an ObjectChange before the frame it takes effect on for
    each object a prompt or removal on the running job added, corrected, removed or refused, and a
    FrameUpdate for each frame already published that such a prompt changed.

    Blocks while the job runs; reconnects with backoff if Redis drops; stops after the terminal entry.
    Raises UnknownJobError if the job does not exist, redis-py's ConnectionError/TimeoutError if Redis
    cannot be reached at the start (later outages are waited out), TimeoutError after `timeout_s`
    without a new entry.
    """
    client = client or connect(settings)
    require_job(job_id, settings=settings, client=client)
    stream = settings.keys.results(job_id)
    last_id: bytes | str = "0-0"
    last_seen = time.monotonic()
    backoff_s = 0.1
    while True:
        try:
            reply = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]],
                         client.xread({stream: last_id}, count=256, block=settings.block_ms))
            backoff_s = 0.1
        except (redis.ConnectionError, redis.TimeoutError) as e:
            log.warning("Redis unavailable while following %s (%s); retrying in %.1f s", job_id, e, backoff_s)
            time.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)
            continue
        if not reply:
            if timeout_s is not None and time.monotonic() - last_seen > timeout_s:
                raise TimeoutError(f"no result for job {job_id} in {timeout_s:.0f} s")
            continue
        last_seen = time.monotonic()
        for entry_id, fields in reply[0][1]:
            last_id = entry_id
            try:
                msg = messages.decode(fields)
            except SchemaError as e:
                log.error("skipping undecodable entry %s on %s: %s", entry_id, stream, e)
                continue
            yield msg
            if isinstance(msg, TERMINAL):
                return


@dataclass(frozen=True)
class WatchResult:
    job_id: str
    masks_json: Path
    render_path: Path | None  # None when the job was submitted without a render
    num_frames: int
    random_weights: bool


def _object_json(obj: messages.ObjectResult) -> dict[str, Any]:
    out = {"obj_id": obj.obj_id, "mask": rle_to_json(obj.mask), "bbox_xyxy": obj.bbox_xyxy, "area": obj.area,
           "score": obj.score}
    if obj.label:
        out.update(label=obj.label, label_score=obj.label_score)
    return out


def _merge(frame: dict[str, Any], update: messages.FrameUpdate) -> None:
    """An `update` entry's objects replace (or join) those of the frame it names."""
    objects = {o["obj_id"]: o for o in frame["objects"]}
    objects.update({o.obj_id: _object_json(o) for o in update.objects})
    frame["objects"] = [objects[k] for k in sorted(objects)]


def watch(
    job_id: str,
    out_dir: Path,
    *,
    settings: Settings,
    client: redis.Redis | None = None,
    progress: bool = True,
    timeout_s: float | None = None,
) -> WatchResult:
    """Follow the job to its end, write out_dir/masks.json, return where the render is. `update` entries
    (a prompt on frames already published, propagated backwards) are merged into the frames they name.

    Raises JobFailed with the worker's error if the job failed, UnknownJobError (before `out_dir` is
    created) if there is no such job.
    """
    client = client or connect(settings)
    require_job(job_id, settings=settings, client=client)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames: list[dict[str, Any]] = []
    by_index: dict[int, dict[str, Any]] = {}
    changes: list[dict[str, Any]] = []
    started: messages.Started | None = None
    bar: tqdm[Any] | None = None
    try:
        for msg in follow(job_id, settings=settings, client=client, timeout_s=timeout_s):
            if isinstance(msg, messages.Started):
                started = msg
                if msg.random_weights:
                    log.warning("job %s runs with RANDOM WEIGHTS: its masks are meaningless", job_id)
                if progress and bar is None:
                    bar = tqdm(total=msg.num_frames, desc=f"job {job_id}", unit="frame", dynamic_ncols=True)
            elif isinstance(msg, messages.FrameResult):
                frame = {"frame_idx": msg.frame_idx, "objects": [_object_json(o) for o in msg.objects]}
                if msg.skipped:
                    frame["skipped"] = True
                frames.append(frame)
                by_index[msg.frame_idx] = frame
                if bar is not None:
                    bar.update(1)
            elif isinstance(msg, messages.FrameUpdate) and msg.frame_idx in by_index:
                _merge(by_index[msg.frame_idx], msg)
            elif isinstance(msg, messages.ObjectChange):
                changes.append({"obj_id": msg.obj_id, "frame_idx": msg.frame_idx, "change": msg.change,
                                "note": msg.note})
            elif isinstance(msg, messages.Failed):
                raise JobFailed(job_id, msg.error, msg.error_type)
            elif isinstance(msg, messages.Dead):
                raise JobFailed(job_id, f"dead-lettered after {msg.attempts} attempts: {msg.error}", "Dead")
            elif isinstance(msg, messages.Cancelled):
                raise JobFailed(job_id, f"cancelled after {msg.frames_done} frames", "Cancelled")
            elif isinstance(msg, messages.Completed):
                return _finish(job_id, out_dir, frames, changes, started, msg, settings)
    finally:
        if bar is not None:
            bar.close()
    raise VsegError(f"result stream of job {job_id} ended without a terminal entry")


def _finish(
    job_id: str,
    out_dir: Path,
    frames: list[dict[str, Any]],
    changes: list[dict[str, Any]],
    started: messages.Started | None,
    done: messages.Completed,
    settings: Settings,
) -> WatchResult:
    frames.sort(key=lambda f: f["frame_idx"])
    doc = {
        "job_id": job_id,
        "num_frames": done.num_frames,
        "obj_ids": list(started.obj_ids) if started else [],
        "random_weights": done.random_weights,
        "render_path": done.render_path,
        "timings_s": done.timings_s,
        "frames": frames,
        "changes": changes,  # objects added, corrected, removed or refused on the running job, in stream order
    }
    path = out_dir / "masks.json"
    tmp = out_dir / ".masks.json.partial"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    render = (settings.storage_root / done.render_path).resolve() if done.render_path else None
    return WatchResult(job_id, path, render, done.num_frames, done.random_weights)
