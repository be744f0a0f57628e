"""Objects that come and go by themselves: automatic prompts (`--auto`), track lifecycle and labels.

`AutoTracker` (one per job with `auto`) runs the job's MaskProposer (worker/model/proposals.py, SAM 2's
automatic mask generator) on keyframes: the first frame processed, then every `every_frames`
processed frames or `every_s` seconds of video. A proposed mask that overlaps no tracked object
(IoU below `auto_new_iou`), is at least `min_area` pixels, has its centre inside the `roi` zone and,
with `keep`, is labelled one of those labels, becomes a new object with the next free id, prompted
with its mask from the next frame on; at most `max_objects` automatic objects live at once.

Lifecycle of an automatic object. It shows in the results only once it has been present (object
score at least `auto_score_threshold`) on `auto_confirm_frames` processed frames: then an `object`
entry `added` (source `auto`) is written just before the frame it first shows on. One absent for
`auto_lost_frames` processed frames in a row is ended: an `object` entry `lost`, and the session
stops tracking it. One never confirmed and absent that long is dropped without a word. Objects named
by prompts are the user's: they are never ended here.

Identities that survive: an automatic object ended as lost is remembered for `reid_window_s` with what it
looked like on the last keyframe it was seen on (worker/model/sam3/embeddings.py `colour_histogram`, the
embedding bench/bench_reid.py chose). A proposal on a later keyframe that looks like it (cosine similarity
at least `reid_threshold`, worker/model/reid.py) becomes that object again, with its old id: once
confirmed, an `object` entry `returned` instead of `added`.

Every keyframe says what its proposals came to (`Keyframe`: one INFO line, and the job's progress
totals `auto_keyframes`, `auto_proposed`, `auto_added`): how many masks were proposed, which became
objects, and why the others did not (too small, outside the roi, overlapping an object, no room left
under the object limits, not a kept label, not taken by the session at the end of the video).

`LabelBook` gives every object of a job with `labels` its label (worker/model/labels.py, CLIP), taken
on its first frame with a mask and refreshed every `label_every` processed frames.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from runtime.settings import Settings
from schemas import messages
from worker.model.frame_masks import FrameMasks
from worker.model.labels import Labeller
from worker.model.proposals import MaskProposer, Proposal
from worker.model.reid import ReidBook, colour_histogram
from worker.model.session import MaskPrompt

log = logging.getLogger(__name__)


@dataclass
class _Track:
    obj_id: int
    label: str = ""
    seen: int = 0  # processed frames it was present on, until confirmed
    confirmed: bool = False
    absent: int = 0  # processed frames in a row it was absent
    in_session: bool = False  # it has come out of the session (a model process may hand on earlier frames first)
    embedding: np.ndarray | None = None  # what it looked like on the last keyframe it was seen on (re-identification)
    returning: bool = False  # a lost object seen again: `returned` once confirmed, not `added`


@dataclass(frozen=True)
class Lifecycle:
    """What tracking one frame decided: `changes` (obj_id, change, label) take effect on this frame
    (`added`) or the next (`lost`); `removals` are objects the session must stop tracking."""

    added: tuple[tuple[int, str], ...] = ()  # (obj_id, label) shown from this frame on
    lost: tuple[tuple[int, str], ...] = ()  # (obj_id, label) ended after this frame
    removals: tuple[int, ...] = ()
    returned: tuple[tuple[int, str], ...] = ()  # (obj_id, label): lost objects shown again from this frame on


# why a proposed mask did not become an object, in the order they are checked
TOO_SMALL = "too small"
OUTSIDE_ROI = "outside the roi"
OVERLAPPING = "overlapping an object"
OVER_AUTO_MAX = "over --auto-max-objects"
OVER_MAX = "over VSEG_MAX_OBJECTS"
NOT_KEPT = "not a kept label"
NOT_TAKEN = "not taken by the session"


@dataclass
class Keyframe:
    """What one keyframe's proposals came to: `proposed` masks, the objects `added`, the others by why."""

    number: int  # 1 for the job's first keyframe (this attempt's)
    frame_idx: int
    proposed: int
    added: list[int] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    def describe(self, hint: str = "") -> str:
        """One line: `hint` says why a generator may propose nothing (its thresholds, random weights)."""
        line = (f"auto keyframe {self.number} (frame {self.frame_idx}): {self.proposed} masks proposed"
                f"{f' ({hint})' if hint and not self.proposed else ''}, {len(self.added)} became objects")
        if self.added:
            line += f" {self.added}"
        if self.skipped:
            line += "; not added: " + ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        return line


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b)) / union if union else 0.0


