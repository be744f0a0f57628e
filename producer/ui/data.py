"""What the viewer reads from Redis: one job (`read_job`, `job_info`, `figures`) and the page of cameras and
jobs (`overview`). Reads only, each a few commands that never block.

A job's size and rate come from its hash (`width`, `height`, `fps`, written at submit), else from its job
message while that is still on the jobs stream (its hash's `entry_id`: the entry is deleted once the job
has ended), else the size of the first published frame's masks (an older job). Recent jobs are those with
an entry on the jobs stream (queued and running) and those named by the newest entries of vseg:events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
import redis

from producer.cameras import CameraKeys
from producer.enqueue import lane_keys
from producer.fleet_status import describe_state, read_cameras
from producer.zones import ZoneSet
from runtime.faults import redact_url
from runtime.settings import Settings
from schemas import messages
from schemas.errors import SchemaError, UnknownJobError, ZoneError
from schemas.names import TERMINAL_ENTRY_ID, TERMINAL_STATES, Keys, frame_entry_id, validate_job_id
from schemas.storage import job_frames_rel

log = logging.getLogger(__name__)

EVENTS_SCANNED = 1000  # newest vseg:events entries read for the recent jobs
JOBS_SHOWN = 100
FIGURE_TEXTS = ("state", "worker", "error", "render_path", "source_state")
FIGURE_NUMBERS = ("attempt", "frames_done", "num_frames", "dropped", "dropped_at_ingest", "latency_p50_s",
                  "latency_p95_s", "source_down_since", "source_outages", "source_down_s", "auto_keyframes",
                  "auto_proposed", "auto_added", "finished_at")
ROW_FIELDS = ("state", "frames_done", "num_frames", "live", "camera", "source", "error", "attempt",
              "submitted_at", "finished_at", "dropped", "latency_p50_s", "latency_p95_s", "source_state")


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _number(text: str | None) -> float | int | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


@dataclass(frozen=True)
class JobView:
    """One job as read now: its hash, and its job message while that is on the jobs stream."""

    job_id: str
    fields: dict[str, str]
    message: messages.JobMessage | None = None
    size_from_masks: tuple[int, int] | None = field(default=None)  # (width, height) of its first frame's masks

    @property
    def state(self) -> str:
        return self.fields.get("state", "")

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def live(self) -> bool:
        live = self.fields.get("live")
        return live == "1" if live is not None else bool(self.message and self.message.live)

    @property
    def camera(self) -> str:
        return self.fields.get("camera", "")

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) of the displayed frame, in pixels; None when nothing says it."""
        width, height = _number(self.fields.get("width")), _number(self.fields.get("height"))
        if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
            return width, height
        if self.message is not None:
            return self.message.width, self.message.height
        return self.size_from_masks

    @property
    def fps(self) -> float | None:
        fps = _number(self.fields.get("fps"))
        if fps is not None and fps > 0:
            return float(fps)
        return self.message.fps if self.message is not None and self.message.fps > 0 else None

    @property
    def frames_rel(self) -> str:
        return self.message.frames_dir if self.message is not None else job_frames_rel(self.job_id)

    @property
    def zones(self) -> ZoneSet:
        try:
            return ZoneSet.from_json(self.fields.get("zones"))
        except ZoneError as e:
            log.warning("job %s: its zones field does not read (%s); shown as none", self.job_id, e)
            return ZoneSet()


def read_job(client: redis.Redis, settings: Settings, job_id: str) -> JobView:
    """The job's hash and job message; JobIdError for a malformed id, UnknownJobError for none."""
    validate_job_id(job_id)
    keys = settings.keys
    fields = {_text(k): _text(v) for k, v in cast(dict[bytes, bytes], client.hgetall(keys.job(job_id))).items()}
    if not fields:
        raise UnknownJobError(f"no job {job_id!r} in Redis at {redact_url(settings.redis_url)} (never submitted, "
                              f"or its results expired): check the job id")
    message = _job_message(client, lane_keys(keys, fields.get("lane")), job_id, fields.get("entry_id", ""))
    view = JobView(job_id, fields, message)
    if view.size is None:
        view = JobView(job_id, fields, message, _size_from_masks(client, settings, job_id))
    return view


def _job_message(client: redis.Redis, keys: Keys, job_id: str, entry_id: str) -> messages.JobMessage | None:
    """The job message at `entry_id` of `keys.jobs` (its lane's), None once gone."""
    if not entry_id:
        return None
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]],
                   client.xrange(keys.jobs, min=entry_id, max=entry_id, count=1))
    for _id, raw in entries:
        try:
            msg = messages.decode(raw)
        except SchemaError:
            return None
        if isinstance(msg, messages.JobMessage) and msg.job_id == job_id:
            return msg
    return None


