"""Following a job's result stream: `follow`, a Python iterator of typed messages for backends, and what
`watch` (producer/watching.py) builds on: a frame, an object change, an update as JSON, a file written
atomically, a terminal entry as the error it means."""

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

from producer.client_items import ResultCursor
from producer.enqueue import lane_keys
from runtime.connection import connect
from runtime.faults import redact_url
from runtime.settings import Settings
from schemas import messages
from schemas.errors import JobFailed, SchemaError, UnknownJobError
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
    for _entry_id, msg in entries(job_id, settings=settings, client=client, timeout_s=timeout_s):
        yield msg


def entries(
    job_id: str,
    *,
    settings: Settings,
    client: redis.Redis,
    timeout_s: float | None,
    after: str = "0-0",
    count: int = 256,
) -> Iterator[tuple[str, messages.Message]]:
    """`follow`'s loop: (entry id, message) for each entry after the id `after`, up to the terminal entry;
    `count` entries read at a time, at most (the most it holds)."""
    cursor = ResultCursor(settings.keys.results(job_id), last_id=after)
    last_seen = time.monotonic()
    backoff_s = 0.1
    while True:
        try:
            reply = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]],
                         client.xread({cursor.stream: cursor.last_id}, count=count, block=settings.block_ms))
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
        yield from cursor.read(reply[0][1])  # decoded, undecodable ones logged and passed over
        if cursor.done:
            return


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def is_live(job_id: str, *, settings: Settings, client: redis.Redis) -> bool:
    """Whether the job is a live one: its hash's `live` field (set by the producer as it enqueues), else the
    `live` of its job message, still on the jobs stream while the job runs (its hash's `entry_id`)."""
    keys = settings.keys
    live, entry_id, lane = cast(list[bytes | str | None], client.hmget(keys.job(job_id), ["live", "entry_id", "lane"]))
    if live is not None:
        return _str(live) == "1"
    if not entry_id:
        return False
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]],
                   client.xrange(lane_keys(keys, lane).jobs, min=_str(entry_id), max=_str(entry_id), count=1))
    for _id, fields in entries:
        try:
            msg = messages.decode(fields)
        except SchemaError:
            return False
        return isinstance(msg, messages.JobMessage) and msg.job_id == job_id and msg.live
    return False


@dataclass(frozen=True)
class WatchResult:
    job_id: str
    masks_json: Path  # a live job: its frames.ndjson
    render_path: Path | None  # None when the job was submitted without a render
    num_frames: int
    random_weights: bool


FRAMES_NDJSON = "frames.ndjson"  # a live job's frames, a JSON line each (see the module doc)
SUMMARY_JSON = "summary.json"  # and how it ended, once it has


def object_json(obj: messages.ObjectResult) -> dict[str, Any]:
    out = {"obj_id": obj.obj_id, "mask": rle_to_json(obj.mask), "bbox_xyxy": obj.bbox_xyxy, "area": obj.area,
           "score": obj.score}
    if obj.label:
        out.update(label=obj.label, label_score=obj.label_score)
    return out


def frame_json(msg: messages.FrameResult) -> dict[str, Any]:
    """A frame as masks.json has it."""
    frame: dict[str, Any] = {"frame_idx": msg.frame_idx, "objects": [object_json(o) for o in msg.objects]}
    if msg.skipped:
        frame["skipped"] = True
    return frame


def change_json(msg: messages.ObjectChange) -> dict[str, Any]:
    """An object change as masks.json's `changes` has it."""
    return {"obj_id": msg.obj_id, "frame_idx": msg.frame_idx, "change": msg.change, "note": msg.note}


def merge_update(frame: dict[str, Any], update: messages.FrameUpdate) -> None:
    """An `update` entry's objects replace (or join) those of the frame it names."""
    objects = {o["obj_id"]: o for o in frame["objects"]}
    objects.update({o.obj_id: object_json(o) for o in update.objects})
    frame["objects"] = [objects[k] for k in sorted(objects)]


def job_failed(job_id: str, msg: messages.Failed | messages.Cancelled | messages.Dead) -> JobFailed:
    if isinstance(msg, messages.Failed):
        return JobFailed(job_id, msg.error, msg.error_type)
    if isinstance(msg, messages.Dead):
        return JobFailed(job_id, f"dead-lettered after {msg.attempts} attempts: {msg.error}", "Dead")
    return JobFailed(job_id, f"cancelled after {msg.frames_done} frames", "Cancelled")


def render_of(settings: Settings, render_path: str) -> Path | None:
    return (settings.storage_root / render_path).resolve() if render_path else None


def write_atomically(path: Path, doc: dict[str, Any]) -> None:
    """`doc` as JSON at `path`: written beside it, then renamed over it (a reader sees the old or the new)."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


