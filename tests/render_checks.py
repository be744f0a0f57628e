"""Checks on rendered pixels: where was an object's colour blended in, and how well does that match."""

from __future__ import annotations

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
    return (before > 40) & (before - after >= min_gain * before)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def disc(size_hw: tuple[int, int], centre_xy: tuple[float, float], radius: float) -> np.ndarray:
    """Boolean disc mask of shape `size_hw`."""
    yy, xx = np.mgrid[: size_hw[0], : size_hw[1]]
    return (xx - centre_xy[0]) ** 2 + (yy - centre_xy[1]) ** 2 <= radius**2
