"""Drawing masks on frames for the renders (worker/output/render.py, worker/output/hls.py), and the encoder's
frame: each object gets a stable colour (`colour_for`), its mask blended in at `alpha`, a 2-px outline drawn
just inside the mask's edge (so pixels outside a mask are never touched), and the object id (or its label)
written above the mask's bounding box on a dark label. Also the frame-rate, size and path rules both
writers follow."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

# Saturated BGR colours, none of them pure green (green screens and foliage are common subjects).
# Indexed by obj_id (ids usually start at 1). Colours differ in brightness as well as hue, because
# H.264's yuv420p keeps brightness at full resolution but colour at half: a tint that changes the
# brightness keeps sharp edges in the MP4.
PALETTE_BGR: tuple[tuple[int, int, int], ...] = (
    (0, 128, 255),  # orange
    (255, 64, 0),  # blue
    (255, 0, 255),  # magenta
    (0, 0, 255),  # red
    (255, 255, 0),  # cyan
    (0, 255, 255),  # yellow
    (255, 0, 128),  # violet
    (128, 0, 255),  # pink
    (0, 64, 160),  # brown
    (255, 128, 128),  # light blue
)

OUTLINE_PX = 2
LABEL_BG_BGR = (32, 32, 32)
LABEL_FG_BGR = (255, 255, 255)
LABEL_PAD_PX = 2
_FONT = cv2.FONT_HERSHEY_SIMPLEX

# NTSC-style rates N*1000/1001 are snapped to the exact fraction when fps is this close (relative).
_NTSC_REL_TOL = 1e-5


def colour_for(obj_id: int) -> tuple[int, int, int]:
    """Stable BGR colour of object `obj_id`: a fixed palette first, then a hash-derived saturated hue."""
    if 0 <= obj_id < len(PALETTE_BGR):
        return PALETTE_BGR[obj_id]
    # Knuth multiplicative hash -> hue in OpenCV's 0..179 scale, skipping the greens (hue 45..75).
    h = (obj_id * 2654435761) & 0xFFFFFFFF
    hue = (h % 150) + (30 if h % 150 >= 45 else 0)
    hsv = np.array([[[hue, 255, 255]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def check_frame(frame_bgr: Any, what: str = "frame_bgr") -> tuple[int, int]:
    """Return (H, W) of a BGR uint8 image, or raise ValueError saying what was expected."""
    if not isinstance(frame_bgr, np.ndarray) or frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3:
        shape = getattr(frame_bgr, "shape", type(frame_bgr).__name__)
        raise ValueError(f"{what} must be an np.ndarray of shape (H, W, 3), but got {shape}")
    if frame_bgr.dtype != np.uint8:
        raise ValueError(f"{what} must have dtype uint8, but got {frame_bgr.dtype}")
    return int(frame_bgr.shape[0]), int(frame_bgr.shape[1])


def check_masks(masks: Any, obj_ids: Sequence[int], size_hw: tuple[int, int]) -> None:
    """Raise ValueError unless `masks` is a bool array of shape (len(obj_ids), H, W)."""
    expected = (len(obj_ids), *size_hw)
    if not isinstance(masks, np.ndarray) or masks.shape != expected:
        shape = getattr(masks, "shape", type(masks).__name__)
        raise ValueError(
            f"masks must be an np.ndarray of shape (N, H, W) = {expected} "
            f"({len(obj_ids)} objects on a {size_hw[1]}x{size_hw[0]} frame), but got {shape}"
        )
    if masks.dtype != np.bool_:
        raise ValueError(f"masks must have dtype bool, but got {masks.dtype}")


def _bbox_slices(mask: np.ndarray) -> tuple[slice, slice] | None:
    """Row and column slices of the tight bounding box of `mask`, or None when it is empty."""
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask).view(np.uint8))
    if w == 0 or h == 0:
        return None
    return slice(y, y + h), slice(x, x + w)


_OUTLINE_KERNEL = np.ones((2 * OUTLINE_PX + 1, 2 * OUTLINE_PX + 1), np.uint8)


def _inner_outline(mask_u8: np.ndarray) -> np.ndarray:
    """uint8 band OUTLINE_PX wide along every mask edge (outer and hole borders), inside the mask: the
    mask minus its erosion (outside the crop counts as outside the mask). Cost does not grow with how
    ragged the mask is, unlike tracing contours."""
    eroded = cv2.erode(mask_u8, _OUTLINE_KERNEL, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return cv2.subtract(mask_u8, eroded)


def _label_scale(size_hw: tuple[int, int]) -> tuple[float, int]:
    """Font scale and stroke thickness that stay legible from 120p to 4K."""
    scale = max(0.4, min(size_hw) / 900.0)
    return scale, 1 if scale < 1.0 else 2


@functools.lru_cache(maxsize=1024)
def _text_size(text: str, scale: float, thickness: int) -> tuple[tuple[int, int], int]:
    return cv2.getTextSize(text, _FONT, scale, thickness)  # type: ignore[return-value]


def _draw_label(image: np.ndarray, text: str, x0: int, y0: int, y1: int, colour: tuple[int, int, int]) -> None:
    # LABEL_BG_BGR and LABEL_FG_BGR are greys: the same in either channel order
    """Write `text` above the box top-left (x0, y0) when it fits, else just inside it."""
    height, width = image.shape[:2]
    scale, thickness = _label_scale((height, width))
    (text_w, text_h), baseline = _text_size(text, scale, thickness)
    box_w = text_w + 2 * LABEL_PAD_PX
    box_h = text_h + baseline + 2 * LABEL_PAD_PX
    top = y0 - box_h if y0 - box_h >= 0 else min(y0, max(0, height - box_h))
    left = min(max(0, x0), max(0, width - box_w))
    cv2.rectangle(image, (left, top), (left + box_w - 1, top + box_h - 1), LABEL_BG_BGR, thickness=-1)
    cv2.rectangle(image, (left, top), (left + box_w - 1, top + box_h - 1), colour, thickness=1)
    origin = (left + LABEL_PAD_PX, top + LABEL_PAD_PX + text_h)
    cv2.putText(image, text, origin, _FONT, scale, LABEL_FG_BGR, thickness, cv2.LINE_AA)


def draw_masks(frame: np.ndarray, obj_ids: Sequence[int], masks: np.ndarray, alpha: float = 0.5, *, rgb: bool = False,
               names: Mapping[int, str] | None = None) -> np.ndarray:
    """Return a copy of `frame` (BGR, or RGB when `rgb`) with each object's mask tinted, outlined and
    labelled with its id (and its name from `names`, a job's labels: "3 person")."""
    size_hw = check_frame(frame)
    check_masks(masks, obj_ids, size_hw)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], but got {alpha}")
    out = frame.copy()
    labels: list[tuple[int, int, int, int]] = []  # obj_id, x0, y0, y1
    for obj_id, mask in zip(obj_ids, masks):
        box = _bbox_slices(mask)
        if box is None:
            continue
        rows, cols = box
        colour = _in_order(colour_for(obj_id), rgb)
        crop = out[rows, cols]  # a view: OpenCV writes into `out` through it
        mask_u8 = np.ascontiguousarray(mask[rows, cols]).view(np.uint8)
        # blend the whole box with OpenCV's SIMD arithmetic, then copy it in only where the mask is
        tint = _solid(crop.shape[:2], colour)
        blended = cv2.addWeighted(crop, 1.0 - alpha, tint, alpha, 0.0)
        cv2.copyTo(blended, mask_u8, crop)
        cv2.copyTo(tint, _inner_outline(mask_u8), crop)
        labels.append((obj_id, cols.start, rows.start, rows.stop))
    # Labels go last so no later mask covers them.
    for obj_id, x0, y0, y1 in labels:
        text = f"{obj_id} {names[obj_id]}" if names and names.get(obj_id) else str(obj_id)
        _draw_label(out, text, x0, y0, y1, _in_order(colour_for(obj_id), rgb))
    return out


