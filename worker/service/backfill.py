"""Prompts on frames a file job has already published: propagated backwards, as `update` entries.

A prompt on frame F after the worker has passed F (a new object, or a correction) used to apply only
from the next frame processed. Now a session of its own (`backfill`) takes that one prompt over the
job's frames 0..P, P being the next frame the job's session processes: SAM 2 propagates backwards
from F to frame 0 and forwards from F to P, as it does for any prompt after frame 0. Its masks on the
frames already out, 0..P-1, go on the result stream as `update` entries (frames keep their once-only
`frame` entries; readers such as `watch` replace the object's mask there), and its mask on P seeds the
object in the job's own session from P on (SAM 2's `add_new_mask`). The job's other objects are not
touched: their masks stay exactly what they would be without the prompt.

Not for live jobs (their frames are gone: a prompt applies at the next frame processed), nor when the
model runs ahead of what the runner has published (a model process): the prompt then applies from the
next frame processed, as before, and its reply says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from schemas.prompts import ObjectPrompt
from worker.model.segment import Segmenter
from worker.sources.frames import FrameSource, FrameSourceBase

log = logging.getLogger(__name__)


class Prefix(FrameSourceBase):
    """The first `n` frames of a source (the backfill reads no further than the job's current frame)."""

    def __init__(self, frames: FrameSource, n: int) -> None:
        self.frames = frames
        self.n = n
        self.dir: Path = frames.dir
        self.check = frames.check

    @property
    def total(self) -> int | None:
        return self.n

    def wait(self, frame_idx: int) -> bool:
        return 0 <= frame_idx < self.n and self.frames.wait(frame_idx)

    def path(self, frame_idx: int) -> Path:
        return self.frames.path(frame_idx)

    def announced_at(self, frame_idx: int) -> float | None:
        return None

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))


@dataclass(frozen=True)
class Backfill:
    """One object's masks from its own session: `masks[k]` and `scores[k]` for frames 0..upto-1, and
    `seed`, its mask on frame `upto` (where the job's session takes it on)."""

    obj_id: int
    upto: int
    masks: dict[int, np.ndarray] = field(repr=False)
    scores: dict[int, float] = field(repr=False)
    seed: np.ndarray = field(repr=False)
    seconds: float = 0.0


def backfill(segmenter: Segmenter, frames: FrameSource, prompt: ObjectPrompt, *, upto: int, width: int,
             height: int) -> Backfill:
    """Run `prompt` alone over frames 0..upto (see the module doc)."""
    t0 = time.monotonic()
    masks: dict[int, np.ndarray] = {}
    scores: dict[int, float] = {}
    empty = np.zeros((height, width), dtype=bool)
    with segmenter.open_session(Prefix(frames, upto + 1), [prompt], width=width, height=height) as session:
        for out in session:
            frames.check()
            if prompt.obj_id in out.obj_ids:
                k = out.obj_ids.index(prompt.obj_id)
                masks[out.frame_idx], scores[out.frame_idx] = out.masks[k], float(out.scores[k])
    seed = masks.pop(upto, empty)
    scores.pop(upto, None)
    seconds = time.monotonic() - t0
    log.info("object %d prompted on frame %d, already published: propagated over frames 0..%d in %.2f s",
             prompt.obj_id, prompt.frame_idx, upto, seconds)
    return Backfill(prompt.obj_id, upto, {k: masks.get(k, empty) for k in range(upto)},
                    {k: scores.get(k, 0.0) for k in range(upto)}, seed, seconds)
