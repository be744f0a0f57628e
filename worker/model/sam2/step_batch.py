"""Tracking steps batched across objects and sessions: SAM 2's per-object step run for many at once.

SAM 2 1.1.0's `propagate_in_video` tracks every object on its own: for each frame, each object runs
memory attention, the mask decoder and the memory encoder with a batch of one
(`_run_single_frame_inference`). With several objects, and several jobs' sessions on one shared model
(worker/model/turns.py), that is many small launches where one batch would do (on a GPU the launching
thread, not the GPU, sets the pace: worker/model/sam2/cuda_graphs.py).

`run_steps(predictor, steps)` runs plain tracking steps (no prompt on the frame, memory encoder on: the
only kind propagation runs) for any number of (inference state, object, frame) at once:
- per step, as SAM 2 does: the frame's image features (the state's feature cache) and the object's memory
  (its prompted frames, its last `num_maskmem - 1` frames and object pointers, `_memory` below, a copy of
  `SAM2Base._prepare_memory_conditioned_features` up to memory attention);
- steps whose memories have the same shape (the same number of memory frames and object pointers: every
  object past its first few frames) go through memory attention, the mask decoder and the memory encoder
  as one batch; each sample goes through the same operations as alone;
- per step again, SAM 2's post-processing (bf16 memory features, the shared position encoding), so the
  result is exactly what `_run_single_frame_inference` returns and is stored by SAM 2's own loop.
A batch of one is bit-identical to SAM 2's own step (tests/test_step_batch.py); a larger batch may choose
other kernels (measured there and in bench/RESULTS.md).

`BatchedSteps` (one per session, in its inference state) and the segmenter's `NextStepPool`
(worker/model/next_steps.py, `sessions` at most) put this under
SAM 2's loop: while a session holds its turn, `installed()` routes the predictor's plain per-object calls to
its session's `BatchedSteps`. The first object's call of a frame runs the step of every object of that
frame, and those of other sessions waiting for their turn that offered their next frame (up to the pool's
limit of sessions); the later calls, and the other sessions' next turns, find their result ready. A
waiting session does not touch its state, so the result computed for it is the one it would compute
itself; a step another session's frame fails to prepare (a corrupt frame) is left for that session to
fail on in its own turn. Once prepared, a step needs nothing more of its session's state, so a session
that leaves while waiting (a hand-back) only leaves a result nobody reads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sam2.modeling.sam2_utils import get_1d_sine_pe, select_closest_cond_frames
from sam2.utils.misc import fill_holes_in_mask_scores

from worker.model.next_steps import NextStepPool

log = logging.getLogger(__name__)

STATE_KEY = "vseg_batched_steps"  # where a session's BatchedSteps sits in its inference state
Result = tuple[dict[str, Any], torch.Tensor]  # (compact output, mask logits on the device): SAM 2's own


@dataclass(frozen=True)
class Step:
    """One object's tracking step on one frame of one session."""

    state: dict[str, Any]
    obj_idx: int
    frame_idx: int
    reverse: bool


@dataclass
class _Prepared:
    step: Step
    vision_feats: list[torch.Tensor]  # per level, (HW, 1, C)
    vision_pos: list[torch.Tensor]
    feat_sizes: list[tuple[int, int]]
    memory: torch.Tensor  # (tokens, 1, mem_dim)
    memory_pos: torch.Tensor
    num_obj_ptr_tokens: int
    storage: torch.device  # the state's storage device and constants: read once, so that a session that
    constants: dict[str, Any]  # leaves (a hand-back) while its step is computed elsewhere changes nothing here

    @property
    def shape(self) -> tuple[Any, ...]:
        return (tuple(self.memory.shape), self.memory.dtype, self.num_obj_ptr_tokens,
                tuple(tuple(f.shape) for f in self.vision_feats))


def supported(predictor: Any) -> str | None:
    """Why this model's steps cannot be batched, or None when they can."""
    if predictor.num_maskmem == 0:
        return "the model has no memory (num_maskmem 0)"
    if predictor.non_overlap_masks_for_mem_enc:
        return "non_overlap_masks_for_mem_enc mixes the objects of one batch"
    if not predictor.use_obj_ptrs_in_encoder:
        return "the model does not use object pointers in memory attention"
    return None


