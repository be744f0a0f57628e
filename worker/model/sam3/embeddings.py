"""An embedding of one instance from a running TextTracker, for re-identification (worker/model/reid.py).

Three kinds, measured against each other (and against CLIP) by bench/bench_reid.py:

    object_pointer(tracker, obj_id, frame_idx)      SAM's object pointer for a tracked instance: the vector its
                                                    memory attention reads to know "which object" (hidden_dim,
                                                    128 tiny / 256 real)
    mask_object_pointer(tracker, mask, frame_idx)   the pointer SAM makes for any mask (a new detection's
                                                    conditioning pointer): the same head, driven by a mask
    pooled_features(tracker, mask, frame_idx)       the frame's backbone features averaged under a mask, per FPN
                                                    level, each level unit length, concatenated
    colour_histogram(image_rgb, mask)               model-free: an HSV 8x8x2 histogram of the masked pixels

When each can still be read. The tracker holds frames back for the hot start: `step` on frame f computes
frame f and releases frame f - (hotstart_delay - 1) = f - 14 (the library's delay, 15 frames; `finish`
releases the rest). So a frame's embedding must come from what the session still keeps:

- Object pointers live in `session.output_dict_per_obj[idx]["cond_frame_outputs" | "non_cond_frame_outputs"]
  [frame_idx]["object_pointer"]`; `bounded.prune` keeps each object's last 16 tracked outputs (frames f-15..f
  after computing f) and, for a file job, every conditioning output. The frame released by the same `step`
  (f-14) is inside that: read the pointer of every instance on a released frame *right after the `step` that
  released it*, and keep the newest per id. When an id shows up in `removed_ids` (released frame r+1), its
  last pointer (frame r) was read at the previous release; by now it may be gone from the session (the hot
  start or the keep-alive removed the object, taking its outputs), so the caller files the one it kept.
- Vision features are cached for one frame only (`max_vision_features_cache_size` = 1): the frame just
  computed, f, which is 14 frames *ahead* of the one released. `pooled_features` and `mask_object_pointer`
  therefore work on the newest frame only (None otherwise): the caller pools right after `step`, with the
  tracker's own mask of frame f (`tracked_mask`), keeps it per id, and files it 14 frames later if the
  instance was removed by then (an instance hidden by the hot start never reaches the caller anyway).
  One more gap: when a frame removes the session's last instance, the library resets the session and its
  cache with it (`remove_object` -> `reset_inference_session`), so that frame has no features either.
- `colour_histogram` needs only the frame and the released mask: any time, but the caller keeps the RGB
  frames of the last 15 steps (or computes it on the frame when it is given, with `tracked_mask`).

Nothing here changes the session; reading an id that the session does not hold gives None (the library's
`obj_id_to_idx` would create an entry: it is never called with an unknown id).
"""

from __future__ import annotations

import logging
from typing import Any

import cv2
import numpy as np
import torch

from worker.model.reid import HSV_BINS, colour_histogram
from worker.model.sam3.tracker import TextTracker

__all__ = ["HSV_BINS", "colour_histogram", "mask_object_pointer", "object_pointer", "pooled_features", "tracked_mask"]

log = logging.getLogger(__name__)



def _obj_idx(tracker: TextTracker, obj_id: int) -> int | None:
    session = tracker.session
    return session.obj_id_to_idx(obj_id) if obj_id in session.obj_ids else None


def _frame_output(tracker: TextTracker, obj_id: int, frame_idx: int) -> dict[str, Any] | None:
    idx = _obj_idx(tracker, obj_id)
    if idx is None:
        return None
    outputs = tracker.session.output_dict_per_obj.get(idx, {})
    for key in ("cond_frame_outputs", "non_cond_frame_outputs"):
        out = outputs.get(key, {}).get(frame_idx)
        if out is not None:
            return dict(out)
    return None


def _vector(value: torch.Tensor) -> np.ndarray:
    return value.detach().float().cpu().reshape(-1).numpy().astype(np.float32)


def object_pointer(tracker: TextTracker, obj_id: int, frame_idx: int) -> np.ndarray | None:
    """SAM's object pointer of instance `obj_id` on `frame_idx` (float32, hidden_dim); None when the session
    no longer holds that output (see the module doc for how long it does)."""
    out = _frame_output(tracker, obj_id, frame_idx)
    pointer = None if out is None else out.get("object_pointer")
    return None if pointer is None else _vector(pointer)


def tracked_mask(tracker: TextTracker, obj_id: int, frame_idx: int) -> np.ndarray | None:
    """The tracker's own mask of `obj_id` on `frame_idx` at the model's square input size (bool, S x S), before
    the hot start's verdict and postprocessing; None when the session no longer holds that output."""
    out = _frame_output(tracker, obj_id, frame_idx)
    logits = None if out is None else out.get("high_res_masks")
    return None if logits is None else (logits.detach().float().cpu()[0, 0] > 0).numpy()


def _weights(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """A mask (bool or [0, 1] float, any resolution) as per-cell weights on a feature grid (area resampling:
    the frame is resized to the model's square the same way, so the grid lines up)."""
    m = np.asarray(mask, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H x W), but got shape {m.shape}")
    return cv2.resize(m, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_AREA)


def pooled_features(tracker: TextTracker, mask: np.ndarray, frame_idx: int) -> np.ndarray | None:
    """The backbone features of `frame_idx` averaged under `mask`, per FPN level (each made unit length, then
    concatenated: 16+32+128 values tiny, 32+64+256 real). None when the frame's features are no longer cached
    (only the newest frame is) or the mask covers less than a thousandth of a cell at every level."""
    cached = tracker.session.cache.get_vision_features(frame_idx)
    if cached is None:
        return None
    sizes = tracker._model.tracker_model.backbone_feature_sizes  # [[h, w] per level], fine to coarse
    parts = []
    for feats, (h, w) in zip(cached["vision_feats"], sizes):  # each (h*w, 1, C)
        cells = feats.detach().float().cpu()[:, 0, :].numpy()  # (h*w, C)
        weights = _weights(mask, (h, w)).reshape(-1)
        total = float(weights.sum())
        if total < 1e-3:
            return None
        pooled = weights @ cells / total
        norm = float(np.linalg.norm(pooled))
        parts.append(pooled / norm if norm > 0 else pooled)
    return np.concatenate(parts).astype(np.float32)


def mask_object_pointer(tracker: TextTracker, mask: np.ndarray, frame_idx: int) -> np.ndarray | None:
    """The object pointer SAM's tracker makes for `mask` on `frame_idx` (as for a new detection, whose mask
    conditions the tracker): its mask decoder driven by the mask on the frame's features. None when the
    frame's features are no longer cached (only the newest frame is) or the mask is empty."""
    cached = tracker.session.cache.get_vision_features(frame_idx)
    m = np.asarray(mask, dtype=np.float32)
    if cached is None or not m.any():
        return None
    model: Any = tracker._model.tracker_model
    sizes = model.backbone_feature_sizes
    feats = cached["vision_feats"]
    high_res = [x.permute(1, 2, 0).reshape(x.size(1), x.size(2), *s) for x, s in zip(feats[:-1], sizes[:-1])]
    pix = feats[-1].permute(1, 2, 0).reshape(-1, model.hidden_dim, *sizes[-1])
    square = cv2.resize(m, (model.image_size, model.image_size), interpolation=cv2.INTER_LINEAR)
    inputs = torch.from_numpy(square > 0.5).to(pix.device)[None, None]
    with torch.inference_mode():
        out = model._use_mask_as_output(pix, high_res, inputs)
    return _vector(out.object_pointer)
