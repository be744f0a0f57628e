"""One job's text tracking with SAM 3, frame by frame: every instance of each phrase, found and followed.

A TextTracker drives transformers' Sam3VideoModel the way its own `propagate_in_video_iterator` does, but
with frames given one at a time (a file's frames as they are decoded, a live source's as they come) and
memory bounded (`bounded.py`), so that its masks equal the library's, bit for bit (tests/test_sam3_text.py):

- Each frame goes through the processor's video path (the resize and normalisation of a whole video) and
  the model's non-streaming step, so the hot-start heuristics run: an instance that the detector does not
  confirm within `hotstart_delay` (15) frames of its birth, or that duplicates an older one, is removed.
- The library therefore holds each frame back until 15 frames later (or the video's end) and hides removed
  instances from it; so does `step`: it returns the frames that became final, oldest first, often none, and
  `finish` (or a file's last frame) returns the rest. A live job's masks come 15 frames late.
- A frame's masks are postprocessed when it is released, with the removals known then, as the library does.

Ids come from one counter per job and are never reused. An instance's label is the phrase that found it.
`new_ids`: released for the first time on this frame; `removed_ids`: on the previous released frame, not on
this one (removed, suppressed or with an empty mask: the same id may come back, never for another object).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from schemas.errors import ConfigError, InputError
from worker.model.sam3.bounded import BoundedSession, prune
from worker.model.sam3.build import Sam3

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextFrame:
    """Every instance found on one frame, at the video's resolution."""

    frame_idx: int
    obj_ids: tuple[int, ...]
    masks: np.ndarray = field(repr=False)  # bool, (len(obj_ids), H, W)
    scores: np.ndarray  # float32, (len(obj_ids),): the detection-and-tracking score in [0, 1]
    labels: dict[int, str]  # obj_id -> the phrase that found it
    new_ids: tuple[int, ...] = ()  # released for the first time on this frame
    removed_ids: tuple[int, ...] = ()  # on the previous released frame, not on this one


class TextTracker:
    """Text-prompted instances through one video, frame by frame.

    `num_frames`: a file job's frame count (its last frame flushes everything held back), or None for a live
    job (unbounded; memory bounded; `finish` flushes). `keep_cond` (live only): conditioning outputs kept per
    object (bounded.py says what that costs).
    """

    def __init__(self, sam3: Sam3, phrases: Sequence[str], *, width: int, height: int,
                 num_frames: int | None, keep_cond: int | None = None) -> None:
        if width < 1 or height < 1:
            raise InputError(f"video size must be positive, but got {width}x{height}")
        if num_frames is not None and num_frames < 1:
            raise InputError(f"num_frames must be >= 1 or None (live), but got {num_frames}")
        self._model = sam3.model
        self._processor = sam3.processor
        self.width, self.height, self.num_frames = width, height, num_frames
        tracker_config: Any = self._model.config.tracker_config  # a Sam3TrackerVideoConfig
        self._keep_outputs = max(int(tracker_config.num_maskmem), int(tracker_config.max_object_pointers_in_encoder))
        self._keep_cond = None if num_frames is not None else (keep_cond or int(tracker_config.max_cond_frame_num))
        self._delay = int(self._model.hotstart_delay)
        self._session = BoundedSession(num_frames, video_height=height, video_width=width,
                                       inference_device=sam3.device, inference_state_device=sam3.device,
                                       video_storage_device=sam3.device, dtype=sam3.dtype)
        self._held: list[Any] = []  # the model's outputs not yet final (Sam3VideoSegmentationOutput)
        self._next = 0  # the next frame's index
        self._released: set[int] = set()
        self._previous: tuple[int, ...] = ()
        self.phrases: tuple[str, ...] = ()
        self.add_phrases(phrases)

    @property
    def session(self) -> BoundedSession:
        """The library's session (tests read how much it holds; nothing else should)."""
        return self._session

    @property
    def position(self) -> int:
        """How many frames were given so far (the next frame's index)."""
        return self._next

    def add_phrases(self, phrases: Sequence[str]) -> None:
        """Phrases to look for from the next frame given on (frames already given are not searched again).
        A phrase given twice is looked for once."""
        clean = [p.strip() for p in phrases]
        if not clean or any(not p for p in clean):
            raise InputError(f"phrases must be non-empty text, but got {list(phrases)!r}")
        self._processor.add_text_prompt(self._session, clean)
        self.phrases = tuple(self._session.prompts[i] for i in sorted(self._session.prompts))
        log.debug("looking for %s from frame %d", self.phrases, self._next)

    def step(self, frame_rgb: np.ndarray) -> list[TextFrame]:
        """Track one more frame (H x W x 3 uint8 RGB at the video's size); the frames that became final."""
        if frame_rgb.shape != (self.height, self.width, 3) or frame_rgb.dtype != np.uint8:
            raise InputError(f"frame must be uint8 of shape ({self.height}, {self.width}, 3), "
                             f"but got {frame_rgb.dtype} {frame_rgb.shape}")
        if self.num_frames is not None and self._next >= self.num_frames:
            raise ConfigError(f"the video has {self.num_frames} frames: frame {self._next} is one too many")
        frame_idx = self._next
        pixels = self._processor.video_processor(videos=frame_rgb[None], return_tensors="pt")
        self._session.add_new_frame(pixels.pixel_values_videos[0][0], frame_idx)
        with torch.inference_mode():
            out = self._model(inference_session=self._session, frame_idx=frame_idx)
        prune(self._session, frame_idx, keep_outputs=self._keep_outputs, hotstart_delay=self._delay,
              keep_cond=self._keep_cond)
        self._next += 1
        if self._delay <= 0:
            return [self._release(out)]
        self._held.append(out)
        self._session.hotstart_removed_obj_ids.update(out.removed_obj_ids)
        if self.num_frames is not None and frame_idx == self.num_frames - 1:
            return self.finish()
        if len(self._held) >= self._delay:
            return [self._release(self._held.pop(0))]
        return []

    def finish(self) -> list[TextFrame]:
        """The end of the video: every frame still held back, in order."""
        held, self._held = self._held, []
        return [self._release(out) for out in held]

    def label_of(self, obj_id: int) -> str:
        """The phrase that found this instance."""
        return str(self._session.prompts[self._session.obj_id_to_prompt_id[obj_id]])

    def close(self) -> None:
        """Release the session's state (idempotent)."""
        self._held = []
        self._session.reset_state()
        self._session.processed_frames = None

    def _release(self, out: Any) -> TextFrame:
        post = self._processor.postprocess_outputs(self._session, out)
        obj_ids = tuple(int(i) for i in post["object_ids"].tolist())
        labels = {obj_id: phrase for phrase, ids in post["prompt_to_obj_ids"].items() for obj_id in ids}
        new_ids = tuple(i for i in obj_ids if i not in self._released)
        removed_ids = tuple(i for i in self._previous if i not in obj_ids)
        self._released.update(new_ids)
        self._previous = obj_ids
        if new_ids or removed_ids:
            log.debug("frame %d: new %s, removed %s", out.frame_idx, new_ids, removed_ids)
        return TextFrame(frame_idx=int(out.frame_idx), obj_ids=obj_ids, masks=post["masks"].cpu().numpy(),
                         scores=post["scores"].float().cpu().numpy(), labels=labels, new_ids=new_ids,
                         removed_ids=removed_ids)