def _size_from_masks(client: redis.Redis, settings: Settings, job_id: str) -> tuple[int, int] | None:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(
        settings.keys.results(job_id), min=frame_entry_id(0), max=f"({TERMINAL_ENTRY_ID}", count=50))
    for _id, raw in entries:
        try:
            msg = messages.decode(raw)
        except SchemaError:
            continue
        if isinstance(msg, messages.FrameResult) and msg.objects:
            height, width = msg.objects[0].mask["size"]
            return int(width), int(height)
    return None


def figures(fields: Mapping[str, str]) -> dict[str, Any]:
    """The job's figures panel, from its hash: progress, attempt, and for a live job its skips, latency p50/p95
    and source outages (the worker and the producer keep them there as its progress events say them)."""
    return {**{name: fields.get(name, "") for name in FIGURE_TEXTS},
            **{name: _number(fields.get(name)) for name in FIGURE_NUMBERS}, "live": fields.get("live") == "1"}


def job_info(view: JobView, media: Mapping[str, Any], *, camera_config: bool) -> dict[str, Any]:
    """GET /api/jobs/{id}: the job as the page starts from (`media`: its picture's URLs, producer/ui/media.py).
    `start_s`: where the job's frame 0 is in its source video (a job submitted with --start; the hash's
    `start_s` when its producer wrote one, else 0), so that the page maps the source's time to frames."""
    size = view.size
    return {
        "job_id": view.job_id, "state": view.state, "live": view.live, "camera": view.camera or None,
        "width": size[0] if size else None, "height": size[1] if size else None, "fps": view.fps,
        "source": view.fields.get("source", ""), "zones": view.zones.to_dict(), "media": dict(media),
        "figures": figures(view.fields), "submitted_at": _number(view.fields.get("submitted_at")),
        "prompts": [p.to_dict() for p in view.message.prompts] if view.message is not None else None,
        "start_s": _number(view.fields.get("start_s")) or 0, "camera_config": camera_config, "writable": not view.ended,
        "fields": dict(sorted(view.fields.items())),
    }


class _JobId(msgspec.Struct):
    job_id: str = ""


_JOB_ID = msgspec.msgpack.Decoder(_JobId)


def _job_of(fields: Mapping[bytes, bytes]) -> str:
    raw = fields.get(b"data")
    if raw is None:
        return ""
    try:
        return _JOB_ID.decode(raw).job_id
    except msgspec.DecodeError:
        return ""


def recent_job_ids(client: redis.Redis, settings: Settings, limit: int = JOBS_SHOWN) -> list[str]:
    """Jobs on the jobs stream (in flight), then those of the newest vseg:events entries, newest first."""
    keys = settings.keys
    in_flight = [entry for lane in keys.all_lanes()
                 for entry in cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrevrange(lane.jobs, count=limit))]
    in_flight.sort(key=lambda entry: tuple(int(n) for n in _text(entry[0]).split("-")), reverse=True)
    events = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrevrange(keys.events, count=EVENTS_SCANNED))
    seen: dict[str, None] = {}
    for _id, fields in [*in_flight, *events]:
        job_id = _job_of(fields)
        if job_id and job_id not in seen:
            seen[job_id] = None
    return list(seen)[:limit]


def overview(client: redis.Redis, settings: Settings, limit: int = JOBS_SHOWN) -> dict[str, Any]:
    """GET /api/overview and each snapshot of its stream: the cameras (as `python -m producer cameras` shows
    them) and the recent jobs with their state and progress."""
    cameras = [{**row, "state_text": describe_state(row)} for row in read_cameras(client, CameraKeys(settings.key_prefix))]
    ids = recent_job_ids(client, settings, limit)
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(settings.keys.job(job_id), list(ROW_FIELDS))
    rows = []
    for job_id, values in zip(ids, cast(list[list[bytes | None]], pipe.execute() if ids else [])):
        row: dict[str, Any] = {k: _text(v) for k, v in zip(ROW_FIELDS, values) if v is not None}
        if not row.get("state"):
            continue  # expired
        row.update({k: _number(row.get(k)) for k in ("frames_done", "num_frames", "attempt", "submitted_at",
                                                     "finished_at", "dropped", "latency_p50_s", "latency_p95_s")})
        rows.append({"job_id": job_id, **row, "live": row.get("live") == "1"})
    return {"cameras": cameras, "jobs": rows, "at": round(time.time(), 3)}

