"""Object prompts (points and boxes per object id and frame) and their validation.

Coordinates are pixels of the source video (x to the right, y down). Point labels: 1 foreground,
0 background. A prompt groups everything given for one object on one frame, because SAM 2 takes a
box and points for the same object and frame in one call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas.errors import PromptError


@dataclass(frozen=True)
class ObjectPrompt:
    """Points and/or a box for object `obj_id` on frame `frame_idx`."""

    obj_id: int
    frame_idx: int = 0
    points_xy: tuple[tuple[float, float], ...] = field(default_factory=tuple)
    labels: tuple[int, ...] = field(default_factory=tuple)
    box_xyxy: tuple[float, float, float, float] | None = None

    @classmethod
    def point(cls, obj_id: int, x: float, y: float, *, frame: int = 0, label: int = 1) -> ObjectPrompt:
        """A point on object `obj_id` (label 1 foreground, 0 background) on frame `frame`, in displayed pixels."""
        return cls(obj_id=obj_id, frame_idx=frame, points_xy=((float(x), float(y)),), labels=(label,))

    @classmethod
    def box(cls, obj_id: int, x0: float, y0: float, x1: float, y1: float, *, frame: int = 0) -> ObjectPrompt:
        """A box around object `obj_id` on frame `frame`, in displayed pixels."""
        return cls(obj_id=obj_id, frame_idx=frame, box_xyxy=(float(x0), float(y0), float(x1), float(y1)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "obj_id": self.obj_id,
            "frame_idx": self.frame_idx,
            "points_xy": [list(p) for p in self.points_xy],
            "labels": list(self.labels),
            "box_xyxy": list(self.box_xyxy) if self.box_xyxy is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ObjectPrompt:
        """Build from a decoded map, raising PromptError on anything malformed."""
        if not isinstance(data, dict):
            raise PromptError(f"a prompt must be a map with obj_id, frame_idx, points_xy, labels, box_xyxy; got {data!r}")
        try:
            obj_id = _int(data["obj_id"], "obj_id")
            frame_idx = _int(data.get("frame_idx", 0), "frame_idx")
            points = tuple((_num(p[0], "x"), _num(p[1], "y")) for p in (data.get("points_xy") or ()))
            if any(len(p) != 2 for p in (data.get("points_xy") or ())):
                raise PromptError("each point must be [x, y]")
            labels = tuple(_int(label, "label") for label in (data.get("labels") or ()))
            box_raw = data.get("box_xyxy")
            box = None
            if box_raw is not None:
                if len(box_raw) != 4:
                    raise PromptError(f"box_xyxy must have 4 numbers [x0, y0, x1, y1], got {box_raw!r}")
                box = (_num(box_raw[0], "x0"), _num(box_raw[1], "y0"), _num(box_raw[2], "x1"), _num(box_raw[3], "y1"))
        except KeyError as e:
            raise PromptError(f"prompt is missing field {e.args[0]!r}: {data!r}") from e
        except (TypeError, IndexError) as e:
            raise PromptError(f"prompt is malformed ({e}): {data!r}") from e
        prompt = cls(obj_id=obj_id, frame_idx=frame_idx, points_xy=points, labels=labels, box_xyxy=box)
        check_prompt_shape(prompt)
        return prompt


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PromptError(f"{name} must be an integer, but got {value!r}")
    return value


def _num(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PromptError(f"{name} must be a finite number, but got {value!r}")
    return float(value)


def check_prompt_shape(prompt: ObjectPrompt) -> None:
    """Checks that need no video: ids, labels, point/label counts, box corner order."""
    where = f"object {prompt.obj_id} on frame {prompt.frame_idx}"
    if prompt.obj_id < 0:
        raise PromptError(f"obj_id must be >= 0, but got {prompt.obj_id}")
    if prompt.frame_idx < 0:
        raise PromptError(f"frame index must be >= 0, but got {prompt.frame_idx} for object {prompt.obj_id}")
    if not prompt.points_xy and prompt.box_xyxy is None:
        raise PromptError(f"{where}: a prompt needs at least one point or a box")
    if len(prompt.points_xy) != len(prompt.labels):
        raise PromptError(
            f"{where}: {len(prompt.points_xy)} points but {len(prompt.labels)} labels; give one label per point"
        )
    for label in prompt.labels:
        if label not in (0, 1):
            raise PromptError(f"{where}: point label must be 1 (foreground) or 0 (background), but got {label}")
    if prompt.box_xyxy is not None:
        x0, y0, x1, y1 = prompt.box_xyxy
        if not (x1 > x0 and y1 > y0):
            raise PromptError(f"{where}: box must be X0,Y0,X1,Y1 with X1 > X0 and Y1 > Y0, but got {prompt.box_xyxy}")


def validate_prompts(
    prompts: Sequence[ObjectPrompt], *, width: int, height: int, num_frames: int, allow_none: bool = False,
    frame_word: bool = True,
) -> None:
    """Raise PromptError unless every prompt lies inside a `width`x`height` video of `num_frames` frames.
    `allow_none`: a job with automatic prompts (`--auto`) may name no object itself; `frame_word` False: the
    prompts name no frame (@now, a live job's), so the message does not name one either."""
    if not prompts and not allow_none:
        raise PromptError("no prompts: give at least one --point OBJ:X,Y or --box OBJ:X0,Y0,X1,Y1, or --auto to find "
                          "the objects automatically")
    seen: set[tuple[int, int]] = set()
    for prompt in prompts:
        check_prompt_shape(prompt)
        key = (prompt.obj_id, prompt.frame_idx)
        if key in seen:
            raise PromptError(
                f"object {prompt.obj_id} has two prompts on frame {prompt.frame_idx}; merge them into one"
            )
        seen.add(key)
        if prompt.frame_idx >= num_frames:
            raise PromptError(
                f"prompt for object {prompt.obj_id} is on frame {prompt.frame_idx}, but the decoded video has "
                f"{num_frames} frames (0..{num_frames - 1})"
            )
        where = f"object {prompt.obj_id} on frame {prompt.frame_idx}" if frame_word else f"object {prompt.obj_id}"
        for x, y in prompt.points_xy:
            if not (0 <= x <= width and 0 <= y <= height):
                raise PromptError(f"{where}: point ({x:g}, {y:g}) is outside the {width}x{height} frame (x in "
                                  f"0..{width}, y in 0..{height})")
        if prompt.box_xyxy is not None:
            x0, y0, x1, y1 = prompt.box_xyxy
            if not all(0 <= x <= width for x in (x0, x1)) or not all(0 <= y <= height for y in (y0, y1)):
                raise PromptError(f"{where}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is outside the {width}x{height} "
                                  f"frame (x in 0..{width}, y in 0..{height})")


def object_ids(prompts: Iterable[ObjectPrompt]) -> list[int]:
    """Sorted distinct object ids of `prompts`."""
    return sorted({p.obj_id for p in prompts})