def _solid(size_hw: tuple[int, int], colour: tuple[int, int, int]) -> np.ndarray:
    """An image of one colour (three memsets and a merge: NumPy's broadcast fill is ten times slower)."""
    return cv2.merge([np.full(size_hw, c, np.uint8) for c in colour])


def _in_order(colour_bgr: tuple[int, int, int], rgb: bool) -> tuple[int, int, int]:
    return (colour_bgr[2], colour_bgr[1], colour_bgr[0]) if rgb else colour_bgr


def frame_rate(fps: float | Fraction) -> Fraction:
    """Exact frame rate: integers stay integers, 29.97 -> 30000/1001, others limited to denominator 1001."""
    if isinstance(fps, Fraction):
        rate = fps
    else:
        if not math.isfinite(fps):
            raise ValueError(f"fps must be a finite number > 0, but got {fps}")
        rate = Fraction(fps)
        if rate.denominator != 1:
            ntsc = round(fps * 1001 / 1000)
            if ntsc > 0 and abs(fps - ntsc * 1000 / 1001) <= _NTSC_REL_TOL * fps:
                rate = Fraction(ntsc * 1000, 1001)
            else:
                rate = rate.limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be > 0, but got {fps}")
    return rate


def even_size(width: int, height: int) -> tuple[int, int]:
    """Encoded (width, height): yuv420p needs even dimensions, so odd ones grow by one pixel."""
    return width + width % 2, height + height % 2


