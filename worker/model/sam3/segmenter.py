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

What SAM 3 here does not take: point and box prompts (transformers' Sam3VideoModel tracks text only), a resumed
job's mask seeds (a text job runs again from its first frame: `worker/service/resume.py`), and backfills.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence

import cv2
import numpy as np

from schemas.errors import PromptError, StorageError
from schemas.names import TEXT
from schemas.prompts import ObjectPrompt
from worker.model.frame_masks import FrameMasks
from worker.model.sam3.build import Sam3
from worker.model.sam3.identities import Identities
from worker.model.sam3.tracker import TextFrame, TextTracker
from worker.model.segment import InProcessModel
from worker.model.session import MaskPrompt, Prompt, SessionBase
from worker.model.turns import FairTurns
from worker.sources.frames import FrameSource, turn_wait_check

log = logging.getLogger(__name__)

NO_POINTS = ("a SAM 3 worker tracks text phrases (--text) only: points, boxes and masks are not taken here; submit "
             "point and box objects as a job of their own, which a SAM 2 worker takes")


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
        if any(isinstance(p, (ObjectPrompt, MaskPrompt)) for p in prompts):
            raise PromptError(NO_POINTS)
        if start_frame:
            raise PromptError(f"a SAM 3 session starts at frame 0, not {start_frame}: a text job runs again from "
                              f"its first frame")
        return Sam3Session(self, frames, width=width, height=height)


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
        self._ready: deque[FrameMasks] = deque()
        self._images: dict[int, np.ndarray] = {}  # frames given, not yet released (re-identification reads them)
        self._fps = 0.0

    # ---- the Session protocol -------------------------------------------------------------------
    def add_prompts(self, prompts: Sequence[Prompt], *, or_next: bool = False) -> None:
        self._check_open()
        if prompts:
            raise PromptError(NO_POINTS)

    def add_text(self, phrases: Sequence[str]) -> None:
        """Look for these phrases from the next frame read on (PromptError for an empty one)."""
        self._check_open()
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
        self.identities.hide(obj_id)  # still tracked by the library (else its phrase would find it again), not shown

    def _known(self) -> set[int]:
        return set(self.identities.live_ids())

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
                self.tracker = TextTracker(self.model.sam3, self._phrases, width=self.width, height=self.height,
                                           num_frames=total if total is not None and not self.frames.realtime
                                           else None)
            self._images[k] = image
            with self.model.turns.turn(live=self.frames.realtime, check=turn_wait_check(self.frames)):
                released = self.tracker.step(image)
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

    def _publish(self, released: list[TextFrame]) -> None:
        for frame in released:
            image = self._images.pop(frame.frame_idx, None)
            at_s = self._time_of(frame.frame_idx)
            mapped = self.identities.see(frame, image, at_s)
            keep = list(mapped.keep)
            self._ready.append(FrameMasks(frame_idx=frame.frame_idx, obj_ids=mapped.obj_ids,
                                          masks=frame.masks[keep].astype(bool, copy=False),
                                          scores=frame.scores[keep].astype(np.float32, copy=False), image_rgb=image,
                                          labels=mapped.labels, changes=mapped.changes))

    def _time_of(self, frame_idx: int) -> float:
        """The frame's time, for the re-identification window: its announcement's (a live frame's capture
        clock), else its index at 30 frames/s (a file's)."""
        at = self.frames.announced_at(frame_idx)
        return at if at is not None else frame_idx / 30.0

    def _release(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        self._images.clear()
        self._ready.clear()