class AutoTracker:
    def __init__(self, options: messages.AutoOptions, settings: Settings, proposer: MaskProposer, *,
                 labeller: Labeller | None, fps: float, known_ids: Sequence[int]) -> None:
        self.options = options
        self.settings = settings
        self.proposer = proposer
        self.labeller = labeller
        self.fps = fps if fps > 0 else 30.0
        self.tracks: dict[int, _Track] = {}
        self.next_id = max(known_ids, default=0) + 1
        self.min_area = options.min_area or settings.auto_min_mask_region_area
        self._last_key: float | None = None
        self.reid = ReidBook(settings.reid_window_s, settings.reid_threshold) if settings.reid_window_s > 0 else None
        self.keyframes = 0
        self.proposed = 0
        self.added = 0  # objects that proposals became, all keyframes together (this attempt's)
        self.last: Keyframe | None = None

    # ---- keyframes ----------------------------------------------------------------------------------
    def keyframe(self, session_frame: int, at_s: float | None = None) -> bool:
        """Whether the generator runs after this processed frame (`at_s`: its time in the video)."""
        t = at_s if at_s is not None else session_frame / self.fps
        if self._last_key is None:
            due = True
        elif self.options.every_s > 0:
            due = t - self._last_key >= self.options.every_s
        else:
            due = session_frame % max(1, self.options.every_frames) == 0
        if due:
            self._last_key = t
        return due

    def propose(self, image_rgb: np.ndarray, out: FrameMasks, position: int) -> list[MaskPrompt]:
        """New objects seen on `out`'s frame, as mask prompts from `position` (the session's next frame) on;
        `last` says what became of every proposal."""
        self.keyframes += 1
        at_s = self._last_key if self._last_key is not None else 0.0
        self._remember_looks(image_rgb, out)
        proposals = self.proposer.propose(image_rgb)
        self.proposed += len(proposals)
        report = self.last = Keyframe(self.keyframes, out.frame_idx, len(proposals))
        taken = [m for obj_id, m in zip(out.obj_ids, out.masks) if np.any(m)]
        auto_room = self.options.max_objects - len(self.tracks)
        room = min(auto_room, self.settings.max_objects - len(out.obj_ids))
        prompts: list[MaskPrompt] = []
        for k, p in enumerate(proposals):
            if len(prompts) >= room:
                report.skipped[OVER_AUTO_MAX if room == auto_room else OVER_MAX] += len(proposals) - k
                break
            why = self._refusal(p, taken)
            label = ""
            if why is None and self.options.keep:
                label = self.labeller.label(image_rgb, p.mask)[0] if self.labeller is not None else ""
                why = None if label in self.options.keep else NOT_KEPT
            if why is not None:
                report.skipped[why] += 1
                continue
            embedding = colour_histogram(image_rgb, p.mask) if self.reid is not None else None
            match = self.reid.match(embedding, at_s, label) if self.reid is not None and embedding is not None else None
            if match is not None and match.obj_id not in out.obj_ids:
                obj_id = match.obj_id
                log.info("proposal on frame %d is automatic object %d again (similarity %.3f, gone %.1f s)",
                         out.frame_idx, obj_id, match.similarity, match.gone_s)
            else:
                obj_id = self._new_id(out.obj_ids)
            self.tracks[obj_id] = _Track(obj_id, label, embedding=embedding, returning=match is not None)
            taken.append(p.mask)
            prompts.append(MaskPrompt(obj_id, position, p.mask))
        report.added = [p.obj_id for p in prompts]
        self.added += len(prompts)
        return prompts

    def _remember_looks(self, image_rgb: np.ndarray, out: FrameMasks) -> None:
        """On a keyframe: what each confirmed automatic object looks like now (for when it is lost)."""
        if self.reid is None:
            return
        for obj_id, mask in zip(out.obj_ids, out.masks):
            t = self.tracks.get(obj_id)
            if t is not None and t.confirmed and mask.any():
                t.embedding = colour_histogram(image_rgb, mask)

    def _refusal(self, p: Proposal, taken: list[np.ndarray]) -> str | None:
        """Why proposal `p` cannot be a new object (None: it can)."""
        area = int(np.count_nonzero(p.mask))
        if area < self.min_area:
            return TOO_SMALL
        if self.options.roi is not None:
            ys, xs = np.nonzero(p.mask)
            cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
            x0, y0, x1, y1 = self.options.roi
            if not (x0 <= cx <= x1 and y0 <= cy <= y1):
                return OUTSIDE_ROI
        if any(iou(p.mask, m) >= self.settings.auto_new_iou for m in taken):
            return OVERLAPPING
        return None

    def _new_id(self, in_use: Sequence[int]) -> int:
        self.next_id = max(self.next_id, max(in_use, default=0) + 1)
        obj_id = self.next_id
        self.next_id += 1
        return obj_id

    def forget(self, obj_ids: Sequence[int]) -> None:
        """Objects proposed that the session did not take (at the end of the video)."""
        for obj_id in obj_ids:
            self.tracks.pop(obj_id, None)
        if self.last is not None and (gone := [o for o in obj_ids if o in self.last.added]):
            self.last.added = [o for o in self.last.added if o not in gone]
            self.last.skipped[NOT_TAKEN] += len(gone)
            self.added -= len(gone)

    def figures(self) -> dict[str, int]:
        """The job's progress figures so far (messages.Progress)."""
        return {"auto_keyframes": self.keyframes, "auto_proposed": self.proposed, "auto_added": self.added}

    # ---- lifecycle --------------------------------------------------------------------------------
    def track(self, out: FrameMasks, at_s: float | None = None) -> tuple[FrameMasks, Lifecycle]:
        """`out` less the automatic objects not yet confirmed, and what changed (see the module doc); `at_s`: the
        frame's time in the video (default: its index at the job's fps), for re-identification's window."""
        settings = self.settings
        now = at_s if at_s is not None else out.frame_idx / self.fps
        hide: list[int] = []
        added: list[tuple[int, str]] = []
        returned: list[tuple[int, str]] = []
        lost: list[tuple[int, str]] = []
        removals: list[int] = []
        for k, obj_id in enumerate(out.obj_ids):
            t = self.tracks.get(obj_id)
            if t is None:
                continue
            t.in_session = True
            present = bool(out.scores[k] >= settings.auto_score_threshold and out.masks[k].any())
            t.absent = 0 if present else t.absent + 1
            if not t.confirmed:
                t.seen += present
                if t.seen >= settings.auto_confirm_frames:
                    t.confirmed = True
                    (returned if t.returning else added).append((obj_id, t.label))
                else:
                    hide.append(obj_id)
            if t.absent >= settings.auto_lost_frames:
                if t.confirmed:
                    lost.append((obj_id, t.label))
                    if self.reid is not None and t.embedding is not None:
                        self.reid.lost(obj_id, t.embedding, now, t.label)
                removals.append(obj_id)
                del self.tracks[obj_id]
        for obj_id in self.tracks.keys() - set(out.obj_ids):  # gone from the session (removed by a command)
            if self.tracks[obj_id].in_session:
                del self.tracks[obj_id]
        return without(out, hide), Lifecycle(tuple(added), tuple(lost), tuple(removals), tuple(returned))


