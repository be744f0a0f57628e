"""The real Segmenter: SAM 2's video predictor, wrapped so nothing else touches its untyped state.

One Sam2Segmenter owns the predictor (loaded once per worker), the autocast context (bf16 on CUDA
only) and, during a job, the predictor's inference state.

Frame order. Results are published in frame order, so propagation runs in two passes: first
backwards from the last prompted frame M down to frame 0 (buffering frames 0..M-1, which only that
pass reaches for objects prompted late), then forwards from M to the last frame, yielding as it goes.
With every prompt on frame 0 there is no backward pass and the first result comes at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from schemas.errors import StorageError
from schemas.prompts import ObjectPrompt, object_ids
from worker.segment import FrameMasks

log = logging.getLogger(__name__)


def _cast_memory_to_query_dtype(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """SAM 2 stores memory features in bf16; without autocast (CPU) they must match the fp32 query."""
    curr = kwargs.get("curr")
    dtype = (curr[0] if isinstance(curr, (list, tuple)) else curr).dtype
    for key in ("memory", "memory_pos"):
        if isinstance(kwargs.get(key), torch.Tensor):
            kwargs[key] = kwargs[key].to(dtype)
    return args, kwargs


class Sam2Segmenter:
    """Segmenter over a loaded SAM2VideoPredictor."""

    def __init__(self, predictor: Any, *, name: str, random_weights: bool) -> None:
        self.predictor = predictor
        self.name = name
        self.random_weights = random_weights
        self.device = torch.device(predictor.device)
        if self.device.type != "cuda":
            predictor.memory_attention.register_forward_pre_hook(_cast_memory_to_query_dtype, with_kwargs=True)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def segment(self, frames_dir: Path, num_frames: int, prompts: Sequence[ObjectPrompt]) -> Iterator[FrameMasks]:
        """Yield every object's mask on frames 0..num_frames-1, in order."""
        with torch.inference_mode(), self._autocast():
            state = self.predictor.init_state(
                str(frames_dir), offload_video_to_cpu=self.device.type == "cuda", async_loading_frames=False
            )
            try:
                if state["num_frames"] != num_frames:
                    raise StorageError(
                        f"frame directory {frames_dir} holds {state['num_frames']} frames, the job says {num_frames}"
                    )
                for p in prompts:
                    self.predictor.add_new_points_or_box(
                        state,
                        frame_idx=p.frame_idx,
                        obj_id=p.obj_id,
                        points=np.asarray(p.points_xy, dtype=np.float32).reshape(-1, 2) if p.points_xy else None,
                        labels=np.asarray(p.labels, dtype=np.int32) if p.points_xy else None,
                        box=np.asarray(p.box_xyxy, dtype=np.float32) if p.box_xyxy is not None else None,
                    )
                expected_ids = tuple(object_ids(prompts))
                last_prompted = max(p.frame_idx for p in prompts)
                if last_prompted > 0:
                    earlier: dict[int, FrameMasks] = {}
                    for out in self._propagate(state, last_prompted, reverse=True):
                        if out.frame_idx < last_prompted:
                            earlier[out.frame_idx] = out
                    for frame_idx in range(last_prompted):
                        yield self._ordered(earlier.pop(frame_idx), expected_ids)
                for out in self._propagate(state, last_prompted, reverse=False):
                    yield self._ordered(out, expected_ids)
            finally:
                self.predictor.reset_state(state)
                del state
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _propagate(self, state: dict[str, Any], start: int, *, reverse: bool) -> Iterator[FrameMasks]:
        for frame_idx, obj_ids, mask_logits in self.predictor.propagate_in_video(
            state, start_frame_idx=start, reverse=reverse
        ):
            masks = (mask_logits[:, 0] > 0.0).cpu().numpy()
            yield FrameMasks(
                frame_idx=int(frame_idx),
                obj_ids=tuple(int(i) for i in obj_ids),
                masks=masks,
                scores=self._object_scores(state, int(frame_idx), len(obj_ids)),
            )

    @staticmethod
    def _object_scores(state: dict[str, Any], frame_idx: int, num_objects: int) -> np.ndarray:
        """SAM 2's object presence score per object on this frame, as a probability."""
        scores = np.zeros(num_objects, dtype=np.float32)
        for obj_idx in range(num_objects):
            outputs = state["output_dict_per_obj"][obj_idx]
            out = outputs["cond_frame_outputs"].get(frame_idx) or outputs["non_cond_frame_outputs"].get(frame_idx)
            if out is not None and out.get("object_score_logits") is not None:
                scores[obj_idx] = float(torch.sigmoid(out["object_score_logits"].float()).flatten()[0])
        return scores

    @staticmethod
    def _ordered(out: FrameMasks, expected_ids: tuple[int, ...]) -> FrameMasks:
        """Objects sorted by id (SAM 2 orders them by first prompt)."""
        if out.obj_ids == expected_ids:
            return out
        order = [out.obj_ids.index(i) for i in expected_ids]
        return FrameMasks(out.frame_idx, expected_ids, out.masks[order], out.scores[order])
