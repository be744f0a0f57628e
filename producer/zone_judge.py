"""Zone and line events judged frame by frame on objects' masks: the pure core of producer/alerts.py (no Redis).

One `ZoneJudge` per job keeps, per object, where it stands against each zone and line, and turns each frame
(`FrameIn`: its objects' masks, as boolean H×W arrays or COCO RLE) into `AlertEvent`s:

- Zones. overlap = |mask ∩ zone| / |mask| (each zone rasterized once per frame size, cached). An object is
  seen in a zone once overlap >= min_overlap, and seen out again only once overlap < min_overlap *
  (1 - hysteresis): between the two it is seen where it was (a mask on an edge does not flicker). An empty
  mask, or an object gone from the frame (removed, lost), has overlap 0.
- Lines. Judged on the mask's centroid: its side is the sign of the cross product (positive: the right of
  the line walking from its first point to its second, as the picture shows it, y down), and a centroid
  within line_margin_px of the line is on the line, which keeps the side it was seen on before. A
  crossing is a change of side whose centroid path (from the last centroid on the old side to the first on
  the new one) meets the line segment itself, not its extension: `in` from the left to the right, `out`
  the other way. An object with an empty mask is not judged against lines on that frame.
- Confirmation. A change of what is seen counts once it has held confirm_frames consecutive frames; the
  event is stamped with the first frame of that run (its frame_idx, t_s, overlap and label), so the same
  frames always give the same event and the same idempotency key. Events come out in the order they were
  confirmed.
- Dwell. One `dwell` event per stay in a zone, on the first frame seen inside with t_s - enter t_s >= dwell_s;
  a zone_leave carries how long the stay lasted.

The caller gives only processed frames: a live job's skipped frames are left out, and `update` entries
(masks corrected later on frames already judged) are not judged again: what was published stands. A zone
set may change between frames (keyed by name): a zone or line that is gone is forgotten without an event,
a new one starts with every object outside it (an object already inside enters it), a line whose points
changed starts afresh. The state is a msgspec Struct, to and from JSON (`to_json`, `from_json`) to resume.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import msgspec
import numpy as np
from pycocotools import mask as mask_utils

from producer.zones import Line, Point, ZoneSet
from runtime.settings import Settings
from schemas.alerts import AlertEvent, event_key
from schemas.rle import Rle, encode_mask, rle_centroid


@dataclass(frozen=True)
class Rules:
    """The thresholds (runtime/settings.py's zone_* settings)."""

    min_overlap: float = 0.5
    hysteresis: float = 0.5
    confirm_frames: int = 2
    line_margin_px: float = 4.0
    dwell_s: float = 10.0

    @classmethod
    def of(cls, settings: Settings) -> Rules:
        return cls(settings.zone_min_overlap, settings.zone_hysteresis, settings.zone_confirm_frames,
                   settings.line_margin_px, settings.dwell_s)

    @property
    def leave_below(self) -> float:
        return self.min_overlap * (1 - self.hysteresis)


@dataclass(frozen=True)
class ObjectMask:
    """One object on one frame: its mask (a boolean H×W array or COCO RLE; empty: absent on this frame)."""

    obj_id: int
    mask: np.ndarray | Rle
    label: str = ""


@dataclass(frozen=True)
class FrameIn:
    """One processed frame: its index, video time (seconds), size (its masks' size) and objects."""

    frame_idx: int
    t_s: float
    width: int
    height: int
    objects: Sequence[ObjectMask]
    captured_at: float | None = None  # live jobs: Unix time the frame was received


class Run(msgspec.Struct):
    """A change seen from `frame_idx` on, held `count` processed frames so far (an event once confirmed)."""

    frame_idx: int
    t_s: float
    captured_at: float | None = None
    count: int = 0
    overlap: float | None = None
    label: str = ""
    start: tuple[float, float] | None = None  # lines: the last centroid on the old side
    point: tuple[float, float] | None = None  # lines: the first centroid on the new side


class InZone(msgspec.Struct):
    inside: bool = False  # confirmed
    seen: bool = False  # as seen on the last frame (with hysteresis)
    run: Run | None = None
    enter_t_s: float | None = None  # the stay's first frame's time
    dwelt: bool = False  # this stay's dwell event is out


class ByLine(msgspec.Struct):
    geom: tuple[float, float, float, float]  # the line's points when this state began
    side: int = 0  # confirmed: -1 left, 1 right, 0 not seen off the line yet
    seen: int = 0  # as seen on the last frame (the line's margin keeps the previous side)
    anchor: tuple[float, float] | None = None  # the last centroid seen on `side`, off the line
    run: Run | None = None


class ObjectState(msgspec.Struct):
    zones: dict[str, InZone] = msgspec.field(default_factory=dict)
    lines: dict[str, ByLine] = msgspec.field(default_factory=dict)


class JudgeState(msgspec.Struct):
    v: int = 1
    objects: dict[int, ObjectState] = msgspec.field(default_factory=dict)


@functools.lru_cache(maxsize=256)
def zone_raster(points: tuple[Point, ...], width: int, height: int) -> tuple[np.ndarray, Rle]:
    """A zone's pixels on a width×height frame (a pixel is inside when its centre is), as a mask and as RLE."""
    canvas = np.zeros((height, width), np.uint8)
    corners = np.round((np.asarray(points, dtype=np.float64) - 0.5) * 16).astype(np.int32)  # 4 bits of subpixel
    cv2.fillPoly(canvas, [corners], 1, lineType=cv2.LINE_8, shift=4)
    mask = canvas.astype(bool)
    mask.flags.writeable = False
    return mask, encode_mask(mask)


def _size(mask: np.ndarray | Rle) -> list[int]:
    return list(mask.shape) if isinstance(mask, np.ndarray) else [int(v) for v in mask["size"]]


def _area(mask: np.ndarray | Rle) -> int:
    return int(np.count_nonzero(mask)) if isinstance(mask, np.ndarray) else int(mask_utils.area(dict(mask)))


def _inside(mask: np.ndarray | Rle, zone: tuple[np.ndarray, Rle]) -> int:
    if isinstance(mask, np.ndarray):
        return int(np.count_nonzero(mask & zone[0]))
    return int(mask_utils.area(mask_utils.merge([dict(mask), dict(zone[1])], intersect=True)))


def centroid(mask: np.ndarray | Rle) -> tuple[float, float] | None:
    """The mask's centre of mass in pixel coordinates (a pixel's centre at +0.5), or None when empty."""
    if not isinstance(mask, np.ndarray):
        return rle_centroid(mask)
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


def _cross(line: Line, p: tuple[float, float]) -> float:
    (ax, ay), (bx, by) = line.a, line.b
    return (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax)


def side_of(line: Line, p: tuple[float, float], margin_px: float) -> int:
    """1 on the right of the line (walking from a to b, y down), -1 on its left, 0 within margin_px of it."""
    length = math.hypot(line.b[0] - line.a[0], line.b[1] - line.a[1])
    d = _cross(line, p) / length
    return 0 if abs(d) <= margin_px else (1 if d > 0 else -1)


def meets_segment(line: Line, p: tuple[float, float], q: tuple[float, float]) -> bool:
    """Whether the path p -> q (p and q on opposite sides of the line) meets the segment a-b itself."""
    dp, dq = _cross(line, p), _cross(line, q)
    if dp == dq:
        return False
    s = dp / (dp - dq)
    x, y = p[0] + s * (q[0] - p[0]), p[1] + s * (q[1] - p[1])
    (ax, ay), (bx, by) = line.a, line.b
    u = ((x - ax) * (bx - ax) + (y - ay) * (by - ay)) / ((bx - ax) ** 2 + (by - ay) ** 2)
    return 0.0 <= u <= 1.0


class ZoneJudge:
    """One job's judge (see the module doc): `judge(frame, zones)` returns that frame's events."""

    def __init__(self, job_id: str, rules: Rules, *, camera: str = "", state: JudgeState | None = None) -> None:
        self.job_id = job_id
        self.rules = rules
        self.camera = camera
        self.state = state if state is not None else JudgeState()

    def to_json(self) -> bytes:
        return msgspec.json.encode(self.state)

    @classmethod
    def from_json(cls, job_id: str, rules: Rules, text: bytes | str, *, camera: str = "") -> ZoneJudge:
        """A judge resuming from `to_json`'s text (msgspec.DecodeError or ValidationError if it is not one)."""
        return cls(job_id, rules, camera=camera, state=msgspec.json.decode(text, type=JudgeState))

    def judge(self, frame: FrameIn, zones: ZoneSet, at: float | None = None) -> list[AlertEvent]:
        """The events this frame confirms, in order: by object id, then zones, then lines."""
        at = time.time() if at is None else at
        out: list[AlertEvent] = []
        objects = {o.obj_id: o for o in frame.objects}
        areas = {o.obj_id: self._area(o, frame) for o in frame.objects}  # checked before any state changes
        for obj_id in sorted(set(objects) | set(self.state.objects)):
            st = self.state.objects.setdefault(obj_id, ObjectState())
            self._forget_gone(st, zones)
            obj = objects.get(obj_id)
            area = areas.get(obj_id, 0)
            for zone in zones.zones:
                hit = 0 if not area else _inside(obj.mask, zone_raster(zone.points, frame.width, frame.height))  # type: ignore[union-attr]
                out += self._zone(st.zones.setdefault(zone.name, InZone()), zone.name, obj_id, frame,
                                  hit / area if area else 0.0, "" if obj is None else obj.label, at)
            point = centroid(obj.mask) if area and zones.lines else None  # type: ignore[union-attr]
            for line in zones.lines:
                geom = (*line.a, *line.b)
                by = st.lines.get(line.name)
                if by is None or by.geom != geom:
                    by = st.lines[line.name] = ByLine(geom)
                if point is not None:
                    out += self._line(by, line, obj_id, frame, point, "" if obj is None else obj.label, at)
            if obj is None and not any(z.inside or z.run for z in st.zones.values()):
                del self.state.objects[obj_id]  # gone (removed, lost) and in no zone: nothing left to judge
        return out

    @staticmethod
    def _area(obj: ObjectMask, frame: FrameIn) -> int:
        size = _size(obj.mask)
        if size != [frame.height, frame.width]:
            raise ValueError(f"object {obj.obj_id}'s mask on frame {frame.frame_idx} must be {frame.height}x"
                             f"{frame.width} (the frame's height x width), but is {size[0]}x{size[1]}")
        return _area(obj.mask)

    @staticmethod
    def _forget_gone(st: ObjectState, zones: ZoneSet) -> None:
        names = {z.name for z in zones.zones}
        for name in [n for n in st.zones if n not in names]:
            del st.zones[name]
        names = {ln.name for ln in zones.lines}
        for name in [n for n in st.lines if n not in names]:
            del st.lines[name]

    def _event(self, type_: str, name: str, obj_id: int, run: Run | FrameIn, at: float, label: str,
               **fields: Any) -> AlertEvent:
        return AlertEvent(key=event_key(self.job_id, run.frame_idx, obj_id, type_, name), type=type_,  # type: ignore[arg-type]
                          job_id=self.job_id, camera=self.camera, obj_id=obj_id, zone=name, frame_idx=run.frame_idx,
                          t_s=run.t_s, captured_at=run.captured_at, at=at, label=label, **fields)

    def _zone(self, z: InZone, name: str, obj_id: int, frame: FrameIn, overlap: float, label: str,
              at: float) -> list[AlertEvent]:
        rules = self.rules
        z.seen = True if overlap >= rules.min_overlap else False if overlap < rules.leave_below else z.seen
        out: list[AlertEvent] = []
        if z.seen == z.inside:
            z.run = None
        else:
            if z.run is None:
                z.run = Run(frame.frame_idx, frame.t_s, frame.captured_at, overlap=round(overlap, 4), label=label)
            z.run.count += 1
            if z.run.count >= rules.confirm_frames:
                run, z.run = z.run, None
                if z.seen:
                    z.inside, z.enter_t_s, z.dwelt = True, run.t_s, False
                    out.append(self._event("zone_enter", name, obj_id, run, at, run.label, overlap=run.overlap))
                else:
                    lasted = None if z.enter_t_s is None else round(run.t_s - z.enter_t_s, 6)
                    z.inside, z.enter_t_s = False, None
                    out.append(self._event("zone_leave", name, obj_id, run, at, run.label, overlap=run.overlap,
                                           dwell_s=lasted))
        if (z.inside and z.seen and not z.dwelt and z.enter_t_s is not None
                and frame.t_s - z.enter_t_s >= rules.dwell_s):
            z.dwelt = True
            out.append(self._event("dwell", name, obj_id, frame, at, label, overlap=round(overlap, 4),
                                   dwell_s=round(frame.t_s - z.enter_t_s, 6)))
        return out

    def _line(self, by: ByLine, line: Line, obj_id: int, frame: FrameIn, point: tuple[float, float], label: str,
              at: float) -> list[AlertEvent]:
        raw = side_of(line, point, self.rules.line_margin_px)
        if by.side == 0:  # first seen off the line: where it starts, no event
            if raw:
                by.side = by.seen = raw
                by.anchor = point
            return []
        by.seen = raw or by.seen
        if by.seen == by.side:
            by.run = None
            if raw:
                by.anchor = point
            return []
        if by.run is None:
            by.run = Run(frame.frame_idx, frame.t_s, frame.captured_at, label=label, start=by.anchor, point=point)
        by.run.count += 1
        if by.run.count < self.rules.confirm_frames:
            return []
        run, by.run = by.run, None
        old, by.side = by.side, by.seen
        by.anchor = point if raw else run.point
        if run.start is None or run.point is None or not meets_segment(line, run.start, run.point):
            return []  # went round the line's end: its side changed, but it did not cross
        return [self._event("line_cross", line.name, obj_id, run, at, run.label, direction="in" if old < 0 else "out")]
