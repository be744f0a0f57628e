"""One frame's result from a model: every object's mask and score (worker/model/session.py yields them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class FrameMasks:
    """Every object's mask on one frame, at the video's resolution."""

    frame_idx: int
    obj_ids: tuple[int, ...]
    masks: np.ndarray  # bool, shape (len(obj_ids), H, W)
    scores: np.ndarray  # float32, shape (len(obj_ids),), object presence probability in [0, 1]
    # The frame itself (H, W, 3 uint8 RGB) when the segmenter has already decoded it: the renderer uses
    # it instead of reading the JPEG a second time.
    image_rgb: np.ndarray | None = field(default=None, repr=False, compare=False)
    # A live session's frames are numbered as the session saw them (worker/sources/live.py); the model
    # process says which frame of the source each one was, since the picking happened there.
    source_idx: int | None = field(default=None, compare=False)
    # Jobs with labels: each object's (label, probability), given by the runner (worker/service/auto.py)
    labels: Mapping[int, tuple[str, float]] | None = field(default=None, compare=False)
    # Objects that came or went on this frame by the model's own doing (a SAM 3 session's text instances):
    # (obj_id, change, label) with change added | lost | returned; the runner writes each as an `object` entry
    changes: tuple[tuple[int, str, str], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.masks.ndim != 3 or self.masks.shape[0] != len(self.obj_ids):
            raise ValueError(
                f"masks must have shape (N, H, W) with N = {len(self.obj_ids)} objects, but got {self.masks.shape}"
            )
        if self.scores.shape != (len(self.obj_ids),):
            raise ValueError(f"scores must have shape ({len(self.obj_ids)},), but got {self.scores.shape}")
