"""A text job's object ids: the library's instances as the job's objects, and identities that survive leaving.

The tracker (tracker.py) numbers instances with the library's counter from 0; a job's objects have ids of the job's
own (above every prompted id), and an instance lost and seen again should keep its id (issue 30, item 4):

- A new library instance first gets an embedding of what it looks like (`embed`: its mask over the frame, see
  worker/model/sam3/embeddings.py and bench/RESULTS.md for why this one). If an object of the same label was lost
  within `window_s` and looks alike (cosine similarity >= `threshold`, worker/model/reid.py ReidBook), the
  instance takes that object's id: a `returned` change. Otherwise it gets the job's next id: `added`.
- An object missing from a released frame (the hot start removed it, it was suppressed, its mask went empty) is
  `lost` there, and remembered with its last embedding. If the library's own instance comes back (the same library
  id), it is `returned` with its id at once.
- An object the user removed is hidden: the library still tracks it (its phrase would otherwise find it again
  under a new id), it is never shown again and never matched.

`window_s` 0 turns re-identification off: every new instance is a new object.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from worker.model.reid import ReidBook, colour_histogram
from worker.model.sam3.tracker import TextFrame

log = logging.getLogger(__name__)

Embed = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (image RGB, bool mask) -> vector
EMBED_EVERY = 5  # released frames between two refreshes of a shown object's embedding


@dataclass(frozen=True)
class Mapped:
    """One released frame in the job's ids: every shown object, its label and score, and what changed."""

    obj_ids: tuple[int, ...]
    keep: tuple[int, ...]  # indexes into the TextFrame's objects, in the order of obj_ids
    labels: dict[int, tuple[str, float]]
    changes: tuple[tuple[int, str, str], ...]  # (obj_id, added | lost | returned, label)


class Identities:
    """The library's ids mapped to a job's (see the module doc)."""

    def __init__(self, *, window_s: float, threshold: float, first_id: int = 1, embed: Embed = colour_histogram
                 ) -> None:
        self.book = ReidBook(window_s, threshold) if window_s > 0 else None
        self.embed = embed
        self.next_id = first_id
        self.job_of: dict[int, int] = {}  # library id -> job id
        self.label_of: dict[int, str] = {}  # job id -> its phrase
        self.shown: set[int] = set()  # job ids on the last released frame
        self.hidden: set[int] = set()  # job ids the user removed
        self._embedding: dict[int, np.ndarray] = {}  # job id -> its last embedding
        self._fresh: dict[int, int] = {}  # job id -> released frames since its embedding was taken
        self.lost_ids: set[int] = set()

    def reserve_above(self, obj_id: int) -> None:
        """Ids up to `obj_id` are taken (the job's prompted objects)."""
        self.next_id = max(self.next_id, obj_id + 1)

    def live_ids(self) -> list[int]:
        """The job's objects the session tracks now (shown and not removed)."""
        return sorted(self.shown - self.hidden)

    def hide(self, obj_id: int) -> None:
        self.hidden.add(obj_id)
        self.shown.discard(obj_id)
        if self.book is not None:
            self.book.forget(obj_id)

    def see(self, frame: TextFrame, image: np.ndarray | None, at_s: float) -> Mapped:
        """`frame` in the job's ids, with its changes (`image`: the frame, for embeddings; None: none taken)."""
        changes: list[tuple[int, str, str]] = []
        present: dict[int, int] = {}  # job id -> index in the frame
        for k, lib_id in enumerate(frame.obj_ids):
            label = frame.labels.get(lib_id, "")
            mask = frame.masks[k]
            if not mask.any():
                continue
            obj_id = self.job_of.get(lib_id)
            if obj_id is None:
                obj_id, change = self._new(lib_id, label, image, mask, at_s)
                changes.append((obj_id, change, label))
            elif obj_id in self.lost_ids:
                self.lost_ids.discard(obj_id)
                if self.book is not None:
                    self.book.forget(obj_id)
                changes.append((obj_id, "returned", label))
            if obj_id in self.hidden:
                continue
            present[obj_id] = k
            self._refresh(obj_id, image, mask)
        for obj_id in sorted(self.shown - present.keys() - self.hidden):
            changes.append((obj_id, "lost", self.label_of.get(obj_id, "")))
            self.lost_ids.add(obj_id)
            if self.book is not None and obj_id in self._embedding:
                self.book.lost(obj_id, self._embedding[obj_id], at_s, self.label_of.get(obj_id, ""))
        self.shown = set(present)
        obj_ids = tuple(sorted(present))
        keep = tuple(present[o] for o in obj_ids)
        labels = {o: (self.label_of.get(o, ""), float(frame.scores[present[o]])) for o in obj_ids}
        return Mapped(obj_ids, keep, labels, tuple(changes))

    def _new(self, lib_id: int, label: str, image: np.ndarray | None, mask: np.ndarray, at_s: float
             ) -> tuple[int, str]:
        """A library instance seen for the first time: an old object back, or a new one."""
        if self.book is not None and image is not None:
            embedding = self.embed(image, mask)
            match = self.book.match(embedding, at_s, label)
            if match is not None:
                log.info("instance %d (%s) is object %d again (similarity %.3f, gone %.1f s)", lib_id, label,
                         match.obj_id, match.similarity, match.gone_s)
                self.job_of[lib_id] = match.obj_id
                self.lost_ids.discard(match.obj_id)
                self._embedding[match.obj_id], self._fresh[match.obj_id] = embedding, 0
                return match.obj_id, "returned"
        obj_id = self.next_id
        self.next_id += 1
        self.job_of[lib_id] = obj_id
        self.label_of[obj_id] = label
        return obj_id, "added"

    def _refresh(self, obj_id: int, image: np.ndarray | None, mask: np.ndarray) -> None:
        """Keep a shown object's embedding recent (every EMBED_EVERY frames), for when it is lost."""
        if self.book is None or image is None:
            return
        age = self._fresh.get(obj_id)
        if age is None or age >= EMBED_EVERY:
            self._embedding[obj_id], self._fresh[obj_id] = self.embed(image, mask), 0
        else:
            self._fresh[obj_id] = age + 1
