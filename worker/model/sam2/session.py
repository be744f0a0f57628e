"""One job's session on SAM 2's video predictor (worker/model/session.py has the protocol).

The session owns the predictor's inference state for its job, built over lazily loaded frames
(worker/model/sam2/lazy_frames.py) and a batched feature cache (worker/model/sam2/encoder_batch.py), and its stats.
The predictor itself (weights, CUDA graphs) is the Sam2Segmenter's, shared by every session; each step
(one frame) runs in a turn of the segmenter's (worker/model/turns.py: fair, a live job's first), with its
CUDA graphs installed, in inference mode and (on CUDA) bf16 autocast, so sessions on several threads take
turns frame by frame and never see each other's state.

Unlike the predictor's own `init_state`, which loads every frame before the first mask and keeps every
frame's state forever, per-frame state that memory attention can no longer read is released as
propagation moves on: only the prompted (conditioning) frames and the last `window` frames are kept,
where `window` covers both the `num_maskmem` memory frames and the `max_obj_ptrs_in_encoder` object
pointers. The masks are identical to the unpruned predictor's (tests/test_sam2_memory.py).

Frame order. Results come in frame order, so propagation runs in two passes: first backwards from the
last frame M prompted before the session started down to frame 0 (buffering frames 0..M-1, which only
that pass reaches for objects prompted late), then forwards from M, yielding as it goes. Prompts added
later, and removals, take effect at their frame: the forward pass stops before it, applies them, and
starts again from there (sam2 1.1.0 tracks each object on its own and takes new object ids after
tracking started, so the objects already tracked get the same masks as without the change).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, cast

import numpy as np
import torch

from schemas.errors import PromptError
from worker.model.frame_masks import FrameMasks
from worker.model.next_steps import NextStepPool
from worker.model.sam2.encoder_batch import BatchedFeatures
from worker.model.sam2.lazy_frames import UNKNOWN_LENGTH, EndOfFrames, LazyFrames
from worker.model.sam2.step_batch import STATE_KEY, BatchedSteps
from worker.model.session import MaskPrompt, Opens, Prompt, SessionBase
from worker.model.turns import Turn
from worker.sources.frames import FrameSource, frame_ready, turn_wait_check

log = logging.getLogger(__name__)


class SharedModel(Protocol):
    """What a session uses of the model every session shares (worker.model.sam2.segmenter.Sam2Segmenter)."""

    predictor: Any  # SAM2VideoPredictor
    torch_device: torch.device
    graphs: Any  # worker.model.sam2.cuda_graphs.GraphCache, or None (eager)
    encoder_batch: int
    pool: NextStepPool  # next steps of sessions waiting for their turn, run with the current one's
    prune: bool
    window: int  # frames of per-frame state memory attention still reads

    def stepping(self, *, live: bool = False, check: Callable[[], None] | None = None) -> AbstractContextManager[Turn]: ...


class Sam2Session(SessionBase):
    """One job's propagation over a shared Sam2Segmenter (see the module doc)."""

    def __init__(self, model: SharedModel, frames: FrameSource, prompts: Sequence[Prompt], *,
                 width: int, height: int, start_frame: int = 0) -> None:
        super().__init__(start_frame)
        self.model = model
        self.predictor = model.predictor
        self.frames = frames
        self.width, self.height = width, height
        self.images = LazyFrames(frames, self.predictor.image_size, model.torch_device)
        encode = model.graphs.image if model.graphs is not None else self.predictor.forward_image
        self.features = BatchedFeatures(self.images, encode, model.torch_device, batch=model.encoder_batch,
                                        pool=model.pool)
        self.state = self._new_state()
        # objects' tracking steps batched (worker/model/sam2/step_batch.py): this session's, and other sessions' next
        self.steps = BatchedSteps(self.state, model.pool) if model.pool.sessions > 1 else None
        if self.steps is not None:
            self.state[STATE_KEY] = self.steps
        self._forward_to: int | None = None  # the frame a running forward pass steps next (its steps may be offered)
        self.peak_frames_held = 0
        # A live session runs for days and is prompted again and again (prompts, automatic prompts): SAM 2 reads
        # every prompted frame in memory attention (max_cond_frames_in_attn is unlimited), so only the newest
        # max_cond_frames are kept once out of the window (worker/sources/live.py); 0: all (a file job)
        self.max_cond_frames = frames.max_cond_frames
        self.live = frames.realtime  # a live job's frames: its turns come first
        self.add_prompts(prompts)

    def _backfill_on(self) -> tuple[Opens, FrameSource, int, int]:
        """A backfill opens a session of its own on the same shared model (its steps take turns as any job's)."""
        return cast(Opens, self.model), self.frames, self.width, self.height

    def _new_state(self) -> dict[str, Any]:
        """The predictor's inference state, as init_state builds it, over lazily loaded frames."""
        device = self.model.torch_device
        return {
            "images": self.images, "num_frames": len(self.images),
            "offload_video_to_cpu": False, "offload_state_to_cpu": False,
            "video_height": self.height, "video_width": self.width,
            "device": device, "storage_device": device,
            "point_inputs_per_obj": {}, "mask_inputs_per_obj": {},
            "cached_features": self.features, "constants": {},
            "obj_id_to_idx": OrderedDict(), "obj_idx_to_id": OrderedDict(), "obj_ids": [],
            "output_dict_per_obj": {}, "temp_output_dict_per_obj": {}, "frames_tracked_per_obj": {},
        }

    def _total(self) -> int | None:
        return self.frames.total

    def _step(self, frames: Iterator[FrameMasks]) -> FrameMasks:
        self.frames.wait(self._position)  # the next frame, waited for before the turn: other jobs step meanwhile
        # its next step, offered: its frame encoded, and its objects tracked, in another session's pass if one runs first
        self.model.pool.offer(self, self._position,
                              features=self.features if self.features.offerable(self._position) else None,
                              steps=self.steps if self.steps is not None and self._plain_step_next() else None)
        try:  # while this session holds the turn no other encodes: its offer goes when the step ends
            with self.model.stepping(live=self.live, check=turn_wait_check(self.frames)) as turn:
                out = next(frames)
                turn.hold = self.live and frame_ready(self.frames, self._position)
                return out
        finally:
            self.model.pool.withdraw(self)

    def _plain_step_next(self) -> bool:
        """Whether the next step is the running forward pass's next frame, with no change of objects on it."""
        total = self.frames.total
        return (self._forward_to == self._position and not self.book.removals
                and self._position not in self.book.pending and (total is None or self._position < total))

    # ---- propagation ------------------------------------------------------------------------------
    def _run(self) -> Iterator[FrameMasks]:
        # the prompts given before the first frame (a resumed session: those on its start frame, its seeds)
        first = self.book.take_until(UNKNOWN_LENGTH if self.start_frame == 0 else self.start_frame)
        last_prompted = max((p.frame_idx for p in first), default=self.start_frame)
        self._position = last_prompted
        self._apply(first)
        if self.start_frame == 0 and last_prompted > 0 and self.book.tracked:  # a resumed one goes forwards only
            earlier: dict[int, FrameMasks] = {}
            for out in self._propagate(last_prompted, reverse=True):
                if out.frame_idx < last_prompted:
                    earlier[out.frame_idx] = out
            for frame_idx in range(last_prompted):
                yield _without(earlier.pop(frame_idx), self.book.removals)
        start = last_prompted
        while True:
            self._position = start
            self._apply_changes(start)
            if self.frames.total is not None and start >= self.frames.total:
                return
            if not self.book.tracked:  # nothing to track on this frame: an empty result once it exists
                if not self.frames.wait(start):
                    return
                self.images.take_rgb(start)
                start += 1
                self._position = start
                yield FrameMasks(start - 1, (), np.zeros((0, self.height, self.width), dtype=bool),
                                 np.zeros(0, dtype=np.float32))
                continue
            forward = self._propagate(start, reverse=False)
            try:
                for out in forward:
                    start = out.frame_idx + 1
                    self._position = start  # before the frame is out: prompts may then target `start`
                    yield dataclasses.replace(out, image_rgb=self.images.take_rgb(out.frame_idx))
                    if self.book.removals or start in self.book.pending:
                        break  # the objects change at `start`: propagate again from there
                else:
                    if self.book.pending:
                        log.warning("prompts on frames %s were never reached: the video has %s frames",
                                    sorted(self.book.pending), self.frames.total)
                    return
            finally:
                forward.close()  # type: ignore[attr-defined]  # a generator

    def _apply_changes(self, frame_idx: int) -> None:
        if self.steps is not None:
            self.steps.clear()
        for obj_id in self.book.removals:
            self.predictor.remove_object(self.state, obj_id, need_output=False)
            self.book.tracked.discard(obj_id)
        self.book.removals.clear()
        self._apply(self.book.take(frame_idx))

    def _apply(self, prompts: Sequence[Prompt]) -> None:
        for p in prompts:
            if not self.frames.wait(p.frame_idx):
                raise PromptError(f"prompt for object {p.obj_id} is on frame {p.frame_idx}, but the video "
                                  f"has {self.frames.total} frames")
            if isinstance(p, MaskPrompt):
                self.predictor.add_new_mask(self.state, frame_idx=p.frame_idx, obj_id=p.obj_id, mask=p.mask)
                self.book.tracked.add(p.obj_id)
                continue
            self.predictor.add_new_points_or_box(
                self.state,
                frame_idx=p.frame_idx,
                obj_id=p.obj_id,
                points=np.asarray(p.points_xy, dtype=np.float32).reshape(-1, 2) if p.points_xy else None,
                labels=np.asarray(p.labels, dtype=np.int32) if p.points_xy else None,
                box=np.asarray(p.box_xyxy, dtype=np.float32) if p.box_xyxy is not None else None,
            )
            self.book.tracked.add(p.obj_id)

    def _propagate(self, start: int, *, reverse: bool) -> Iterator[FrameMasks]:
        state = self.state
        state["num_frames"] = self.frames.total or UNKNOWN_LENGTH
        if self.steps is not None:
            self.steps.clear()
        steps = self.predictor.propagate_in_video(state, start_frame_idx=start, reverse=reverse)
        try:
            while True:
                try:
                    frame_idx, obj_ids, mask_logits = next(steps)
                except (StopIteration, EndOfFrames):
                    return
                masks = (mask_logits[:, 0] > 0.0).to("cpu", non_blocking=False).numpy()  # threshold on the device
                out = FrameMasks(int(frame_idx), tuple(int(i) for i in obj_ids), masks,
                                 self._object_scores(int(frame_idx), len(obj_ids)))
                if self.model.prune:
                    self._release_old_frames(int(frame_idx), reverse=reverse, protect=start)
                if self.frames.total is not None:
                    state["num_frames"] = self.frames.total
                self._forward_to = None if reverse else int(frame_idx) + 1
                yield _ordered(out)
                self._forward_to = None
                if not reverse and self.frames.total is not None and frame_idx + 1 >= self.frames.total:
                    return
        finally:
            self._forward_to = None
            steps.close()

    def _release_old_frames(self, frame_idx: int, *, reverse: bool, protect: int) -> None:
        """Drop per-frame outputs memory attention can no longer read. Frames within `window` of the
        current one stay, and in the backward pass so do those within `window` of `protect` (the forward
        pass starts there and reads them)."""
        window = self.model.window
        held = 0
        for obj_idx, outputs in self.state["output_dict_per_obj"].items():
            non_cond = outputs["non_cond_frame_outputs"]
            tracked = self.state["frames_tracked_per_obj"][obj_idx]
            for t in list(non_cond):
                stale = t > frame_idx + window if reverse else t < frame_idx - window
                if stale and not (reverse and protect - window <= t <= protect):
                    del non_cond[t]
                    tracked.pop(t, None)
            held = max(held, len(non_cond))
            if self.max_cond_frames and not reverse:
                self._release_old_prompts(obj_idx, outputs["cond_frame_outputs"], tracked, frame_idx - window)
        self.peak_frames_held = max(self.peak_frames_held, held)

    def _release_old_prompts(self, obj_idx: int, cond: dict[int, Any], tracked: dict[int, Any], before: int) -> None:
        """Drop an object's oldest prompted frames beyond the newest max_cond_frames, once they are out of
        memory attention's window (`before`): a live session's memory stays bounded however often it is prompted."""
        extra = len(cond) - self.max_cond_frames
        for t in sorted(cond)[:max(0, extra)]:
            if t >= before:
                break
            del cond[t]
            tracked.pop(t, None)
            self.state["point_inputs_per_obj"].get(obj_idx, {}).pop(t, None)
            self.state["mask_inputs_per_obj"].get(obj_idx, {}).pop(t, None)

    def _object_scores(self, frame_idx: int, num_objects: int) -> np.ndarray:
        """SAM 2's object presence score per object on this frame, as a probability."""
        found: list[int] = []
        logits: list[torch.Tensor] = []
        for obj_idx in range(num_objects):
            outputs = self.state["output_dict_per_obj"][obj_idx]
            out = outputs["cond_frame_outputs"].get(frame_idx) or outputs["non_cond_frame_outputs"].get(frame_idx)
            if out is not None and out.get("object_score_logits") is not None:
                found.append(obj_idx)
                logits.append(out["object_score_logits"].flatten()[:1])
        scores = np.zeros(num_objects, dtype=np.float32)
        if logits:  # one copy from the device for all objects
            scores[found] = torch.sigmoid(torch.cat(logits).float()).cpu().numpy()
        return scores

    # ---- the end ----------------------------------------------------------------------------------
    def _release(self) -> None:
        images = self.images
        images.close()
        if images.loaded:
            self._stats = {"loaded": images.loaded, "waited_s": images.waited_s,
                           "load_ms": 1000 * images.load_s / images.loaded, "peak_frames_held": self.peak_frames_held,
                           "encoded": self.features.encoded, "batched": self.features.batched,
                           "steps_batched": self.steps.batched if self.steps is not None else 0}
            log.info("frames: %d loaded (%.1f ms each on a loader thread); the model waited %.2f s for them",
                     images.loaded, 1000 * images.load_s / images.loaded, images.waited_s)
        if self.model.graphs is not None:
            log.info("CUDA graphs so far: %s", self.model.graphs.summary())
        self.features.clear()
        self.state.clear()
        if self.model.torch_device.type == "cuda":
            torch.cuda.empty_cache()


def _without(out: FrameMasks, removed: Sequence[int]) -> FrameMasks:
    """A buffered frame less the objects removed since it was computed."""
    keep = [k for k, obj_id in enumerate(out.obj_ids) if obj_id not in removed]
    if len(keep) == len(out.obj_ids):
        return out
    return FrameMasks(out.frame_idx, tuple(out.obj_ids[k] for k in keep), out.masks[keep], out.scores[keep],
                      out.image_rgb)


def _ordered(out: FrameMasks) -> FrameMasks:
    """Objects sorted by id (SAM 2 orders them by first prompt)."""
    expected = tuple(sorted(out.obj_ids))
    if out.obj_ids == expected:
        return out
    order = [out.obj_ids.index(i) for i in expected]
    return FrameMasks(out.frame_idx, expected, out.masks[order], out.scores[order], out.image_rgb)