def without(out: FrameMasks, hidden: Sequence[int]) -> FrameMasks:
    keep = [k for k, obj_id in enumerate(out.obj_ids) if obj_id not in hidden]
    if len(keep) == len(out.obj_ids):
        return out
    return replace(out, obj_ids=tuple(out.obj_ids[k] for k in keep), masks=out.masks[keep], scores=out.scores[keep],
                   labels={k: v for k, v in (out.labels or {}).items() if k not in hidden})


class LabelBook:
    """Each object's label, taken on its first frame with a mask and refreshed every `every` frames."""

    def __init__(self, labeller: Labeller, every: int) -> None:
        self.labeller = labeller
        self.every = max(1, every)
        self.labels: dict[int, tuple[str, float]] = {}
        self._at: dict[int, int] = {}
        self._frames = 0

    def due(self, out: FrameMasks) -> bool:
        """Whether labelling this frame needs its image (an object without a fresh label)."""
        n = self._frames
        return any(m.any() and (o not in self.labels or n - self._at[o] >= self.every)
                   for o, m in zip(out.obj_ids, out.masks))

    def update(self, out: FrameMasks, image_rgb: np.ndarray | None) -> FrameMasks:
        n = self._frames
        self._frames += 1
        for obj_id, mask in zip(out.obj_ids, out.masks):
            fresh = obj_id in self.labels and n - self._at[obj_id] < self.every
            if image_rgb is not None and mask.any() and not fresh:
                self.labels[obj_id] = self.labeller.label(image_rgb, mask)
                self._at[obj_id] = n
        return replace(out, labels={o: self.labels[o] for o in out.obj_ids if o in self.labels})
