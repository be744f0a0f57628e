"""Checks on rendered pixels: where was an object's colour blended in, and how well does that match."""

from __future__ import annotations

import cv2
import numpy as np


def tinted_mask(
    rendered_bgr: np.ndarray, original_bgr: np.ndarray, colour: tuple[int, int, int], *, min_gain: float = 0.3
) -> np.ndarray:
    """Pixels that moved toward `colour` by at least `min_gain` of their original distance to it.

    A mask blended at alpha moves its pixels a fraction alpha of the way to the colour (the outline all
    the way), so with alpha = 0.5 a tinted pixel gains about 0.5; codec noise stays well under 0.3.
    Pixels whose original colour is already within 40 of `colour` cannot be told apart and count as untinted.
    """
    if rendered_bgr.shape != original_bgr.shape:
        raise ValueError(f"rendered and original must have the same shape, but got {rendered_bgr.shape} vs {original_bgr.shape}")
    target = np.asarray(colour, dtype=np.float32)
    before = np.linalg.norm(original_bgr.astype(np.float32) - target, axis=2)
    after = np.linalg.norm(rendered_bgr.astype(np.float32) - target, axis=2)
    by_colour = (before > 40) & (before - after >= min_gain * before)
    # yuv420p keeps brightness at full resolution and colour at half, so where the tint changes the
    # brightness clearly, judge by brightness: edges stay sharp there.
    luma_orig = _luma(original_bgr)
    expected = 0.5 * (_luma(np.broadcast_to(np.asarray(colour, np.uint8), original_bgr.shape)) - luma_orig)
    moved = (_luma(rendered_bgr) - luma_orig) * np.sign(expected)
    # ... and ask only that the colour moved toward the tint at all, which the label's dark box does not
    by_luma = (moved >= 0.5 * np.abs(expected)) & (before - after >= 0.1 * before)
    return np.where(np.abs(expected) >= 8, by_luma, by_colour)


def _luma(bgr: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(bgr, dtype=np.uint8), cv2.COLOR_BGR2YCrCb)[..., 0].astype(np.float32)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def disc(size_hw: tuple[int, int], centre_xy: tuple[float, float], radius: float) -> np.ndarray:
    """Boolean disc mask of shape `size_hw`."""
    yy, xx = np.mgrid[: size_hw[0], : size_hw[1]]
    return (xx - centre_xy[0]) ** 2 + (yy - centre_xy[1]) ** 2 <= radius**2


def near_box(mask: np.ndarray, margin: int = 1) -> np.ndarray:
    """The mask's bounding box grown by `margin` pixels: where its tint and outline may be, leaving out
    the id label drawn above the box (whose border is in the object's colour too)."""
    out = np.zeros(mask.shape, dtype=bool)
    ys, xs = np.nonzero(mask)
    if len(xs):
        out[max(0, ys.min() - margin): ys.max() + margin + 1, max(0, xs.min() - margin): xs.max() + margin + 1] = True
    return out