def run_steps(predictor: Any, steps: Sequence[Step]) -> list[Result]:
    """Each step's result, as `_run_single_frame_inference` returns it (see the module doc)."""
    prepared = [prepare(predictor, s) for s in steps]
    return run_prepared(predictor, prepared)


def prepare(predictor: Any, step: Step) -> _Prepared:
    _, _, feats, pos, sizes = predictor._get_image_feature(step.state, step.frame_idx, 1)
    memory, memory_pos, n_ptr = _memory(predictor, step, feats[-1].device)
    return _Prepared(step, feats, pos, sizes, memory, memory_pos, n_ptr, step.state["storage_device"],
                     step.state["constants"])


def run_prepared(predictor: Any, prepared: Sequence[_Prepared]) -> list[Result]:
    results: list[Result | None] = [None] * len(prepared)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(prepared):
        groups.setdefault(p.shape, []).append(i)
    for indices in groups.values():
        for i, result in zip(indices, _run_group(predictor, [prepared[i] for i in indices]), strict=True):
            results[i] = result
    return [r for r in results if r is not None]


def _run_group(predictor: Any, group: Sequence[_Prepared]) -> list[Result]:
    """Memory attention, the mask decoder and the memory encoder over steps with the same shapes."""
    first = group[0]
    batch = len(group)
    channels = predictor.hidden_dim
    height, width = first.feat_sizes[-1]
    feats = [torch.cat([p.vision_feats[level] for p in group], dim=1) for level in range(len(first.vision_feats))]
    pos = torch.cat([p.vision_pos[-1] for p in group], dim=1)
    pix = predictor.memory_attention(
        curr=feats[-1:], curr_pos=[pos],
        memory=torch.cat([p.memory for p in group], dim=1),
        memory_pos=torch.cat([p.memory_pos for p in group], dim=1),
        num_obj_ptr_tokens=first.num_obj_ptr_tokens,
    )
    pix = pix.permute(1, 2, 0).view(batch, channels, height, width)
    high_res = [x.permute(1, 2, 0).view(x.size(1), x.size(2), *s) for x, s in zip(feats[:-1], first.feat_sizes[:-1])]
    _, _, _, low_res_masks, high_res_masks, obj_ptr, score_logits = predictor._forward_sam_heads(
        backbone_features=pix, point_inputs=None, mask_inputs=None, high_res_features=high_res or None,
        multimask_output=predictor._use_multimask(False, None))
    out: dict[str, Any] = {"point_inputs": None, "mask_inputs": None}
    predictor._encode_memory_in_output(feats, first.feat_sizes, None, True, high_res_masks, score_logits, out)
    results = []
    for k, p in enumerate(group):  # SAM 2's post-processing (_run_single_frame_inference), per step
        storage = p.storage
        maskmem = _one(out["maskmem_features"], k, batch).to(torch.bfloat16).to(storage, non_blocking=True)
        masks = _one(low_res_masks, k, batch)
        if predictor.fill_hole_area > 0:
            masks = fill_holes_in_mask_scores(masks, predictor.fill_hole_area)
        pos_enc = predictor._get_maskmem_pos_enc({"constants": p.constants}, {"maskmem_pos_enc": [x[k : k + 1] for x in out["maskmem_pos_enc"]]})
        compact = {"maskmem_features": maskmem, "maskmem_pos_enc": pos_enc,
                   "pred_masks": masks.to(storage, non_blocking=True),
                   "obj_ptr": _one(obj_ptr, k, batch), "object_score_logits": _one(score_logits, k, batch)}
        results.append((compact, masks))
    return results