def pad_to_even(image: np.ndarray) -> np.ndarray:
    """Replicate the last column/row when width/height is odd; every source pixel keeps its position."""
    height, width = image.shape[:2]
    pad_w, pad_h = width % 2, height % 2
    if not (pad_w or pad_h):
        return image
    return cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE)


def encoder_frame(frame: np.ndarray, obj_ids: Sequence[int], masks: np.ndarray, size_wh: tuple[int, int], *,
                  rgb: bool = False, names: Mapping[int, str] | None = None) -> av.VideoFrame:
    """`frame` (BGR, or RGB when `rgb`; the writer's `size_wh`, else ValueError) with `masks` drawn, as a yuv420p
    frame without pts (OpenCV's SIMD 4:2:0, BT.601 video range as FFmpeg's, costs a tenth of swscale's)."""
    if (size_hw := check_frame(frame)) != (size_wh[1], size_wh[0]):
        raise ValueError(f"frame must be {size_wh[0]}x{size_wh[1]} (W x H) like the writer, but got {size_hw[1]}x{size_hw[0]}")
    drawn = pad_to_even(draw_masks(frame, obj_ids, masks, rgb=rgb, names=names))
    yuv: np.ndarray = cv2.cvtColor(drawn, cv2.COLOR_RGB2YUV_I420 if rgb else cv2.COLOR_BGR2YUV_I420)
    return av.VideoFrame.from_ndarray(yuv, format="yuv420p")


def partial_path(path: Path, tag: str = "") -> Path:
    """Temporary file a writer fills before renaming it to `path` (same directory, so the rename is atomic).

    `tag` (the worker's name) keeps two workers on the same job from writing one temporary file."""
    return path.with_name(f".{path.name}.{tag}.partial" if tag else f".{path.name}.partial")


def storage_root_of(path: Path) -> Path:
    """STORAGE_ROOT of a job's render target (`STORAGE_ROOT/jobs/<id>/render.mp4`, schemas/storage.py), or
    the target's own directory for a path laid out otherwise."""
    if path.parent.parent.name == "jobs" and len(path.parents) >= 3:
        return path.parents[2]
    return path.parent
