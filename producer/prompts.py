"""Prompts from the command line and from JSON, grouped per object and frame.

Command line:
    --point OBJ:X,Y[:LABEL][@FRAME]     label 1 foreground (default) or 0 background; frame default 0
    --box   OBJ:X0,Y0,X1,Y1[@FRAME]

JSON (`--prompts FILE.json`): a list of
    {"obj_id": 1, "frame_idx": 0, "points": [[x, y], ...], "labels": [1, ...], "box": [x0, y0, x1, y1]}
`frame_idx` defaults to 0, `labels` to all 1; the wire names `points_xy` / `box_xyxy` work too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from schemas.errors import PromptError
from schemas.prompts import ObjectPrompt, check_prompt_shape

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_POINT = re.compile(rf"^(\d+):({_NUM}),({_NUM})(?::([01]))?(?:@(\d+))?$")
_BOX = re.compile(rf"^(\d+):({_NUM}),({_NUM}),({_NUM}),({_NUM})(?:@(\d+))?$")
POINT_SYNTAX = "OBJ:X,Y[:LABEL][@FRAME], e.g. 1:320,240 or 2:10.5,20:0@5"
BOX_SYNTAX = "OBJ:X0,Y0,X1,Y1[@FRAME], e.g. 3:0,0,50,60@2"


def parse_point(spec: str) -> tuple[int, int, tuple[float, float], int]:
    """'1:100,200:0@5' -> (obj_id 1, frame 5, (100.0, 200.0), label 0)."""
    m = _POINT.match(spec.replace(" ", ""))
    if not m:
        raise PromptError(f"bad --point {spec!r}: expected {POINT_SYNTAX}")
    obj, x, y, label, frame = m.groups()
    return int(obj), int(frame or 0), (float(x), float(y)), int(label if label is not None else 1)


def parse_box(spec: str) -> tuple[int, int, tuple[float, float, float, float]]:
    """'3:0,0,50,60@2' -> (obj_id 3, frame 2, (0.0, 0.0, 50.0, 60.0))."""
    m = _BOX.match(spec.replace(" ", ""))
    if not m:
        raise PromptError(f"bad --box {spec!r}: expected {BOX_SYNTAX}")
    obj, x0, y0, x1, y1, frame = m.groups()
    return int(obj), int(frame or 0), (float(x0), float(y0), float(x1), float(y1))


def _from_json(json_file: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(Path(json_file).read_text())
    except FileNotFoundError as e:
        raise PromptError(f"prompts file not found: {json_file}") from e
    except OSError as e:  # a directory, no permission, ...
        raise PromptError(f"prompts file {json_file} cannot be read: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PromptError(f"prompts file {json_file} is not valid JSON: {e}") from e
    if not isinstance(doc, list):
        raise PromptError(f"prompts file {json_file} must hold a JSON list of prompts, not {type(doc).__name__}")
    out = []
    for i, item in enumerate(doc):
        if not isinstance(item, dict):
            raise PromptError(f"prompts file {json_file}, item {i}: expected an object, got {item!r}")
        points = item.get("points", item.get("points_xy")) or []
        labels = item.get("labels")
        wire = {
            "obj_id": item.get("obj_id"),
            "frame_idx": item.get("frame_idx", 0),
            "points_xy": points,
            "labels": labels if labels is not None else [1] * len(points),
            "box_xyxy": item.get("box", item.get("box_xyxy")),
        }
        if wire["obj_id"] is None:
            raise PromptError(f"prompts file {json_file}, item {i}: missing obj_id")
        out.append(wire)
    return out


def merge_prompts(prompts: Sequence[ObjectPrompt]) -> list[ObjectPrompt]:
    """One ObjectPrompt per (obj_id, frame_idx): the points of each, and its one box (two boxes raise
    PromptError), ordered by frame then object."""
    grouped: dict[tuple[int, int], list[ObjectPrompt]] = {}
    for p in prompts:
        grouped.setdefault((p.obj_id, p.frame_idx), []).append(p)
    out = []
    for (obj_id, frame_idx), group in sorted(grouped.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        boxes = [p.box_xyxy for p in group if p.box_xyxy is not None]
        if len(boxes) > 1:
            raise PromptError(f"object {obj_id} has two boxes on frame {frame_idx}; SAM 2 takes one box per object "
                              "and frame")
        prompt = ObjectPrompt(obj_id=obj_id, frame_idx=frame_idx,
                              points_xy=tuple(xy for p in group for xy in p.points_xy),
                              labels=tuple(label for p in group for label in p.labels),
                              box_xyxy=boxes[0] if boxes else None)
        check_prompt_shape(prompt)
        out.append(prompt)
    return out


def build_prompts(
    points: Sequence[str] = (), boxes: Sequence[str] = (), json_file: Path | None = None
) -> list[ObjectPrompt]:
    """One ObjectPrompt per (obj_id, frame_idx), from CLI specs and/or a JSON file (`merge_prompts`)."""
    parts: list[ObjectPrompt] = []
    for spec in points:
        obj_id, frame_idx, xy, label = parse_point(spec)
        parts.append(ObjectPrompt(obj_id=obj_id, frame_idx=frame_idx, points_xy=(xy,), labels=(label,)))
    for spec in boxes:
        obj_id, frame_idx, box = parse_box(spec)
        parts.append(ObjectPrompt(obj_id=obj_id, frame_idx=frame_idx, box_xyxy=box))
    if json_file is not None:
        parts += [ObjectPrompt.from_dict(wire) for wire in _from_json(json_file)]
    return merge_prompts(parts)