def _one(tensor: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Sample k of a batch, as a tensor of its own (a view would keep the whole batch alive in the state)."""
    return tensor if batch == 1 else tensor[k : k + 1].clone()


def _memory(predictor: Any, step: Step, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What memory attention reads for a plain tracking step: SAM2Base._prepare_memory_conditioned_features
    (sam2 1.1.0) for a frame that is not an initial conditioning frame, up to the memory attention call."""
    m = predictor
    output_dict = step.state["output_dict_per_obj"][step.obj_idx]
    frame_idx, reverse = step.frame_idx, step.reverse
    num_frames = step.state["num_frames"]
    channels = m.hidden_dim
    memories, memory_pos = [], []
    cond_outputs = output_dict["cond_frame_outputs"]
    if not cond_outputs:
        raise ValueError(f"object {step.obj_idx} has no prompted frame to track from")
    selected, unselected = select_closest_cond_frames(frame_idx, cond_outputs, m.max_cond_frames_in_attn)
    t_pos_and_prevs = [(0, out) for out in selected.values()]
    stride = 1 if m.training else m.memory_temporal_stride_for_eval
    for t_pos in range(1, m.num_maskmem):
        t_rel = m.num_maskmem - t_pos
        if t_rel == 1:
            prev = frame_idx + t_rel if reverse else frame_idx - t_rel
        elif not reverse:
            prev = ((frame_idx - 2) // stride) * stride - (t_rel - 2) * stride
        else:
            prev = -(-(frame_idx + 2) // stride) * stride + (t_rel - 2) * stride
        out = output_dict["non_cond_frame_outputs"].get(prev, None)
        if out is None:
            out = unselected.get(prev, None)
        t_pos_and_prevs.append((t_pos, out))
    for t_pos, prev_out in t_pos_and_prevs:
        if prev_out is None:
            continue
        feats = prev_out["maskmem_features"].to(device, non_blocking=True)
        memories.append(feats.flatten(2).permute(2, 0, 1))
        enc = prev_out["maskmem_pos_enc"][-1].to(device)
        enc = enc.flatten(2).permute(2, 0, 1)
        memory_pos.append(enc + m.maskmem_tpos_enc[m.num_maskmem - t_pos - 1])
    num_obj_ptr_tokens = 0
    max_ptrs = min(num_frames, m.max_obj_ptrs_in_encoder)
    if not m.training and m.only_obj_ptrs_in_the_past_for_eval:
        ptr_cond = {t: out for t, out in selected.items() if (t >= frame_idx if reverse else t <= frame_idx)}
    else:
        ptr_cond = selected
    sign = -1 if reverse else 1
    pos_and_ptrs = [((frame_idx - t) * sign if m.use_signed_tpos_enc_to_obj_ptrs else abs(frame_idx - t), out["obj_ptr"])
                    for t, out in ptr_cond.items()]
    for t_diff in range(1, max_ptrs):
        t = frame_idx + t_diff if reverse else frame_idx - t_diff
        if t < 0 or (num_frames is not None and t >= num_frames):
            break
        out = output_dict["non_cond_frame_outputs"].get(t, unselected.get(t, None))
        if out is not None:
            pos_and_ptrs.append((t_diff, out["obj_ptr"]))
    if pos_and_ptrs:
        pos_list, ptrs_list = zip(*pos_and_ptrs, strict=True)
        obj_ptrs = torch.stack(ptrs_list, dim=0)
        if m.add_tpos_enc_to_obj_ptrs:
            t_diff_max = max_ptrs - 1
            tpos_dim = channels if m.proj_tpos_enc_in_obj_ptrs else m.mem_dim
            obj_pos = torch.tensor(pos_list).to(device=device, non_blocking=True)
            obj_pos = m.obj_ptr_tpos_proj(get_1d_sine_pe(obj_pos / t_diff_max, dim=tpos_dim))
            obj_pos = obj_pos.unsqueeze(1).expand(-1, 1, m.mem_dim)
        else:
            obj_pos = obj_ptrs.new_zeros(len(pos_list), 1, m.mem_dim)
        if m.mem_dim < channels:
            obj_ptrs = obj_ptrs.reshape(-1, 1, channels // m.mem_dim, m.mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
            obj_pos = obj_pos.repeat_interleave(channels // m.mem_dim, dim=0)
        memories.append(obj_ptrs)
        memory_pos.append(obj_pos)
        num_obj_ptr_tokens = obj_ptrs.shape[0]
    return torch.cat(memories, dim=0), torch.cat(memory_pos, dim=0), num_obj_ptr_tokens


class BatchedSteps:
    """One session's side of step batching: results computed ahead, and the offers it makes."""

    def __init__(self, state: dict[str, Any], pool: NextStepPool) -> None:
        self.state = state
        self.pool = pool
        self._ready: dict[tuple[int, int, bool], Result] = {}
        self._lock = threading.Lock()  # the session's thread reads what another session's thread fills
        self.batched = 0  # this session's steps run in a batch of more than one

    def clear(self) -> None:
        """Forget results computed ahead (the objects or the direction changed)."""
        with self._lock:
            self._ready.clear()

    def steps_at(self, frame_idx: int, reverse: bool, first_obj: int = 0) -> list[Step]:
        """The plain steps SAM 2's loop runs on `frame_idx` from object `first_obj` on (prompted frames reuse
        their output)."""
        outputs = self.state["output_dict_per_obj"]
        return [Step(self.state, obj_idx, frame_idx, reverse) for obj_idx in range(first_obj, len(outputs))
                if frame_idx not in outputs[obj_idx]["cond_frame_outputs"]]

    def result(self, predictor: Any, obj_idx: int, frame_idx: int, reverse: bool) -> Result:
        """This session's object's step on `frame_idx`: computed ahead, or now with the frame's other steps."""
        key = (obj_idx, frame_idx, reverse)
        with self._lock:
            hit = self._ready.pop(key, None)
            if hit is None:
                self._ready.clear()
        if hit is not None:
            return hit
        own = self.steps_at(frame_idx, reverse, obj_idx)
        prepared = [prepare(predictor, s) for s in own]
        owners: list[BatchedSteps] = [self] * len(own)
        for other, other_frame in self.pool.take_steps(exclude=self):
            try:
                steps = other.steps_at(other_frame, False)
                for step in steps:
                    prepared.append(prepare(predictor, step))
                    owners.append(other)
            except Exception as exc:  # noqa: BLE001 - its own turn meets this again, and fails its own job only
                log.debug("a step offered by another session is left to it: %s", exc)
        return self._run(predictor, prepared, owners, obj_idx)

    def _run(self, predictor: Any, prepared: list[_Prepared], owners: list[BatchedSteps], obj_idx: int) -> Result:
        results = run_prepared(predictor, prepared)
        self.pool.passes += 1
        self.pool.largest = max(self.pool.largest, len(results))
        mine = None
        for owner, p, res in zip(owners, prepared, results, strict=True):
            s = p.step
            if owner is self and s.obj_idx == obj_idx:
                mine = res
            else:
                with owner._lock:
                    owner._ready[(s.obj_idx, s.frame_idx, s.reverse)] = res
            if len(results) > 1:
                owner.batched += 1
            if owner is not self:
                self.pool.shared_steps += 1
        if mine is None:
            raise RuntimeError(f"object {obj_idx}'s step on frame {prepared[0].step.frame_idx} was not run")
        return mine


@contextlib.contextmanager
def installed(predictor: Any) -> Iterator[None]:
    """Route the predictor's plain per-object steps of sessions that batch to their BatchedSteps (one
    session's turn: nobody else uses the predictor meanwhile)."""
    original: Callable[..., Result] = predictor._run_single_frame_inference

    def run_single_frame_inference(inference_state: dict[str, Any], output_dict: dict[str, Any], frame_idx: int,
                                   batch_size: int, is_init_cond_frame: bool, point_inputs: Any, mask_inputs: Any,
                                   reverse: bool, run_mem_encoder: bool, prev_sam_mask_logits: Any = None) -> Result:
        steps: BatchedSteps | None = inference_state.get(STATE_KEY)
        plain = (steps is not None and batch_size == 1 and not is_init_cond_frame and point_inputs is None
                 and mask_inputs is None and run_mem_encoder and prev_sam_mask_logits is None)
        obj_idx = _obj_idx(inference_state, output_dict) if plain else None
        if steps is None or obj_idx is None:
            return original(inference_state, output_dict, frame_idx, batch_size, is_init_cond_frame, point_inputs,
                            mask_inputs, reverse, run_mem_encoder, prev_sam_mask_logits)
        return steps.result(predictor, obj_idx, frame_idx, reverse)

    predictor._run_single_frame_inference = run_single_frame_inference
    try:
        yield
    finally:
        del predictor._run_single_frame_inference  # the class's own again


def _obj_idx(state: dict[str, Any], output_dict: dict[str, Any]) -> int | None:
    """The object whose (non-temporary) outputs these are, or None."""
    for obj_idx, outputs in state["output_dict_per_obj"].items():
        if outputs is output_dict:
            return int(obj_idx)
    return None
