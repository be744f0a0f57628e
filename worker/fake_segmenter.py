"""A deterministic Segmenter for plumbing tests: an object is "the blob of its prompt's colour".

For each object, the reference colour is read at its prompt (first foreground point, else the box
centre) on the object's earliest prompt frame. On every frame the mask is the largest connected
region of pixels within `tolerance` (max absolute BGR difference) of that colour, so JPEG noise
elsewhere does not leak in. No model, no GPU: tests of the queue, leases and rendering use it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import cv2
import numpy as np

from schemas.errors import PromptError, StorageError
from schemas.prompts import ObjectPrompt
from schemas.storage import frame_name
from worker.frames import FrameSource
from worker.segment import FrameMasks

logger = logging.getLogger(__name__)


def read_frame(frames_dir: Path, frame_idx: int) -> np.ndarray:
    """Read frame `frame_idx` of `frames_dir` as BGR uint8, or raise StorageError."""
    path = frames_dir / frame_name(frame_idx)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise StorageError(f"cannot read frame {path}: missing or not a JPEG image")
    return image


def prompt_xy(prompt: ObjectPrompt) -> tuple[float, float]:
    """Where to sample an object's colour: its first foreground point, else its box centre, else its first point."""
    for (x, y), label in zip(prompt.points_xy, prompt.labels):
        if label == 1:
            return x, y
    if prompt.box_xyxy is not None:
        x0, y0, x1, y1 = prompt.box_xyxy
        return (x0 + x1) / 2, (y0 + y1) / 2
    if prompt.points_xy:
        return prompt.points_xy[0]
    raise PromptError(f"object {prompt.obj_id} on frame {prompt.frame_idx}: a prompt needs a point or a box")


def sample_colour(image: np.ndarray, x: float, y: float) -> np.ndarray:
    """Median BGR colour of the 3x3 neighbourhood of (x, y), clamped to the image (robust to JPEG noise)."""
    height, width = image.shape[:2]
    col = min(max(int(round(x)), 0), width - 1)
    row = min(max(int(round(y)), 0), height - 1)
    patch = image[max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2].reshape(-1, 3)
    return np.median(patch, axis=0).astype(np.int16)


def colour_mask(image: np.ndarray, colour: np.ndarray, tolerance: int) -> np.ndarray:
    """Largest 8-connected region of pixels within `tolerance` of `colour` (max abs BGR difference)."""
    close = np.abs(image.astype(np.int16) - colour).max(axis=2) <= tolerance
    count, labels, stats, _ = cv2.connectedComponentsWithStats(close.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros(close.shape, dtype=bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == largest


def first_prompts(prompts: Sequence[ObjectPrompt]) -> dict[int, ObjectPrompt]:
    """Each object's prompt on its earliest frame."""
    first: dict[int, ObjectPrompt] = {}
    for prompt in prompts:
        current = first.get(prompt.obj_id)
        if current is None or prompt.frame_idx < current.frame_idx:
            first[prompt.obj_id] = prompt
    return first


class ColourSegmenter:
    """Segmenter that tracks each object as the largest blob of its prompt's colour."""

    name = "fake-colour"
    random_weights = False

    def __init__(
        self, tolerance: int = 60, *, delay_s: float = 0.0, fail_at_frame: int | None = None
    ) -> None:
        if not 0 <= tolerance <= 255:
            raise ValueError(f"tolerance must be in 0..255 (max abs BGR difference), but got {tolerance}")
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, but got {delay_s}")
        self.tolerance = tolerance
        self.delay_s = delay_s
        self.fail_at_frame = fail_at_frame

    def reference_colours(self, frames: FrameSource, prompts: Sequence[ObjectPrompt]) -> dict[int, np.ndarray]:
        """BGR colour of each object at its earliest prompt, keyed by obj_id."""
        colours: dict[int, np.ndarray] = {}
        for obj_id, prompt in sorted(first_prompts(prompts).items()):
            if not frames.wait(prompt.frame_idx):
                raise PromptError(
                    f"prompt for object {obj_id} is on frame {prompt.frame_idx}, but the video has "
                    f"{frames.total} frames (0..{(frames.total or 0) - 1})"
                )
            x, y = prompt_xy(prompt)
            colours[obj_id] = sample_colour(read_frame(frames.dir, prompt.frame_idx), x, y)
            logger.debug("object %d: reference colour %s from frame %d", obj_id, colours[obj_id].tolist(), prompt.frame_idx)
        return colours

    def segment(
        self, frames: FrameSource, prompts: Sequence[ObjectPrompt], *, width: int = 0, height: int = 0
    ) -> Iterator[FrameMasks]:
        """Yield FrameMasks for every frame, in order (as frames arrive), each with every prompted object."""
        if not prompts:
            raise PromptError("no prompts: give at least one point or box")
        colours = self.reference_colours(frames, prompts)
        obj_ids = tuple(colours)
        for frame_idx in frames:
            if self.fail_at_frame is not None and frame_idx == self.fail_at_frame:
                raise RuntimeError(f"fake failure at frame {frame_idx}")
            if self.delay_s:
                time.sleep(self.delay_s)
            image = read_frame(frames.dir, frame_idx)
            masks = np.stack([colour_mask(image, colours[obj_id], self.tolerance) for obj_id in obj_ids])
            scores = cast(np.ndarray, masks.any(axis=(1, 2)).astype(np.float32))
            yield FrameMasks(frame_idx=frame_idx, obj_ids=obj_ids, masks=masks, scores=scores)
