"""Point and box objects beside a text job's phrases: SAM 3's own tracker, on the features of the frames it already
computed for the text.

transformers' Sam3VideoModel takes text only; its `tracker_model` (a SAM 2-style Sam3TrackerVideoModel without a
vision encoder of its own) tracks whatever its session holds, reading each frame's features from the session's
cache. So a second session, of the tracker alone, holds the job's point and box objects: after the text tracker
computes frame k (its detector's backbone, shared with the tracker through `tracker_neck`), `step(k, features)`
puts that frame's cached features into this session and runs the tracker on frame k. No image is encoded twice.

- A prompt (points, a box, or both: a box becomes two points labelled 2 and 3, as transformers' processor does)
  applies on the frame `add` names, which must be the next frame stepped or later: an object starts at its prompt,
  nothing propagates backwards. A prompt on an object already tracked corrects it there (its old inputs
  cleared). Coordinates are the video's pixels; the tracker takes them at its square input size.
- Masks come at the tracker's low resolution and are scaled to the video's size (bilinear, > 0), scores are the
  object score's sigmoid, as SAM 2 gives them.
- Memory stays bounded: outputs older than the memory the tracker reads are dropped, and on a live job all but
  each object's newest conditioning outputs (worker/model/sam3/bounded.py does the same for the text session).
- A removed object is no longer shown; the library has no removal for a tracker session, so it is still computed
  (prompting its id again brings it back, corrected there).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch
from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import (
    Sam3TrackerVideoInferenceSession,
)

from schemas.errors import PromptError
from schemas.prompts import ObjectPrompt
from worker.model.sam3.bounded import LIVE_FRAMES
from worker.model.sam3.build import Sam3

BOX_LABELS = (2, 3)  # a box's corners as SAM's prompt encoder takes them


class _Session(Sam3TrackerVideoInferenceSession):
    """The tracker's session with the video's length as known up front (the tracker normalises object pointers'
    time by it), not the frames it holds."""

    def __init__(self, total_frames: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.total_frames = total_frames if total_frames is not None else LIVE_FRAMES
        self.processed_frames = {}

    @property
    def num_frames(self) -> int:
        return self.total_frames


class PointObjects:
    """One job's point and box objects on a shared SAM 3 (see the module doc)."""

    def __init__(self, sam3: Sam3, *, width: int, height: int, num_frames: int | None) -> None:
        self.model = sam3.model.tracker_model
        self.width, self.height = width, height
        self.size = int(self.model.image_size)
        config: Any = self.model.config
        self._keep_outputs = max(int(config.num_maskmem), int(config.max_object_pointers_in_encoder))
        self._keep_cond = None if num_frames is not None else int(config.max_cond_frame_num)
        self.session = _Session(num_frames, video_height=height, video_width=width, inference_device=sam3.device,
                                inference_state_device=sam3.device, video_storage_device=sam3.device,
                                dtype=sam3.dtype)
        self.pending: dict[int, list[ObjectPrompt]] = defaultdict(list)  # frame -> prompts applied there
        self.hidden: set[int] = set()
        self.next_frame = 0

    @property
    def obj_ids(self) -> tuple[int, ...]:
        """The objects shown from the next frame on (prompted ones not reached yet included)."""
        known = set(self.session.obj_ids) | {p.obj_id for ps in self.pending.values() for p in ps}
        return tuple(sorted(known - self.hidden))

    def add(self, prompt: ObjectPrompt) -> None:
        """A prompt applied when frame `prompt.frame_idx` is stepped (that frame or later: PromptError)."""
        if prompt.frame_idx < self.next_frame:
            raise PromptError(f"prompt for object {prompt.obj_id} is on frame {prompt.frame_idx}, but frames up to "
                              f"{self.next_frame - 1} are already segmented: prompt frame {self.next_frame} or later")
        self.pending[prompt.frame_idx].append(prompt)
        self.hidden.discard(prompt.obj_id)

    def remove(self, obj_id: int) -> None:
        if obj_id not in self.obj_ids:
            raise PromptError(f"no point or box object {obj_id} to remove")
        for frame in list(self.pending):
            self.pending[frame] = [p for p in self.pending[frame] if p.obj_id != obj_id]
        self.hidden.add(obj_id)

    def step(self, frame_idx: int, features: dict[str, Any] | None) -> dict[int, tuple[np.ndarray, float]]:
        """Frame `frame_idx`, whose features the text tracker just computed (its session's cache): every shown
        object's mask (bool, the video's size) and score."""
        if frame_idx != self.next_frame:
            raise ValueError(f"frames must be stepped in order: expected {self.next_frame}, got {frame_idx}")
        self.next_frame += 1
        new = self.pending.pop(frame_idx, [])
        for prompt in new:
            self._inputs(prompt)
        if new:
            self.session.obj_with_new_inputs = sorted({p.obj_id for p in new})
        if not self.session.obj_ids:
            return {}
        if features is None:
            raise ValueError(f"no features cached for frame {frame_idx}: step right after the text tracker's step")
        self.session.cache.cache_vision_features(frame_idx, features)
        held: dict[int, Any] = self.session.processed_frames or {}
        held[frame_idx] = None  # the frame itself is never read: its features are in the cache
        self.session.processed_frames = held
        with torch.inference_mode():
            out = self.model(inference_session=self.session, frame_idx=frame_idx)
        self._prune(frame_idx)
        logits = torch.nn.functional.interpolate(out.pred_masks[:, 0:1].float(), size=(self.height, self.width),
                                                 mode="bilinear", align_corners=False)
        masks = (logits[:, 0] > 0).cpu().numpy()
        scores = torch.sigmoid(out.object_score_logits.float().reshape(-1)).cpu().numpy()
        shown = {}
        for k, obj_id in enumerate(self.session.obj_ids):
            if obj_id not in self.hidden:
                shown[int(obj_id)] = (masks[k], float(scores[k]))
        return shown

    def _inputs(self, prompt: ObjectPrompt) -> None:
        """The prompt as the tracker's point inputs on its frame, at the tracker's input size."""
        sx, sy = self.size / self.width, self.size / self.height
        coords: list[tuple[float, float]] = []
        labels: list[int] = []
        if prompt.box_xyxy is not None:
            x0, y0, x1, y1 = prompt.box_xyxy
            coords += [(x0 * sx, y0 * sy), (x1 * sx, y1 * sy)]
            labels += list(BOX_LABELS)
        coords += [(x * sx, y * sy) for x, y in prompt.points_xy]
        labels += [int(label) for label in prompt.labels]
        obj_idx = self.session.obj_id_to_idx(prompt.obj_id)
        self.session.add_point_inputs(obj_idx, prompt.frame_idx, {
            "point_coords": torch.tensor([[coords]], dtype=torch.float32),
            "point_labels": torch.tensor([[labels]], dtype=torch.int32)})

    def _prune(self, frame_idx: int) -> None:
        s = self.session
        for by_frame in (s.processed_frames or {}, *s.frames_tracked_per_obj.values(), *s.point_inputs_per_obj.values(),
                         *s.mask_inputs_per_obj.values()):
            for k in [k for k in by_frame if k < frame_idx]:
                del by_frame[k]
        for outputs in s.output_dict_per_obj.values():
            old = outputs["non_cond_frame_outputs"]
            for k in [k for k in old if k <= frame_idx - self._keep_outputs]:
                del old[k]
            cond = outputs["cond_frame_outputs"]
            if self._keep_cond is not None and len(cond) > self._keep_cond:
                for k in sorted(cond)[:-self._keep_cond]:
                    del cond[k]

    def close(self) -> None:
        self.session.reset_tracking_data()
        self.session.cache.clear_all()
        self.pending.clear()
