"""Masks as COCO RLE `{size: [h, w], counts: bytes}`, via pycocotools (the format SAM 2's demo uses).

pycocotools is the reference implementation every COCO tool reads, so backends decode our masks with
`pycocotools.mask.decode` and get exactly our pixels.
"""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np
from pycocotools import _mask
from pycocotools import mask as mask_utils


class Rle(TypedDict):
    size: list[int]
    counts: bytes


def encode_mask(mask: np.ndarray) -> Rle:
    """Encode a 2D boolean (or 0/1) mask of shape (H, W) as COCO RLE."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        shape = getattr(mask, "shape", type(mask).__name__)
        raise ValueError(f"mask must be a 2D np.ndarray of shape (H, W), but got {shape}")
    height, width = mask.shape
    # Run lengths in column-major order (COCO's), found with numpy, which lets go of the GIL for each
    # whole-array step; pycocotools then only packs the runs into its string. The same bytes as
    # mask_utils.encode (tests/test_schemas.py), whose per-pixel loop holds the GIL and would stall
    # the model's thread, which launches its GPU work from Python.
    flat = np.ascontiguousarray(mask.T).reshape(-1).astype(bool, copy=False).view(np.uint8)
    if flat.size == 0:
        counts = np.zeros(1, dtype=np.uint32)  # one empty run of zeros, as pycocotools writes it
    else:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        bounds = np.concatenate(([0], change, [flat.size]))
        counts = np.diff(bounds).astype(np.uint32)
        if flat[0]:  # COCO counts start with a (possibly empty) run of zeros
            counts = np.concatenate((np.zeros(1, dtype=np.uint32), counts))
    rle = _mask.frUncompressedRLE([{"size": [height, width], "counts": counts}], height, width)[0]
    return {"size": [int(height), int(width)], "counts": bytes(rle["counts"])}


def _coco(rle: Rle | dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def decode_mask(rle: Rle | dict[str, Any]) -> np.ndarray:
    """Decode COCO RLE (counts as bytes or str) to a boolean array of shape (H, W)."""
    return np.asarray(mask_utils.decode(_coco(rle)), dtype=bool)


def rle_area(rle: Rle | dict[str, Any]) -> int:
    """Number of foreground pixels."""
    return int(mask_utils.area(_coco(rle)))


def rle_bbox_xyxy(rle: Rle | dict[str, Any]) -> list[float]:
    """Tight box [x0, y0, x1, y1] with x1, y1 exclusive (x1 - x0 = width); [0, 0, 0, 0] when empty."""
    x, y, w, h = (float(v) for v in mask_utils.toBbox(_coco(rle)))
    return [x, y, x + w, y + h]


def mask_bbox_xyxy(mask: np.ndarray) -> list[float]:
    """Same box as rle_bbox_xyxy, computed from a dense (H, W) mask."""
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    rows = np.flatnonzero(mask.any(axis=1))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def rle_to_json(rle: Rle | dict[str, Any]) -> dict[str, Any]:
    """RLE with `counts` as an ASCII string, for JSON files (pycocotools accepts both)."""
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
