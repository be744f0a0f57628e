"""Zones (polygons) and lines a job's events are judged against (producer/alerts.py), in displayed pixels.

On the command line `--zone NAME:x,y,x,y,x,y[,...]` (3 points or more) and `--line NAME:x0,y0,x1,y1`; in
cameras.yaml `zones: {NAME: [[x, y], ...]}` and `lines: {NAME: [[x0, y0], [x1, y1]]}`; in Redis the job
hash's `zones` field, as `ZoneSet.to_json()` (the viewer may replace it while the job runs). A line's
direction: crossing it from the left of the way from its first point to its second, to the right, is `in`.
Every refusal is a ZoneError (one line: what is wrong and what to write instead).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.errors import ZoneError

Point = tuple[float, float]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_POINTS = 256


@dataclass(frozen=True)
class Zone:
    """A polygon: 3 points or more, in displayed pixels."""

    name: str
    points: tuple[Point, ...]


@dataclass(frozen=True)
class Line:
    """A segment from `a` to `b`; `in` is crossing from its left to its right (walking from a to b)."""

    name: str
    a: Point
    b: Point


@dataclass(frozen=True)
class ZoneSet:
    """A job's zones and lines; names are unique among both."""

    zones: tuple[Zone, ...] = ()
    lines: tuple[Line, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.zones or self.lines)

    def check(self, width: int, height: int) -> ZoneSet:
        """Every point inside the displayed frame (0..width, 0..height): ZoneError naming the first outside."""
        for what, name, points in [*(("zone", z.name, z.points) for z in self.zones),
                                   *(("line", ln.name, (ln.a, ln.b)) for ln in self.lines)]:
            for x, y in points:
                if not (0 <= x <= width and 0 <= y <= height):
                    raise ZoneError(f"{what} {name}: point ({x:g}, {y:g}) lies outside the {width}x{height} frame "
                                    f"(displayed pixels, 0..{width} by 0..{height})")
        return self

    def to_dict(self) -> dict[str, list[dict[str, object]]]:
        return {"zones": [{"name": z.name, "points": [list(p) for p in z.points]} for z in self.zones],
                "lines": [{"name": ln.name, "points": [list(ln.a), list(ln.b)]} for ln in self.lines]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, raw: object) -> ZoneSet:
        """From `to_dict`'s form (the viewer's request, the job hash): ZoneError for anything else."""
        if not isinstance(raw, Mapping) or set(raw) - {"zones", "lines"}:
            raise ZoneError('zones must be {"zones": [{"name": ..., "points": [[x, y], ...]}], "lines": [...]}')
        zones = [_zone(_named(z, "zone")) for z in _items(raw.get("zones", []), "zones")]
        lines = [_line(_named(ln, "line")) for ln in _items(raw.get("lines", []), "lines")]
        return build(zones, lines)

    @classmethod
    def from_json(cls, text: str | bytes | None) -> ZoneSet:
        if not text:
            return cls()
        try:
            return cls.from_dict(json.loads(text))
        except ValueError as e:
            if isinstance(e, ZoneError):
                raise
            raise ZoneError(f"zones are not valid JSON ({e})") from None


NO_ZONES = ZoneSet()


def build(zones: Iterable[Zone], lines: Iterable[Line]) -> ZoneSet:
    """A ZoneSet, refusing a name given twice."""
    out = ZoneSet(tuple(zones), tuple(lines))
    seen: set[str] = set()
    for name in [z.name for z in out.zones] + [ln.name for ln in out.lines]:
        if name in seen:
            raise ZoneError(f"the name {name!r} is given to two zones or lines: each needs its own name")
        seen.add(name)
    return out


def parse_zone(spec: str) -> Zone:
    """`NAME:x,y,x,y,x,y[,...]`."""
    name, values = _split(spec, "--zone", "NAME:x,y,x,y,x,y[,...]")
    if len(values) < 6 or len(values) % 2:
        raise ZoneError(f"--zone {spec!r}: a zone needs 3 points or more, as x,y pairs (got {len(values)} "
                        "numbers): write --zone NAME:x,y,x,y,x,y[,...]")
    return _zone((name, [(values[i], values[i + 1]) for i in range(0, len(values), 2)]))


