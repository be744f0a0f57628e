"""The viewer's writes: a point on the picture (a new object, or a correction of one), an object removed, and a
job's zones saved. Prompts and removals go the command line's way (producer/running_prompts.py: the same
checks, the same errors, the worker's reply awaited a few seconds); every refusal is raised as the error the
API turns into a 4xx with its one line (producer/ui/app.py).

A point's object: `obj_id` null is a new object, with the next free id, one more than every id the job has
had (its submit prompts, every prompt on its control stream, the objects of its `started` entry and of its
newest results: automatic objects get their ids from the worker). Its frame: a live job's point applies at
the next frame the worker processes (`@now`; its frames are gone), a file job's on the frame the page shows
(`frame`), or at the next frame processed when none is given. A negative point (shift-click) corrects an
object and cannot start one.

Zones: checked (`ZoneSet.from_dict`, then `check` against the job's displayed size), then saved into the
camera's configuration first when the job is a camera's and the viewer has one (`CameraConfig`: the fleet
daemon), so that a refused file changes nothing, then onto the job's hash (`zones`) while it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, cast

import msgspec
import redis

from producer.running_prompts import JobEndedError, PromptRefused, PromptReply, add_prompts, remove_object
from producer.ui.data import JobView, read_job
from producer.zones import ZoneSet
from runtime.lua import lua, register
from runtime.settings import Settings
from schemas import messages
from schemas.errors import InputError, PromptError, SchemaError, ZoneError
from schemas.names import STARTED_ENTRY_ID, TERMINAL_ENTRY_ID, terminal_states_arg
from schemas.prompts import ObjectPrompt, object_ids

REPLY_WAIT_S = 5.0  # how long a write waits for the worker's reply before answering "sent"
NEWEST_RESULTS = 64  # result entries read for the ids of objects the worker made


class CameraConfig(Protocol):
    """Where a camera's zones are kept: the fleet daemon's cameras.yaml (producer/fleet.py implements it)."""

    def save_zones(self, camera: str, zones: ZoneSet) -> None:
        """Write camera `camera`'s zones and lines into its configuration; ZoneError or ConfigError (one line
        for the user) when refused, with the configuration unchanged."""


# KEYS: job hash. ARGV: the zones (ZoneSet.to_json), the terminal states (space-separated). {-1, ''}: no such job;
# {0, state}: already ended (nothing written); {1, state}: set. One step, so that an expired hash is not remade.
_SET_ZONES_LUA = lua("ui_set_zones", """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1, ''} end
if string.find(' ' .. ARGV[2] .. ' ', ' ' .. state .. ' ', 1, true) then return {0, state} end
redis.call('HSET', KEYS[1], 'zones', ARGV[1])
return {1, state}
""")


def _field(body: dict[str, Any], name: str, *, optional: bool = False, whole: bool = False) -> Any:
    value = body.get(name)
    if value is None and optional:
        return None
    if whole:
        ok = isinstance(value, int) and value >= 0
    else:
        ok = isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(value, bool) or not ok:
        kind = "an integer >= 0" if whole else "a finite number"
        raise InputError(f"field {name!r} must be {kind}{' or null' if optional else ''}, but got {value!r}")
    return value


def _body(raw: object, fields: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InputError(f"the request's body must be a JSON object with {', '.join(sorted(fields))}")
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise InputError(f"unknown field(s) {unknown}: expected {', '.join(sorted(fields))}")
    return raw


@dataclass(frozen=True)
class Point:
    """POST /api/jobs/{id}/prompt's body: {x, y, obj_id (null: a new object), frame (null: now), positive}."""

    x: float
    y: float
    obj_id: int | None = None
    frame: int | None = None
    positive: bool = True

    @classmethod
    def parse(cls, raw: object) -> Point:
        body = _body(raw, {"x", "y", "obj_id", "frame", "positive"})
        positive = body.get("positive", True)
        if not isinstance(positive, bool):
            raise InputError(f"field 'positive' must be true (a point on the object) or false (a point off it), "
                             f"but got {positive!r}")
        return cls(float(_field(body, "x")), float(_field(body, "y")), _field(body, "obj_id", optional=True, whole=True),
                   _field(body, "frame", optional=True, whole=True), positive)


