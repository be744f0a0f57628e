"""One pool of next steps: sessions on a shared model waiting for their turn (worker/model/turns.py) offer
their whole next step, and the session whose turn it is runs what it can of them with its own.

A step has two parts, each run in one batch for several sessions: the frame's image encoding
(worker/model/sam2/encoder_batch.py: `BatchedFeatures` takes an offered frame whose pixels are loaded and leaves
its features in the offering session's cache) and the objects' tracking steps
(worker/model/sam2/step_batch.py: `BatchedSteps` takes an offered plain step, no prompt or removal on the
frame, and leaves each object's result where the offering session's turn finds it). A session offers once
(`offer`), before it waits; each part is taken at most once, by the first pass that can run it; the offer
goes when its session's turn comes (`withdraw`) or once both parts are taken.

Limits: `frames` frames in one encoder pass (a session's own included; 1: no pooling of frames),
`sessions` sessions whose steps one pass runs (the current one's included; 1: no pooling of steps).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol


class FramePart(Protocol):
    """An offering session's feature cache (encoder_batch.BatchedFeatures)."""

    images: Any  # its frames' pixels: `ready(frame_idx)`

    def __contains__(self, frame_idx: object) -> bool: ...


@dataclass
class Offer:
    frame_idx: int
    features: Any  # FramePart whose frame is still to encode, or None (taken, or not offered)
    steps: Any  # step_batch.BatchedSteps whose plain step is still to run, or None


class NextStepPool:
    """Offered next steps of sessions waiting for their turn (see the module doc)."""

    def __init__(self, *, frames: int, sessions: int) -> None:
        self.frames = frames
        self.sessions = sessions
        self._offers: dict[int, Offer] = {}  # id(session) -> its offer
        self._lock = threading.Lock()
        self.shared_frames = 0  # frames encoded in another session's pass
        self.shared_steps = 0  # steps run in another session's pass
        self.passes = 0  # step passes run
        self.largest = 0  # the most steps in one pass so far

    def offer(self, session: object, frame_idx: int, *, features: Any = None, steps: Any = None) -> None:
        """`session`'s next step on `frame_idx`: its frame to encode (`features`, its cache), its objects'
        plain tracking steps (`steps`, its BatchedSteps); either may be None (not offered)."""
        features = features if self.frames > 1 else None
        steps = steps if self.sessions > 1 else None
        if features is None and steps is None:
            return
        with self._lock:
            self._offers[id(session)] = Offer(frame_idx, features, steps)

    def withdraw(self, session: object) -> None:
        with self._lock:
            self._offers.pop(id(session), None)

    def take_frames(self, room: int, exclude: object) -> list[tuple[Any, int]]:
        """Up to `room` offered frames of other sessions whose pixels are loaded and not yet encoded:
        (feature cache, frame) each, taken from the pool."""
        taken: list[tuple[Any, int]] = []
        with self._lock:
            for key, offer in list(self._offers.items()):
                if len(taken) >= room:
                    break
                cache = offer.features
                if cache is None or cache is exclude or offer.frame_idx in cache or not cache.images.ready(offer.frame_idx):
                    continue
                offer.features = None
                taken.append((cache, offer.frame_idx))
                self._drop_if_spent(key, offer)
        return taken

    def take_steps(self, exclude: object) -> list[tuple[Any, int]]:
        """Up to `sessions` - 1 offered plain steps of other sessions: (BatchedSteps, frame) each, taken."""
        taken: list[tuple[Any, int]] = []
        with self._lock:
            for key, offer in list(self._offers.items()):
                if len(taken) >= self.sessions - 1:
                    break
                if offer.steps is None or offer.steps is exclude:
                    continue
                taken.append((offer.steps, offer.frame_idx))
                offer.steps = None
                self._drop_if_spent(key, offer)
        return taken

    def _drop_if_spent(self, key: int, offer: Offer) -> None:
        if offer.features is None and offer.steps is None:
            del self._offers[key]