def parse_line(spec: str) -> Line:
    """`NAME:x0,y0,x1,y1`."""
    name, values = _split(spec, "--line", "NAME:x0,y0,x1,y1")
    if len(values) != 4:
        raise ZoneError(f"--line {spec!r}: a line is two points, 4 numbers (got {len(values)}): write "
                        "--line NAME:x0,y0,x1,y1")
    return _line((name, [(values[0], values[1]), (values[2], values[3])]))


def parse_zones(zones: Sequence[str] = (), lines: Sequence[str] = ()) -> ZoneSet:
    """The command line's --zone and --line values."""
    return build([parse_zone(z) for z in zones], [parse_line(ln) for ln in lines])


def from_config(zones: object, lines: object, where: str) -> ZoneSet:
    """cameras.yaml's `zones: {NAME: [[x, y], ...]}` and `lines: {NAME: [[x0, y0], [x1, y1]]}`; a refusal
    names `where` (the file and the camera) and the field."""
    parsed: dict[str, list[Any]] = {"zones": [], "lines": []}
    for field, value, make in (("zones", zones, _zone), ("lines", lines, _line)):
        if value is not None and not isinstance(value, Mapping):
            raise ZoneError(f"{where}, field {field}: a map of NAME: [[x, y], ...]")
        try:
            parsed[field] = [make((str(k), v)) for k, v in (value or {}).items()]
        except ZoneError as e:
            raise ZoneError(f"{where}, field {field}: {e}") from None
    try:
        return build(parsed["zones"], parsed["lines"])
    except ZoneError as e:
        raise ZoneError(f"{where}: {e}") from None


def _split(spec: str, flag: str, form: str) -> tuple[str, list[float]]:
    name, sep, rest = spec.partition(":")
    if not sep:
        raise ZoneError(f"{flag} {spec!r}: write {flag} {form}")
    try:
        values = [float(v) for v in rest.split(",")]
    except ValueError:
        raise ZoneError(f"{flag} {spec!r}: the coordinates must be numbers: write {flag} {form}") from None
    return name.strip(), values


def _items(value: object, what: str) -> list[object]:
    if not isinstance(value, list):
        raise ZoneError(f"{what} must be a list")
    return value


def _named(raw: object, what: str) -> tuple[str, object]:
    if not isinstance(raw, Mapping) or "name" not in raw or "points" not in raw:
        raise ZoneError(f'each {what} must be {{"name": ..., "points": [[x, y], ...]}}')
    return str(raw["name"]), raw["points"]


def _points(name: str, raw: object, what: str) -> tuple[Point, ...]:
    if not isinstance(raw, (list, tuple)) or len(raw) > MAX_POINTS:
        raise ZoneError(f"{what} {name}: points must be a list of [x, y] (at most {MAX_POINTS})")
    points = []
    for p in raw:
        if (not isinstance(p, (list, tuple)) or len(p) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)):
            raise ZoneError(f"{what} {name}: {p!r} is not a point [x, y] of numbers")
        x, y = float(p[0]), float(p[1])
        if x != x or y != y or abs(x) == float("inf") or abs(y) == float("inf"):
            raise ZoneError(f"{what} {name}: {p!r} is not a finite point")
        points.append((x, y))
    return tuple(points)


def _check_name(name: str, what: str) -> str:
    if not _NAME.fullmatch(name):
        raise ZoneError(f"{what} name {name!r}: use 1-64 letters, digits, '_', '.', '-', starting with a letter "
                        "or digit")
    return name


def _zone(item: tuple[str, object]) -> Zone:
    name = _check_name(item[0], "zone")
    points = _points(name, item[1], "zone")
    if len(points) < 3:
        raise ZoneError(f"zone {name}: a zone needs 3 points or more, but has {len(points)}")
    twice_area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]))
    if abs(twice_area) < 1e-9:
        raise ZoneError(f"zone {name}: its points enclose no area (they lie on one line)")
    return Zone(name, points)


def _line(item: tuple[str, object]) -> Line:
    name = _check_name(item[0], "line")
    points = _points(name, item[1], "line")
    if len(points) != 2:
        raise ZoneError(f"line {name}: a line is 2 points, but has {len(points)}")
    if points[0] == points[1]:
        raise ZoneError(f"line {name}: its two points are the same")
    return Line(name, points[0], points[1])
