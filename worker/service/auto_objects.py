"""A job's objects beyond its prompts, for the runner: labels on every frame, automatic objects found
on keyframes and their lifecycle (worker/service/auto.py has the rules). Nothing happens for a job
without `auto` or `labels`."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import cv2
import numpy as np

from schemas.errors import PromptError
from worker.model.frame_masks import FrameMasks
from worker.model.labels import build_labeller
from worker.model.proposals import build_proposer
from worker.model.session import MaskPrompt, Session
from worker.output.sink import read_frame_bgr
from worker.service.auto import AutoTracker, LabelBook
from worker.service.context import WorkerContext
from worker.service.control import ControlFeed
from worker.service.job import ValidJob
from worker.sources.frames import FrameSource
from worker.sources.live import LiveResults

log = logging.getLogger(__name__)


@dataclasses.dataclass
class JobObjects:
    feed: ControlFeed
    frames: FrameSource
    auto: AutoTracker | None = None
    book: LabelBook | None = None
    hint: str = ""  # why a keyframe may find nothing (said in its line when it does)
    _removals: tuple[int, ...] = ()
    _last_labels: dict[int, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, ctx: WorkerContext, job: ValidJob, frames: FrameSource, feed: ControlFeed) -> JobObjects:
        labeller = build_labeller(ctx.settings, job.labels, device=ctx.segmenter.device) if job.labels else None
        auto = None
        if job.auto is not None:
            auto = AutoTracker(job.auto, ctx.settings, build_proposer(ctx.settings, ctx.segmenter), labeller=labeller,
                               fps=job.fps, known_ids=job.obj_ids)
        book = LabelBook(labeller, ctx.settings.label_every) if labeller is not None else None
        return cls(feed, frames, auto, book, hint=_hint(ctx))

    def see(self, out: FrameMasks, session_frame: int, live: LiveResults | None) -> tuple[FrameMasks, FrameMasks, bool]:
        """Before frame `out` (already the job's frame index) is put: its labels, and the automatic objects
        confirmed (shown from here, an `added` entry) or lost (an entry after it). Returns (every object,
        what is published, whether a keyframe follows)."""
        for obj_id, change, label in out.changes:  # a text model's own objects (SAM 3): added, lost, returned
            self.feed.note(session_frame, obj_id, change, label=label, source="text")
        if self.auto is None and self.book is None:
            return out, out, False
        at_s = None
        if live is not None and (info := live.info(out.frame_idx)) is not None:
            at_s = info.time
        key = self.auto is not None and self.auto.keyframe(session_frame, at_s)
        if key or (self.book is not None and self.book.due(out)):
            out = dataclasses.replace(out, image_rgb=self._image(out, live))
        if self.book is not None:
            out = self.book.update(out, out.image_rgb)
        full = out
        if self.auto is not None:
            out, life = self.auto.track(out, at_s)
            labels = {obj_id: label for obj_id, (label, _) in (full.labels or {}).items()}
            for obj_id, label in life.added:
                self.feed.note(session_frame, obj_id, "added", label=labels.get(obj_id) or label)
            for obj_id, label in life.returned:
                self.feed.note(session_frame, obj_id, "returned", label=labels.get(obj_id) or label,
                               note=f"seen again within reid_window_s ({self.auto.settings.reid_window_s:g} s)")
            for obj_id, label in life.lost:
                self.feed.note(session_frame + 1, obj_id, "lost", label=self._last_labels.get(obj_id) or label,
                               note=f"absent on {self.auto.settings.auto_lost_frames} processed frames in a row")
            self._removals = life.removals
            self._last_labels.update(labels)
        return full, out, key

    def after(self, session: Session, full: FrameMasks, key: bool) -> None:
        """Between two frames: end the lost objects, and on a keyframe add what the generator found."""
        if self.auto is None:
            return
        for obj_id in self._removals:
            try:
                session.remove_object(obj_id)
            except PromptError as e:  # removed meanwhile by a command
                log.debug("automatic object %d already gone: %s", obj_id, e)
        self._removals = ()
        if key and full.image_rgb is not None:
            prompts = self.auto.propose(full.image_rgb, full, session.position)
            if prompts:
                self._add(session, prompts)
            if self.auto.last is not None:  # one line a keyframe: what its proposals came to, and why
                log.info("%s", self.auto.last.describe(self.hint))

    def figures(self) -> dict[str, int]:
        """The job's --auto figures for its progress events (read by the sink's thread); {} without --auto."""
        return self.auto.figures() if self.auto is not None else {}

    def _add(self, session: Session, prompts: list[MaskPrompt]) -> None:
        """Add the new objects from the next frame the session computes (it resolves which: a model process
        may have moved on meanwhile). Never fails the job."""
        try:
            session.add_prompts([dataclasses.replace(p, frame_idx=session.position) for p in prompts], or_next=True)
            return
        except PromptError as error:  # at the end of the video
            log.debug("automatic objects %s not added: %s", [p.obj_id for p in prompts], error)
        assert self.auto is not None
        self.auto.forget([p.obj_id for p in prompts])

    def _image(self, out: FrameMasks, live: LiveResults | None) -> np.ndarray:
        if out.image_rgb is not None:
            return out.image_rgb
        path: Path = live.streamed.path(out.frame_idx) if live is not None else self.frames.path(out.frame_idx)
        return cv2.cvtColor(read_frame_bgr(path), cv2.COLOR_BGR2RGB)


def _hint(ctx: WorkerContext) -> str:
    """Why SAM 2's generator may propose nothing on a keyframe: its own filters (and a smoke run's weights)."""
    if ctx.settings.proposer:
        return ""
    hint = (f"none passed the generator's auto_pred_iou_thresh {ctx.settings.auto_pred_iou_thresh:g} and "
            f"auto_stability_score_thresh {ctx.settings.auto_stability_score_thresh:g}")
    return hint + (": RANDOM WEIGHTS, expected" if ctx.segmenter.random_weights else "")
