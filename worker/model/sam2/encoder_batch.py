"""Batched image encoding: SAM 2's image encoder run on the next frames together, not one at a time.

The predictor keeps a one-frame feature cache (`inference_state["cached_features"]`) and on a miss runs
its image encoder (`forward_image`) on that single frame. `BatchedFeatures` takes that cache's place:
a miss on frame t encodes t together with the following frames in the direction of travel whose
pixels the prefetch has already loaded (never waiting for one), up to `batch` frames, and keeps their
features for the requests that follow. Because the cache never misses from the predictor's point of
view, the predictor never replaces it.

Why: the image encoder is about two thirds of a frame's work, and on a CPU a batch of two keeps both
cores busier than one frame does (SAM 2.1 tiny at image size 256, 2 cores: about 72 against 85 ms a
frame, bench/RESULTS.md). Each sample goes through the same operations either way, and the masks
were bit-identical to the predictor's on the CPU measured (tests/test_sam2_memory.py checks both
ways of encoding; a math library may choose other kernels for another batch size, so `batch=1` is
the setting that guarantees the predictor's exact numbers). A frame that starts a run (the first
request, a prompt, a jump) is encoded alone, so the first result is not delayed.

Across sessions (the segmenter's `NextStepPool`, worker/model/next_steps.py, `session_batch` frames at most):
several jobs' sessions on one shared model take turns (worker/model/turns.py). A session waiting for its turn
with its next frame's pixels loaded offers that frame (`offerable`); the session whose turn it is encodes the
offered frames with its own in one batch and leaves each one's features in that session's cache, where its
next step finds them.
The encoder runs once for several jobs' frames instead of once each (on a GPU, one large batch instead
of K small ones); each job's frames go through the same operations, so only the batch size's choice of
kernels can change a feature (measured: bench/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from worker.model.next_steps import NextStepPool


class FrameImages(Protocol):
    """The frames' model-ready pixels (worker.model.sam2.lazy_frames.LazyFrames)."""

    def __getitem__(self, frame_idx: int) -> torch.Tensor: ...

    def ready(self, frame_idx: int) -> bool: ...


Features = tuple[torch.Tensor, dict[str, Any]]


def _take(value: Any, i: int) -> Any:
    """Sample i of one entry of the encoder's output (tensors and lists of tensors), batch dim kept."""
    if isinstance(value, torch.Tensor):
        return value[i : i + 1]
    if isinstance(value, list):
        return [_take(v, i) for v in value]
    return value


class BatchedFeatures(dict[int, Features]):
    """The predictor's `cached_features`, filled a batch of frames at a time (see the module doc)."""

    def __init__(self, images: FrameImages, encode: Callable[[torch.Tensor], dict[str, Any]], device: torch.device,
                 *, batch: int = 2, pool: NextStepPool | None = None) -> None:
        super().__init__()
        if batch < 1:
            raise ValueError(f"batch must be >= 1, but got {batch}")
        self.images = images
        self.encode = encode
        self.device = device
        self.batch = batch
        self.pool = pool
        self._last: int | None = None
        self.encoded = 0  # frames through the encoder
        self.batched = 0  # of those, frames encoded in a batch of more than one

    def offerable(self, frame_idx: int) -> bool:
        """Whether `frame_idx`, the session's next, may be offered for another session's pass: the next frame of a
        forward run, its pixels loaded."""
        return self.pool is not None and self._last == frame_idx - 1 and self.images.ready(frame_idx)

    def get(self, frame_idx: int, default: Any = None) -> Any:
        hit = super().get(frame_idx)
        if hit is None:
            hit = self._encode_from(frame_idx)
        self._last = frame_idx
        return hit

    def _encode_from(self, frame_idx: int) -> Features:
        indices = [frame_idx]
        if self._last is not None and abs(frame_idx - self._last) == 1:  # a run: batch the frames ahead
            step = frame_idx - self._last
            while len(indices) < self.batch:
                ahead = indices[-1] + step
                if ahead < 0 or not self.images.ready(ahead):
                    break
                indices.append(ahead)
        others = self.pool.take_frames(self.pool.frames - len(indices), self) if self.pool is not None else []
        pixels = [self.images[i] for i in indices] + [cache.images[i] for cache, i in others]
        images = torch.stack([p.to(self.device).float() for p in pixels])
        out = self.encode(images)
        self.clear()  # features of frames already passed: the predictor does not ask for them again
        for k, idx in enumerate(indices):
            self[idx] = (images[k : k + 1], {key: _take(value, k) for key, value in out.items()})
        for k, (cache, idx) in enumerate(others, start=len(indices)):  # another session's, for its next step
            cache[idx] = (images[k : k + 1], {key: _take(value, k) for key, value in out.items()})
        self.encoded += len(indices)
        if len(images) > 1:
            self.batched += len(indices)
        if others and self.pool is not None:
            self.pool.shared_frames += len(others)
        return self[frame_idx]
