"""One job's hold on a shared model: the Session seam.

A Segmenter (worker/model/segment.py) is the model, loaded once per worker (weights, CUDA graphs).
`segmenter.open_session(frames, prompts, width=, height=)` returns a Session that owns everything one
job needs and nothing another job can see: the inference state, the frame loaders, the encoder's
feature cache, the job's stats. Several sessions may be open on one model at once; each yields exactly
the masks it would yield alone (tests/test_sessions.py).

A session is an iterator of FrameMasks, one per frame, in frame order, each with every object it
tracks on that frame. Between frames it takes:

- `add_prompts(prompts)`: new objects, or corrections of tracked ones, at a frame. Before the first
  frame is taken any frame may be prompted (the session runs a backward pass for objects prompted
  after frame 0, as SAM 2 does). Once frames flow, a prompt must be on `position` or later, the next
  frame the model has not computed yet: it takes effect when propagation reaches its frame. A prompt on
  an earlier frame raises PromptError (its frame's results are already out), unless `or_next` asks that it
  take effect from the next frame the session computes instead: the session resolves it, so a caller never
  retries (a model process may have computed frames the worker has not read yet). Either way a prompt
  takes effect on max(its frame, `position` after the call).
- `remove_object(obj_id)`: the object is gone from the next frame on.
- `add_text(phrases)`: every instance of each phrase is found from the next frame on (SAM 3 only).
- `close()`: releases the state and the loaders (idempotent; a session is also a context manager).

Objects can come and go, so the obj_ids of successive FrameMasks can differ; a session with no object
left yields empty FrameMasks until a prompt brings one back or the frames end.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self

import numpy as np

from schemas.errors import PromptError
from schemas.prompts import ObjectPrompt
from worker.model.frame_masks import FrameMasks
from worker.sources.frames import FrameSource, Prefix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskPrompt:
    """An object given by its mask on a frame (SAM 2's `add_new_mask`): how a resumed job seeds each object
    with its last published mask. Worker-internal: the wire's prompts are points and boxes."""

    obj_id: int
    frame_idx: int
    mask: np.ndarray = field(repr=False)  # bool (H, W) at the video's resolution


Prompt = ObjectPrompt | MaskPrompt


@dataclass(frozen=True)
class Backfill:
    """A prompt on a frame already computed, run alone over frames 0..upto (`Session.backfill`): the object's
    masks and scores on frames 0..upto-1; from `upto` on it is in the job's session."""

    obj_id: int
    upto: int
    masks: dict[int, np.ndarray] = field(repr=False)
    scores: dict[int, float] = field(repr=False)
    seconds: float = 0.0
    seed: np.ndarray | None = field(default=None, repr=False)  # its mask on `upto`, where it seeds the session
    # (None when the model process ran it: the child keeps it)


class Opens(Protocol):
    """What a backfill needs of a model: a session of its own (worker.model.segment.Segmenter)."""

    def open_session(self, frames: FrameSource, prompts: Sequence[Prompt], *, width: int, height: int,
                     start_frame: int = 0) -> Session: ...


class Session(Protocol):
    """One job's propagation over a shared model (see the module doc)."""

    @property
    def obj_ids(self) -> tuple[int, ...]:
        """The objects tracked from `position` on, in id order (prompted ones not yet reached included)."""
        ...

    @property
    def position(self) -> int:
        """The first frame a new prompt may target: the next frame the model computes."""
        ...

    @property
    def stats(self) -> dict[str, float]:
        """This session's figures so far (frames loaded, waits, frames held), for logs and results."""
        ...

    def add_prompts(self, prompts: Sequence[Prompt], *, or_next: bool = False) -> None: ...

    def remove_object(self, obj_id: int) -> None: ...

    def add_text(self, phrases: Sequence[str], *, fps: float | None = None) -> None:
        """Phrases to find and track every instance of, from the next frame the model computes (a text model's
        session, worker/model/sam3/segmenter.py); `fps`: the video's frame rate (given with a job's first
        phrases). PromptError from a model that takes no text."""
        ...

    def reserve_ids(self, upto: int) -> None:
        """Ids up to `upto` are the job's already: objects the model finds itself (SAM 3's instances) get higher
        ones. A no-op for a model that finds none."""
        ...

    def backfill(self, prompt: ObjectPrompt) -> Backfill:
        """A prompt on a frame already computed (a file job's, worker/service/control.py): run alone, in a
        session of its own on the same model, backwards from its frame to 0 and forwards to P, the next frame
        this session computes; its mask on P seeds the object here (SAM 2's `add_new_mask`), from P on. The
        session resolves P itself (a model process, its child, at its own position). Returns the masks of
        frames 0..P-1, for the caller to publish as `update` entries."""
        ...

    def __iter__(self) -> Iterator[FrameMasks]: ...

    def __next__(self) -> FrameMasks: ...

    def close(self) -> None: ...

    def __enter__(self) -> Session: ...

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class PromptBook:
    """A session's prompts that propagation has not reached yet, by frame, and the objects it knows:
    the bookkeeping every Session implementation shares (the checks of add_prompts and remove_object)."""

    def __init__(self) -> None:
        self.pending: dict[int, list[Prompt]] = {}
        self._order: dict[int, int] = {}  # id(prompt) -> when it was added: prompts are applied in that order
        self.tracked: set[int] = set()  # objects the model holds now
        self.removals: list[int] = []  # tracked objects to drop before the next frame
        self.started = False  # frames have been taken: prompts must be on `position` or later

    def add(self, prompts: Sequence[Prompt], *, position: int, total: int | None) -> None:
        """Queue prompts (all or none: every one is checked before any is queued)."""
        for p in prompts:
            if p.frame_idx < position and (self.started or position > 0):
                raise PromptError(
                    f"prompt for object {p.obj_id} is on frame {p.frame_idx}, but frames up to {position - 1} are "
                    f"already segmented: prompt frame {position} or later")
            if total is not None and p.frame_idx >= total:
                raise PromptError(f"prompt for object {p.obj_id} is on frame {p.frame_idx}, but the video has "
                                  f"{total} frames (0..{total - 1})")
        for p in prompts:
            self.pending.setdefault(p.frame_idx, []).append(p)
            self._order[id(p)] = len(self._order)
            if p.obj_id in self.removals:  # removed, then prompted again before the next frame
                self.removals.remove(p.obj_id)

    def remove(self, obj_id: int) -> None:
        if obj_id not in self.known():
            raise PromptError(f"no object {obj_id} to remove: the session tracks {sorted(self.known()) or 'none'}")
        for frame in list(self.pending):
            self.pending[frame] = [p for p in self.pending[frame] if p.obj_id != obj_id]
            if not self.pending[frame]:
                del self.pending[frame]
        if obj_id in self.tracked and obj_id not in self.removals:
            self.removals.append(obj_id)

    def known(self) -> set[int]:
        """Objects tracked now or prompted on a frame not reached yet, less those being removed."""
        return ({p.obj_id for ps in self.pending.values() for p in ps} | self.tracked) - set(self.removals)

    def take(self, frame_idx: int) -> list[Prompt]:
        """The prompts on this frame, removed from the book."""
        return self.pending.pop(frame_idx, [])

    def take_until(self, frame_idx: int) -> list[Prompt]:
        """Every prompt on a frame up to and including `frame_idx`, in the order they were added, removed
        from the book."""
        taken = [p for f in [k for k in self.pending if k <= frame_idx] for p in self.pending.pop(f)]
        return sorted(taken, key=lambda p: self._order[id(p)])

    def next_frame(self) -> int | None:
        return min(self.pending) if self.pending else None


class SessionShell:
    """What every session has alike, its model in this process (SessionBase) or in the model process
    (worker/model/process_session.py ProcessSession): a position, its stats, its objects, iteration, closing
    once, a context manager. An implementation gives `_known` (its objects) and `_close`."""

    def __init__(self, start_frame: int = 0) -> None:
        self.start_frame = start_frame  # a resumed job's first frame: frames before it are not segmented
        self._position = start_frame
        self._closed = False
        self._stats: dict[str, float] = {}

    @property
    def obj_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self._known()))

    @property
    def position(self) -> int:
        return self._position

    @property
    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    @property
    def closed(self) -> bool:
        return self._closed

    def __iter__(self) -> Iterator[FrameMasks]:
        return self

    def __next__(self) -> FrameMasks:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        """Close once; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _known(self) -> set[int]:  # pragma: no cover - overridden
        raise NotImplementedError

    def reserve_ids(self, upto: int) -> None:
        """Session.reserve_ids: this model numbers no objects of its own."""

    def add_text(self, phrases: Sequence[str], *, fps: float | None = None) -> None:
        """Session.add_text: this model takes no text (SAM 3's session overrides it)."""
        raise PromptError(f"this worker's model takes no text prompts (asked for {', '.join(phrases)}): text jobs "
                          "go to a SAM 3 worker (python -m worker --model sam3)")

    def _close(self) -> None:
        """Free what the session holds (called once)."""

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this session is closed")


class SessionBase(SessionShell):
    """A session whose model runs in this process: iteration over a generator `_run()`, the PromptBook."""

    def __init__(self, start_frame: int = 0) -> None:
        super().__init__(start_frame)
        self.book = PromptBook()
        self._frames: Iterator[FrameMasks] | None = None

    # ---- the Session protocol -------------------------------------------------------------------
    def add_prompts(self, prompts: Sequence[Prompt], *, or_next: bool = False) -> None:
        self._check_open()
        if or_next:  # a frame already computed: the next one instead
            prompts = [dataclasses.replace(p, frame_idx=max(p.frame_idx, self._position)) for p in prompts]
        self.book.add(prompts, position=self._position, total=self._total())

    def remove_object(self, obj_id: int) -> None:
        self._check_open()
        self.book.remove(obj_id)

    def __next__(self) -> FrameMasks:
        self._check_open()
        if self._frames is None:
            self.book.started = True
            self._frames = self._run()
        return self._step(self._frames)

    def _known(self) -> set[int]:
        return self.book.known()

    def backfill(self, prompt: ObjectPrompt) -> Backfill:
        """Session.backfill, on this process's model (`_backfill_on`: the model, the job's frames, its size)."""
        self._check_open()
        model, frames, width, height = self._backfill_on()
        upto, t0 = self._position, time.monotonic()
        masks: dict[int, np.ndarray] = {}
        scores: dict[int, float] = {}
        empty = np.zeros((height, width), dtype=bool)
        with model.open_session(Prefix(frames, upto + 1), [prompt], width=width, height=height) as alone:
            for out in alone:
                frames.check()
                if prompt.obj_id in out.obj_ids:
                    k = out.obj_ids.index(prompt.obj_id)
                    masks[out.frame_idx], scores[out.frame_idx] = out.masks[k], float(out.scores[k])
        seed = masks.pop(upto, empty)
        self.add_prompts([MaskPrompt(prompt.obj_id, upto, seed)])
        seconds = time.monotonic() - t0
        log.info("object %d prompted on frame %d, already computed: propagated over frames 0..%d in %.2f s",
                 prompt.obj_id, prompt.frame_idx, upto, seconds)
        return Backfill(prompt.obj_id, upto, {k: masks.get(k, empty) for k in range(upto)},
                        {k: scores.get(k, 0.0) for k in range(upto)}, seconds, seed)

    def _backfill_on(self) -> tuple[Opens, FrameSource, int, int]:
        """The model a backfill opens its own session on, the job's frames, and their width and height."""
        raise PromptError(f"{type(self).__name__} cannot propagate a prompt on a frame already computed")

    def _close(self) -> None:
        try:
            if self._frames is not None:
                self._frames.close()  # type: ignore[attr-defined]  # a generator
        finally:
            self._release()

    # ---- for implementations ----------------------------------------------------------------------
    def _step(self, frames: Iterator[FrameMasks]) -> FrameMasks:
        """One frame from the generator (an implementation may wrap it in the model's context)."""
        return next(frames)

    def _run(self) -> Iterator[FrameMasks]:
        raise NotImplementedError

    def _total(self) -> int | None:
        """The video's frame count, when known."""
        return None

    def _release(self) -> None:
        """Free what the session holds."""
