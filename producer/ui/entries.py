"""The JSON the viewer's page reads, made from stream entries (pure: no I/O), and where a reader of a job
stands (`Cursor`).

One JSON object per entry, each with a `type`:

    started   entry_id, obj_ids, attempt, worker, model, first_frame, num_frames, random_weights, at
    frame     entry_id, frame_idx, objects, skipped, captured_at, pts_s, latency_s
    update    entry_id, frame_idx, objects, request_id        (replace or add those objects on that frame)
    object    entry_id, obj_id, frame_idx, change, source, note, label, requested_frame, request_id, at
    completed | failed | cancelled | dead    entry_id and the terminal entry's fields
    alert     entry_id, alert: the zone event's fields (type zone_enter | zone_leave | line_cross | dwell,
              key, obj_id, zone, frame_idx, t_s, captured_at, at, overlap, direction, dwell_s, label, ...)

An object is {obj_id, mask: {size: [h, w], counts: COCO's compressed string}, bbox: [x0, y0, x1, y1]
(right and bottom exclusive), area, score, label, label_score}. Alerts are decoded with msgpack alone, so
a newer writer's fields pass through to the page.

A `Cursor` is the last entry read on the job's result stream and on its alerts stream, written `R/A`
(`12-0/1733480000000-0`): the job stream's SSE event id, so that a browser's reconnection (Last-Event-ID)
resumes where it stood. `R` alone is a result-stream id (the alerts then from their start).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import msgspec

from schemas import messages
from schemas.errors import InputError
from schemas.rle import rle_to_json

log = logging.getLogger(__name__)

_ID = re.compile(r"^(\d{1,20})(?:-(\d{1,20}))?$")
MAX_SEQ = 18446744073709551615  # the largest sequence number of a stream id (2^64 - 1)
_JSON = msgspec.json.Encoder()


def to_json(doc: object) -> bytes:
    """JSON bytes (msgspec: NaN and infinities become null, which JSON.parse takes)."""
    return _JSON.encode(doc)


def object_json(obj: messages.ObjectResult) -> dict[str, Any]:
    return {"obj_id": obj.obj_id, "mask": rle_to_json(obj.mask), "bbox": obj.bbox_xyxy, "area": obj.area,
            "score": obj.score, "label": obj.label, "label_score": obj.label_score}


def result_json(entry_id: str, msg: messages.Message) -> dict[str, Any] | None:
    """A result-stream entry as the page reads it; None for a type with no place there."""
    if isinstance(msg, messages.FrameResult):
        return {"type": "frame", "entry_id": entry_id, "frame_idx": msg.frame_idx, "skipped": msg.skipped,
                "objects": [object_json(o) for o in msg.objects], "captured_at": msg.captured_at,
                "pts_s": msg.pts_s, "latency_s": msg.latency_s}
    if isinstance(msg, messages.FrameUpdate):
        return {"type": "update", "entry_id": entry_id, "frame_idx": msg.frame_idx, "request_id": msg.request_id,
                "objects": [object_json(o) for o in msg.objects]}
    if isinstance(msg, (messages.Started, messages.ObjectChange, *messages.TERMINAL_TYPES)):
        doc: dict[str, Any] = msgspec.to_builtins(msg)
        doc.pop("v", None)
        return {"type": msg.TYPE.value, "entry_id": entry_id, **doc}
    return None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _plain(value: Any) -> Any:
    """msgpack's values as JSON's: bytes as text, maps with text keys."""
    if isinstance(value, (bytes, bytearray)):
        return value.decode(errors="replace")
    if isinstance(value, Mapping):
        return {_text(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def alert_json(entry_id: str, fields: Mapping[Any, Any]) -> dict[str, Any] | None:
    """An alerts-stream entry (`type`, `key`, `data`: msgpack) as the page reads it; None (logged) when its
    data is not a msgpack map."""
    raw = fields.get(b"data", fields.get("data"))
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=False) if raw is not None else None
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        log.warning("skipping undecodable alert %s: %s", entry_id, e)
        return None
    if not isinstance(data, Mapping):
        log.warning("skipping alert %s: its data is not a map", entry_id)
        return None
    alert = _plain(data)
    alert.pop("v", None)
    for name in ("type", "key"):  # the entry's own fields, in case the map lacks them
        if name not in alert and (fields.get(name.encode()) or fields.get(name)) is not None:
            alert[name] = _text(fields.get(name.encode()) or fields.get(name))
    return {"type": "alert", "entry_id": entry_id, "alert": alert}


def stream_id(text: str, what: str) -> str:
    """A stream entry id (`ms-seq`, or `ms`: `ms-0`), or InputError saying what was wrong."""
    match = _ID.match(text.strip())
    if not match:
        raise InputError(f"{what} must be a stream entry id such as 12-0, but got {text!r}")
    return f"{int(match.group(1))}-{int(match.group(2) or 0)}"


def before(entry_id: str) -> str:
    """The id just before `entry_id` (XREAD reads after an id: this makes it read `entry_id` itself)."""
    ms, _, seq = entry_id.partition("-")
    if int(seq or 0) > 0:
        return f"{ms}-{int(seq) - 1}"
    return "0-0" if int(ms) == 0 else f"{int(ms) - 1}-{MAX_SEQ}"


@dataclass(frozen=True)
class Cursor:
    """The last entry read on a job's result stream and on its alerts stream (the module doc)."""

    results: str = "0-0"
    alerts: str = "0-0"

    def text(self) -> str:
        return f"{self.results}/{self.alerts}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """`R/A` or `R`; InputError for anything else."""
        results, sep, alerts = text.partition("/")
        return cls(stream_id(results, "after (a result entry id)"),
                   stream_id(alerts, "after's alerts part (an alert entry id)") if sep else "0-0")
