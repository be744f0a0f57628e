"""The Segmenter seam: what the worker needs from a video segmentation model.

Implemented by worker.model.sam2_segmenter.Sam2Segmenter (the real SAM 2 video predictor), by
worker.model.process.ModelProcess (either, in a child process), and in tests by tests.fakes
(chosen with the `segmenter` setting).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from schemas.prompts import ObjectPrompt
from worker.sources.frames import FrameSource


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

    def __post_init__(self) -> None:
        if self.masks.ndim != 3 or self.masks.shape[0] != len(self.obj_ids):
            raise ValueError(
                f"masks must have shape (N, H, W) with N = {len(self.obj_ids)} objects, but got {self.masks.shape}"
            )
        if self.scores.shape != (len(self.obj_ids),):
            raise ValueError(f"scores must have shape ({len(self.obj_ids)},), but got {self.scores.shape}")


class Segmenter(Protocol):
    """Propagates prompted objects through JPEG frames 00000.jpg, 00001.jpg, ... (worker/sources/frames.py)."""

    name: str  # model name for logs and results, e.g. "sam2.1-tiny"
    random_weights: bool  # True only for smoke tests: results are meaningless

    @property
    def device(self) -> str:
        """Where the model runs: "cpu", "cuda", "cuda:N" (the renderer picks its x264 preset by it)."""
        ...

    def segment(
        self, frames: FrameSource, prompts: Sequence[ObjectPrompt], *, width: int, height: int
    ) -> Iterator[FrameMasks]:
        """Yield FrameMasks for every frame of `frames` (which may still be arriving), in order, each
        with every prompted object; `width` x `height` is the video's size."""
        ...

    def ensure_started(self) -> None:
        """Before a job is claimed: make sure the model can run (a model process that died is started
        again); WorkerBroken if it cannot."""
        ...

    def interrupt(self, reason: str) -> None:
        """From another thread: the job in progress was abandoned (stalled); stop the model if it can be
        stopped (a model process is killed), so the job's thread comes back."""
        ...

    def close(self) -> None:
        """Release the model (a model process exits)."""
        ...


class InProcessModel:
    """What a segmenter that runs in the worker's own process does for the Segmenter protocol's
    lifecycle: nothing to start, nothing to stop from outside, nothing to release."""

    def ensure_started(self) -> None:
        return None

    def interrupt(self, reason: str) -> None:
        return None

    def close(self) -> None:
        return None
