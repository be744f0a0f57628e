"""Zone and line events as wire messages: `AlertEvent`, on `vseg:alerts` and a job's `vseg:job:{id}:alerts`.

The events consumer (producer/alerts.py) judges each object's mask against its job's zones and lines
(producer/zone_judge.py) and publishes one entry per event. An entry has three fields: `type` (one of
ALERT_TYPES), `key` (the event's idempotency key, also inside `data`) and `data` (a msgpack map, with a schema
version `v` as in schemas/messages.py). Delivery is at least once: a consumer restarted after a crash may
publish an event again, always under the same key, so a reader drops a key it has seen.

Why its own module and not schemas/messages.py: these entries are not a job's lifecycle, they are written by
the producer side's events consumer, and their `type` is the event's kind, with the key beside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from schemas.decode_errors import check_version, entry_field, invalid
from schemas.errors import JobIdError, SchemaError
from schemas.names import validate_job_id

ALERT_VERSION = 1
ALERT_TYPES = ("zone_enter", "zone_leave", "line_cross", "dwell")
AlertType = Literal["zone_enter", "zone_leave", "line_cross", "dwell"]


class AlertEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One object entering or leaving a zone, crossing a line, or staying in a zone `dwell_s` (the setting).
    Beside `data` the entry's `key` field repeats `key`, and its `type` field is `type`."""

    v: int = ALERT_VERSION
    key: str  # idempotency key, the same whenever the event is published again: job_id:frame_idx:obj_id:type:zone
    type: AlertType  # zone_enter | zone_leave | line_cross | dwell
    job_id: str
    camera: str = ""  # the job's camera (cameras.yaml), "" for a job submitted alone
    obj_id: int
    zone: str  # the zone's name, or the line's (line_cross)
    frame_idx: int  # the frame the change was first seen on (it then held zone_confirm_frames processed frames)
    t_s: float  # video time of that frame, seconds: frame_idx / fps for a file job, the frame's timestamp for a live one
    captured_at: float | None = None  # live jobs: Unix time that frame was received
    at: float  # Unix time the event was judged
    overlap: float | None = None  # zone events: the fraction of the object's mask inside the zone on that frame
    direction: str = ""  # line_cross: in (from the left of the line to its right, walking from its first point to its second) or out
    dwell_s: float | None = None  # dwell: seconds in the zone so far; zone_leave: seconds the stay lasted (null: its enter was not judged)
    label: str = ""  # the object's label on that frame (jobs with labels)


def event_key(job_id: str, frame_idx: int, obj_id: int, type_: str, zone: str) -> str:
    """The idempotency key: the same event judged again (after a restart) gets the same one."""
    return f"{job_id}:{frame_idx}:{obj_id}:{type_}:{zone}"


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(AlertEvent)
_JSON = msgspec.json.Encoder()


def encode(event: AlertEvent) -> dict[str, bytes]:
    """Stream entry fields: {'type': ..., 'key': ..., 'data': msgpack map}."""
    return {"type": event.type.encode(), "key": event.key.encode(), "data": _ENCODER.encode(event)}


def to_json(event: AlertEvent) -> bytes:
    """The event as a JSON object (the webhook's body)."""
    return _JSON.encode(event)


def decode(fields: Mapping[Any, Any]) -> AlertEvent:
    """The event of an alerts-stream entry; SchemaError (naming the field) for anything malformed."""
    raw = entry_field(fields, "data", "alert entry")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise SchemaError(f"alert entry's data must be msgpack bytes, but got {type(raw).__name__}")
    try:
        version = msgspec.msgpack.decode(raw).get("v")
    except (msgspec.DecodeError, AttributeError) as e:
        raise SchemaError(f"alert entry's data is not a msgpack map: {e}") from None
    check_version(version, ALERT_VERSION, "alert", "upgrade the reader")
    try:
        event = _DECODER.decode(raw)
    except msgspec.ValidationError as e:
        raise invalid("alert", e, msgspec.msgpack.decode(raw)) from None
    try:
        validate_job_id(event.job_id)
    except JobIdError as e:
        raise SchemaError(f"alert message field job_id: {e}") from None
    return event
