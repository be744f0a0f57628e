"""A SAM 3 session whose memory stays bounded however many frames it sees.

transformers' `Sam3VideoInferenceSession` keeps every frame it was given and every output it computed.
What the model reads again is far less (docs/research/sam3.md): the frame it is on, each object's last
`max(num_maskmem, max_object_pointers_in_encoder)` = 16 tracked outputs, its conditioning outputs (where it
was detected or re-conditioned), and, for the hot start's bookkeeping, the frames of objects born in the
last `hotstart_delay` frames. `prune` drops the rest after each frame.

Two things make that exact rather than approximate:

- The tracker reads `num_frames` (object pointers' time encoding is normalised by min(num_frames, 16), and
  pointers at or past num_frames are skipped), which the library takes as len(processed_frames): pruning
  frames would change the masks. `BoundedSession.num_frames` is the file's frame count, or LIVE_FRAMES for a
  live job (the same masks as any real count of 16 frames or more).
- Conditioning outputs are never dropped for a file job: transformers reads the object pointers of *all* of
  an object's past conditioning frames, one more every `recondition_every_nth_frame` (16) frames. A live job
  keeps an object's newest `keep_cond` of them (default: the 4 its memory attention selects, so the memory
  read is unchanged; only the oldest pointers go): its masks equal the library's until an object has been
  re-conditioned more than `keep_cond` times, and its memory is bounded for good.

What stays is per object ever seen (its first frame, keep-alive count, hot-start verdict), not per frame.
"""

from __future__ import annotations

from typing import Any

from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

LIVE_FRAMES = 10**9  # a live job's num_frames: unbounded


class BoundedSession(Sam3VideoInferenceSession):
    """A session whose `num_frames` is the video's length as known up front, not the frames it holds."""

    def __init__(self, total_frames: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.total_frames = LIVE_FRAMES if total_frames is None else total_frames

    @property
    def num_frames(self) -> int:
        return self.total_frames


def prune(session: Sam3VideoInferenceSession, frame_idx: int, *, keep_outputs: int, hotstart_delay: int,
          keep_cond: int | None) -> None:
    """Drop what the model will not read again, just after it computed `frame_idx`: earlier frames, tracked
    outputs older than `keep_outputs` frames, per-frame scores and suppressions, the per-frame lists of objects
    past their hot start; and, with `keep_cond`, all but each object's newest `keep_cond` conditioning outputs."""
    _drop_before(session.processed_frames, frame_idx)
    _drop_before(session.obj_id_to_tracker_score_frame_wise, frame_idx)
    _drop_before(session.suppressed_obj_ids, frame_idx)
    for per_obj in (session.frames_tracked_per_obj, session.mask_inputs_per_obj, session.point_inputs_per_obj):
        for frames in per_obj.values():
            _drop_before(frames, frame_idx)
    for outputs in session.output_dict_per_obj.values():
        _drop_before(outputs["non_cond_frame_outputs"], frame_idx - keep_outputs + 1)
        cond = outputs["cond_frame_outputs"]
        if keep_cond is not None and len(cond) > keep_cond:
            for old in sorted(cond)[:-keep_cond]:
                del cond[old]
    # The hot start reads these lists' lengths only for objects born after frame_idx - hotstart_delay; for
    # older ones only that the key exists matters (keep-alive suppression walks the keys): keep the last entry.
    settled = frame_idx - hotstart_delay
    first = session.obj_first_frame_idx
    for obj_id, frames in session.unmatched_frame_inds.items():
        if first.get(obj_id, frame_idx) <= settled:
            del frames[:-1]
    for (_, obj_id), frames in session.overlap_pair_to_frame_inds.items():
        if first.get(obj_id, frame_idx) <= settled:
            del frames[:-1]


def _drop_before(by_frame: dict[int, Any] | None, frame_idx: int) -> None:
    if by_frame:
        for old in [k for k in by_frame if k < frame_idx]:
            del by_frame[old]


def held_entries(session: Sam3VideoInferenceSession) -> dict[str, int]:
    """How many per-frame entries the session holds, by kind (what `prune` bounds; tests and logs)."""
    outputs = session.output_dict_per_obj.values()
    return {
        "frames": len(session.processed_frames or {}),
        "tracked_outputs": sum(len(o["non_cond_frame_outputs"]) for o in outputs),
        "cond_outputs": sum(len(o["cond_frame_outputs"]) for o in outputs),
        "frame_scores": len(session.obj_id_to_tracker_score_frame_wise),
        "suppressed": len(session.suppressed_obj_ids),
        "tracked_marks": sum(len(f) for f in session.frames_tracked_per_obj.values()),
        "hotstart_lists": sum(len(f) for f in session.unmatched_frame_inds.values())
        + sum(len(f) for f in session.overlap_pair_to_frame_inds.values()),
    }
