"""SAM 3 behind the Segmenter seam (worker/model/segment.py): a worker that serves text prompts.

`Sam3Segmenter` holds one loaded SAM 3 (worker/model/sam3/build.py), shared by its jobs' sessions, which take
turns on it frame by frame (worker/model/turns.py). A `Sam3Session` is one job's TextTracker (tracker.py): the
phrases come with `add_text` (the job's, before the first frame; a command's, from the next frame), frames are
read from the job's FrameSource one at a time (a file's as they are decoded, a live source's as the worker picks
them), and each frame the tracker releases becomes a FrameMasks:

- Ids. The library numbers instances from 0 with its own counter; the session gives each the job's next free id
  (above every prompted id), so a text object never takes the id of one the user named. An id is never reused.
- Labels. Each object's label is the phrase that found it, with its score (FrameMasks.labels).
- Changes (FrameMasks.changes): `added` on the frame an instance is first released, `lost` on the first frame it
  is gone (removed by the hot start, suppressed, or empty), `returned` when a new instance is one lost within
  `reid_window_s` (worker/model/sam3/identities.py: its old id comes back).
- Latency. The tracker holds each frame back until `hotstart_delay` (15) frames later, as the library does, so a
  session yields its first frame after reading 16, and the rest when its source ends (a file's last frame, or a
  live source's end).

Point and box objects can be mixed in (the job's prompts, and commands): SAM 3's own tracker follows them in a
session of its own on the features the text tracker computed for the frame (worker/model/sam3/points.py). They
start at their prompt's frame (nothing propagates backwards), keep the ids they were given (a text object's id
cannot be prompted), and are published with the frame the text tracker releases.

What SAM 3 here does not take: a resumed job's mask seeds (a text job runs again from its first frame:
`worker/service/resume.py`), and a prompt on a frame already segmented (no backfill: SAM 3's session runs
forwards only; `--now` applies a prompt at the next frame).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import numpy as np
import torch

from schemas.errors import PromptError, StorageError
from schemas.names import TEXT
from schemas.prompts import ObjectPrompt
from worker.model.frame_masks import FrameMasks
from worker.model.sam3.build import Sam3
from worker.model.sam3.identities import Identities
from worker.model.sam3.points import PointObjects
from worker.model.sam3.tracker import TextFrame, TextTracker
from worker.model.segment import InProcessModel
from worker.model.session import Backfill, MaskPrompt, Prompt, SessionBase
from worker.model.turns import FairTurns
from worker.sources.frames import FrameSource, turn_wait_check

log = logging.getLogger(__name__)

NO_MASKS = "a SAM 3 session takes text, points and boxes: no mask prompts (a text job does not resume from masks)"


class Sam3Segmenter(InProcessModel):
    """One SAM 3 for every job of a worker; `reid_window_s`/`reid_threshold`: identities.py."""

    capability = TEXT

    def __init__(self, sam3: Sam3, *, reid_window_s: float = 0.0, reid_threshold: float = 0.8) -> None:
        self.sam3 = sam3
        self.name = sam3.name
        self.random_weights = sam3.random_weights
        self.reid_window_s = reid_window_s
        self.reid_threshold = reid_threshold
        self.turns = FairTurns()

    @property
    def device(self) -> str:
        return self.sam3.device

    def open_session(self, frames: FrameSource, prompts: Sequence[Prompt], *, width: int, height: int,
                     start_frame: int = 0) -> Sam3Session:
        if start_frame:
            raise PromptError(f"a SAM 3 session starts at frame 0, not {start_frame}: a text job runs again from "
                              f"its first frame")
        session = Sam3Session(self, frames, width=width, height=height)
        session.add_prompts(prompts)
        return session


class Sam3Session(SessionBase):
    """One job's text tracking on a shared Sam3Segmenter (see the module doc)."""

    def __init__(self, model: Sam3Segmenter, frames: FrameSource, *, width: int, height: int) -> None:
        super().__init__(0)
        self.model = model
        self.frames = frames
        self.width, self.height = width, height
        self.tracker: TextTracker | None = None
        self._phrases: list[str] = []
        self.identities = Identities(window_s=model.reid_window_s, threshold=model.reid_threshold)
        self.points: PointObjects | None = None
        self._prompts: list[ObjectPrompt] = []  # point and box prompts given before the first frame
        self._point_out: dict[int, dict[int, tuple[np.ndarray, float]]] = {}  # frame -> point objects, until released
        self._ready: deque[FrameMasks] = deque()
        self._images: dict[int, np.ndarray] = {}  # frames given, not yet released (re-identification reads them)
        self._times: dict[int, float] = {}  # a live job's frames: when each was read (monotonic), until released
        self._fps = 30.0  # a file's frame rate, until add_text says

    # ---- the Session protocol -------------------------------------------------------------------
    def add_prompts(self, prompts: Sequence[Prompt], *, or_next: bool = False) -> None:
        """Point and box objects (new, or corrections of point and box objects), from their frame on."""
        self._check_open()
        if any(isinstance(p, MaskPrompt) for p in prompts):
            raise PromptError(NO_MASKS)
        given = [p for p in prompts if isinstance(p, ObjectPrompt)]
        if or_next:
            given = [dataclasses.replace(p, frame_idx=max(p.frame_idx, self._position)) for p in given]
        total = self.frames.total
        for p in given:
            if p.obj_id in self.identities.label_of:
                raise PromptError(f"object {p.obj_id} was found by the text {self.identities.label_of[p.obj_id]!r}: "
                                  "points and boxes make or correct objects of their own; give a new id")
            if p.frame_idx < self._position:
                raise PromptError(f"prompt for object {p.obj_id} is on frame {p.frame_idx}, but frames up to "
                                  f"{self._position - 1} are already segmented: prompt frame {self._position} or "
                                  "later (SAM 3 does not propagate backwards), or apply it now")
            if total is not None and p.frame_idx >= total:
                raise PromptError(f"prompt for object {p.obj_id} is on frame {p.frame_idx}, but the video has "
                                  f"{total} frames (0..{total - 1})")
        for p in given:
            self.identities.reserve_above(p.obj_id)
            if self.points is None:
                self._prompts.append(p)
            else:
                self.points.add(p)

    def backfill(self, prompt: ObjectPrompt) -> Backfill:
        raise PromptError(f"prompt for object {prompt.obj_id} is on frame {prompt.frame_idx}, already segmented: SAM 3 "
                          f"does not propagate backwards; apply it now (--now, @now) instead")

    def add_text(self, phrases: Sequence[str], *, fps: float | None = None) -> None:
        """Look for these phrases from the next frame read on (PromptError for an empty one); `fps`: the video's
        frame rate (a file job's frames are timed by it for re-identification's window)."""
        self._check_open()
        if fps is not None and fps > 0:
            self._fps = fps
        clean = [p.strip() for p in phrases]
        if not clean or not all(clean):
            raise PromptError(f"text phrases must be non-empty, but got {list(phrases)!r}")
        self._phrases.extend(p for p in clean if p not in self._phrases)
        if self.tracker is not None:
            self.tracker.add_phrases(clean)

    def reserve_ids(self, upto: int) -> None:
        self.identities.reserve_above(upto)

    def remove_object(self, obj_id: int) -> None:
        self._check_open()
        if obj_id not in self._known():
            raise PromptError(f"no object {obj_id} to remove: the session tracks {sorted(self._known()) or 'none'}")
        if obj_id in self._point_ids():
            if self.points is not None:
                self.points.remove(obj_id)
            self._prompts = [p for p in self._prompts if p.obj_id != obj_id]
        else:
            self.identities.hide(obj_id)  # still tracked by the library (else its phrase would find it again)

    def _point_ids(self) -> set[int]:
        return set(self.points.obj_ids) if self.points is not None else {p.obj_id for p in self._prompts}

    def _known(self) -> set[int]:
        return set(self.identities.live_ids()) | self._point_ids()

    def _total(self) -> int | None:
        return self.frames.total

    # ---- frames ---------------------------------------------------------------------------------
    def _run(self) -> Iterator[FrameMasks]:
        if not self._phrases:
            raise PromptError("a SAM 3 session needs text: give the job --text phrases")
        k = 0
        while True:
            while self._ready:
                yield self._ready.popleft()
            if not self.frames.wait(k):
                break
            image = self._read(k)
            total = self.frames.total
            if self.tracker is None:  # a file's length is known once it is decoded; a live source's never
                length = total if total is not None and not self.frames.realtime else None
                self.tracker = TextTracker(self.model.sam3, self._phrases, width=self.width, height=self.height,
                                           num_frames=length)
                self.points = PointObjects(self.model.sam3, width=self.width, height=self.height, num_frames=length)
                for p in self._prompts:
                    self.points.add(p)
                self._prompts = []
            self._images[k] = image
            if self.frames.realtime:
                self._times[k] = time.monotonic()
            with self.model.turns.turn(live=self.frames.realtime, check=turn_wait_check(self.frames)):
                released = self.tracker.step(image)
                assert self.points is not None
                self._point_out[k] = self.points.step(k, self._features(k, image) if self.points.obj_ids else None)
            self._position = k = k + 1
            self._publish(released)
        if self.tracker is not None:
            self._publish(self.tracker.finish())
        while self._ready:
            yield self._ready.popleft()

    def _read(self, k: int) -> np.ndarray:
        path = self.frames.path(k)
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise StorageError(f"cannot read frame {path}: missing or not a JPEG image")
        if bgr.shape[:2] != (self.height, self.width):
            raise StorageError(f"frame {path} is {bgr.shape[1]}x{bgr.shape[0]}, not the job's {self.width}x"
                               f"{self.height}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def _features(self, k: int, image: np.ndarray) -> dict[str, Any]:
        """Frame k's features as the tracker reads them: those the text tracker just cached, or (when its session
        was reset on that frame, every instance removed) computed again from the frame."""
        assert self.tracker is not None
        cached = self.tracker.session.cache.get_vision_features(k)
        if cached is not None:
            return cached
        sam3 = self.model.sam3
        pixels = sam3.processor.video_processor(videos=image[None], return_tensors="pt").pixel_values_videos[0]
        with torch.inference_mode():
            embeds = sam3.model.detector_model.get_vision_features(pixel_values=pixels.to(sam3.device, sam3.dtype))
            feats, pos = sam3.model.get_vision_features_for_tracker(vision_embeds=embeds)
        return {"vision_feats": feats, "vision_pos_embeds": pos}

    def _publish(self, released: list[TextFrame]) -> None:
        for frame in released:
            image = self._images.pop(frame.frame_idx, None)
            at_s = self._time_of(frame.frame_idx)
            mapped = self.identities.see(frame, image, at_s)
            keep = list(mapped.keep)
            points = self._point_out.pop(frame.frame_idx, {})
            by_id = {o: (frame.masks[k], float(frame.scores[k])) for o, k in zip(mapped.obj_ids, keep)} | points
            obj_ids = tuple(sorted(by_id))
            masks = (np.stack([by_id[o][0] for o in obj_ids]).astype(bool, copy=False) if obj_ids
                     else np.zeros((0, self.height, self.width), bool))
            self._ready.append(FrameMasks(frame_idx=frame.frame_idx, obj_ids=obj_ids, masks=masks,
                                          scores=np.array([by_id[o][1] for o in obj_ids], np.float32),
                                          image_rgb=image, labels=mapped.labels, changes=mapped.changes))

    def _time_of(self, frame_idx: int) -> float:
        """The frame's time in seconds, for the re-identification window: a live frame's by the clock when it was
        read (the newest captured: live jobs skip to keep up), a file's by its index at the video's fps."""
        at = self._times.pop(frame_idx, None)
        return at if at is not None else frame_idx / self._fps

    def _release(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self.points is not None:
            self.points.close()
        self._point_out.clear()
        self._times.clear()
        self._images.clear()
        self._ready.clear()
