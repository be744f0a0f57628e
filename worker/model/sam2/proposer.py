"""SAM 2's automatic mask generator as a MaskProposer (worker/model/proposals.py has the seam and why): the
generator of `sam2.automatic_mask_generator` on the worker's shared model, run under its turns' lock."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from runtime.settings import Settings
from worker.model.proposals import Proposal


class Sam2Proposer:
    """SAM 2's automatic mask generator on a shared model (worker.model.sam2.segmenter.Sam2Segmenter)."""

    def __init__(self, predictor: Any, settings: Settings, *, lock: Callable[[], contextlib.AbstractContextManager[Any]]
                 = contextlib.nullcontext) -> None:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        self.device = torch.device(predictor.device)
        self.lock = lock
        self.generator = SAM2AutomaticMaskGenerator(
            predictor, points_per_side=settings.auto_points_per_side, points_per_batch=settings.auto_points_per_batch,
            pred_iou_thresh=settings.auto_pred_iou_thresh, stability_score_thresh=settings.auto_stability_score_thresh,
            min_mask_region_area=settings.auto_min_mask_region_area)
        # SAM2ImagePredictor's feature sizes are those of a 1024 model: scale them to this one's input size
        size = int(predictor.image_size)
        self.generator.predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8),  # noqa: SLF001
                                                   (size // 16, size // 16)]
        self._peak = 0

    @property
    def peak_memory_bytes(self) -> int:
        return self._peak

    def propose(self, image_rgb: np.ndarray) -> list[Proposal]:
        on_cuda = self.device.type == "cuda"
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
        with self.lock(), torch.inference_mode(), autocast:
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            found = self.generator.generate(np.ascontiguousarray(image_rgb))
            if on_cuda:
                self._peak = max(self._peak, int(torch.cuda.max_memory_allocated(self.device)))
        if not on_cuda:
            self._peak = max(self._peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        proposals = [Proposal(np.asarray(m["segmentation"], dtype=bool),
                              float(m["predicted_iou"]) * float(m["stability_score"])) for m in found]
        return sorted(proposals, key=lambda p: (-p.score, -int(p.mask.sum())))