def next_object_id(client: redis.Redis, settings: Settings, view: JobView) -> int:
    """One more than every object id the job has had (the module doc)."""
    keys = settings.keys
    ids = set(object_ids(view.message.prompts)) if view.message is not None else set()
    control = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(keys.control(view.job_id)))
    started = cast(list[tuple[bytes, dict[bytes, bytes]]],
                   client.xrange(keys.results(view.job_id), min=STARTED_ENTRY_ID, max=STARTED_ENTRY_ID))
    newest = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrevrange(
        keys.results(view.job_id), max=f"({TERMINAL_ENTRY_ID}", count=NEWEST_RESULTS))
    for _id, fields in [*control, *started, *newest]:
        try:
            msg = messages.decode(fields)
        except SchemaError:
            continue
        if isinstance(msg, messages.PromptCommand):
            ids.update(object_ids(msg.prompts))
        elif isinstance(msg, (messages.FrameResult, messages.FrameUpdate)):
            ids.update(o.obj_id for o in msg.objects)
        elif isinstance(msg, messages.Started):
            ids.update(msg.obj_ids)
        elif isinstance(msg, messages.ObjectChange):
            ids.add(msg.obj_id)
    return max(ids, default=0) + 1


def reply_json(reply: PromptReply) -> dict[str, Any]:
    changes = [{k: v for k, v in msgspec.to_builtins(c).items() if k != "v"} for c in reply.changes]
    return {"job_id": reply.job_id, "request_id": reply.request_id, "obj_ids": list(reply.obj_ids),
            "changes": changes, "pending": list(reply.pending), "ended": reply.ended, "message": reply.describe()}


def send_point(client: redis.Redis, settings: Settings, job_id: str, point: Point,
               wait_s: float = REPLY_WAIT_S) -> dict[str, Any]:
    """Send the point as a prompt on the running job; the worker's reply (or that it was sent)."""
    view = read_job(client, settings, job_id)
    if view.ended:
        raise JobEndedError(f"job {job_id} is already {view.state}: prompts apply only to a running or queued job")
    if point.obj_id is None and not point.positive:
        raise PromptError("a negative point (shift-click) says where an object is not: pick the object to correct "
                          "in the list first")
    obj_id = point.obj_id if point.obj_id is not None else next_object_id(client, settings, view)
    now = view.live or point.frame is None
    prompt = ObjectPrompt.point(obj_id, point.x, point.y, frame=0 if now else cast(int, point.frame),
                                label=1 if point.positive else 0)
    reply = add_prompts(job_id, [prompt], settings=settings, now=now, wait_s=wait_s, client=client)
    reply.raise_if_refused()
    return {**reply_json(reply), "obj_id": obj_id, "now": now}


def remove(client: redis.Redis, settings: Settings, job_id: str, raw: object,
           wait_s: float = REPLY_WAIT_S) -> dict[str, Any]:
    """POST /api/jobs/{id}/remove {obj_id}: stop tracking it from the next frame processed."""
    obj_id = _field(_body(raw, {"obj_id"}), "obj_id", whole=True)
    reply = remove_object(job_id, obj_id, settings=settings, wait_s=wait_s, client=client)
    reply.raise_if_refused()
    return reply_json(reply)


def save_zones(client: redis.Redis, settings: Settings, job_id: str, raw: object,
               cameras: CameraConfig | None) -> dict[str, Any]:
    """PUT /api/jobs/{id}/zones {zones: [{name, points}], lines: [{name, points}]}: where they were saved."""
    zones = ZoneSet.from_dict(raw)
    view = read_job(client, settings, job_id)
    if view.size is None:
        raise ZoneError(f"job {job_id}'s frame size is not known yet, so its zones cannot be checked: try again "
                        f"once its first frame is published")
    zones.check(*view.size)
    camera = view.camera
    if camera and cameras is not None:
        cameras.save_zones(camera, zones)  # first: a refused file leaves everything as it was
    code, state = cast(list[Any], register(client, "ui_set_zones")(
        keys=[settings.keys.job(job_id)], args=[zones.to_json(), terminal_states_arg()]))
    state = state.decode() if isinstance(state, bytes) else str(state)
    on_job = int(code) == 1
    what = f"{len(zones.zones)} zone(s) and {len(zones.lines)} line(s)"
    if camera and cameras is not None:
        where = (f"saved {what} on job {job_id} and in camera {camera}'s configuration (its next jobs have them too)"
                 if on_job else f"job {job_id} has ended ({state}); saved {what} in camera {camera}'s configuration "
                                f"for its next jobs")
    elif not on_job:
        raise JobEndedError(f"job {job_id} has ended ({state}): its zones no longer change anything")
    elif camera:
        where = (f"saved {what} on job {job_id} only: this viewer runs without the cameras file (python -m producer "
                 f"ui), so camera {camera}'s next jobs will not have them; save them from `producer serve "
                 f"--http-port`, or write them into cameras.yaml")
    else:
        where = f"saved {what} on job {job_id}"
    return {"job_id": job_id, "zones": zones.to_dict(), "on_job": on_job,
            "in_camera_config": bool(camera and cameras is not None), "message": where}


__all__ = ["CameraConfig", "JobEndedError", "Point", "PromptRefused", "next_object_id", "remove", "save_zones",
           "send_point"]
