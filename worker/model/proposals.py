"""Masks proposed for a whole frame, with no prompt: where automatic prompts (`--auto`) come from.

A MaskProposer looks at one frame and returns the objects it sees, each as a mask with a quality
score. The real one is SAM 2's automatic mask generator (`SAM2AutomaticMaskGenerator`: a grid of
`points_per_side`² point prompts, filtered by `pred_iou_thresh` and `stability_score_thresh`, small
regions removed below `min_mask_region_area`), run on the worker's shared model between two frames
of a session, under the model's step lock. It costs far more than a tracked frame (sam2 issue 436:
over a second a frame even for tiny on a desktop GPU), which is why it runs on keyframes only
(worker/service/auto.py), and its points go through the model `points_per_batch` at a time, which
bounds its memory (the guide's out-of-memory advice: fewer points per batch, bf16 on CUDA).

The seam: the `proposer` setting names a `module:callable` that builds another from the settings
(the tests' colour proposer, a backend's own detector).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from runtime.settings import Settings
from schemas.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Proposal:
    """One object seen on a frame: its mask (bool H x W at the frame's size) and a quality score in [0, 1]."""

    mask: np.ndarray = field(repr=False)
    score: float


class MaskProposer(Protocol):
    def propose(self, image_rgb: np.ndarray) -> list[Proposal]:
        """The objects on this frame (H x W x 3 uint8 RGB), best first."""
        ...

    @property
    def peak_memory_bytes(self) -> int:
        """The most memory a proposal has taken so far (GPU bytes on CUDA, else the process's peak RSS)."""
        ...


def build_proposer(settings: Settings, segmenter: object) -> MaskProposer:
    """The job's proposer: the `proposer` setting's factory, else the segmenter's own (SAM 2's generator)."""
    if settings.proposer:
        module, _, name = settings.proposer.partition(":")
        factory = getattr(importlib.import_module(module), name)
        return factory(settings)
    own = getattr(segmenter, "mask_proposer", None)
    if own is None:
        raise ConfigError(f"the {type(segmenter).__name__} segmenter proposes no masks, so --auto cannot run on it; set "
                          "VSEG_PROPOSER to a module:callable that builds a MaskProposer")
    return own(settings)
