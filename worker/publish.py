"""Writing a job's results: frame entries with ids derived from the frame index, lifecycle events, state."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import redis

from schemas import messages
from schemas.names import EVENTS_MAXLEN, STARTED_ENTRY_ID, Keys, frame_entry_id, terminal_entry_id
from schemas.rle import encode_mask, rle_area, rle_bbox_xyxy
from worker.segment import FrameMasks

log = logging.getLogger(__name__)


def frame_result(job_id: str, out: FrameMasks, *, random_weights: bool) -> messages.FrameResult:
    """RLE-encode every object's mask on one frame (pure)."""
    objects = []
    for obj_id, mask, score in zip(out.obj_ids, out.masks, out.scores):
        rle = encode_mask(np.asarray(mask, dtype=bool))
        objects.append(
            messages.ObjectResult(
                obj_id=int(obj_id), mask=rle, bbox_xyxy=rle_bbox_xyxy(rle), area=rle_area(rle), score=float(score)
            )
        )
    return messages.FrameResult(job_id=job_id, frame_idx=out.frame_idx, objects=tuple(objects), random_weights=random_weights)


def _is_duplicate_id(error: redis.ResponseError) -> bool:
    return "equal or smaller than the target stream top item" in str(error)


class ResultPublisher:
    """Publishes one job's entries. Frame k goes to id (k+1)-0, so a duplicate is rejected by Redis."""

    def __init__(self, client: redis.Redis, keys: Keys, job_id: str, num_frames: int) -> None:
        self.client = client
        self.keys = keys
        self.job_id = job_id
        self.num_frames = num_frames
        self.stream = keys.results(job_id)
        self.duplicates_rejected = 0

    def _xadd(self, entry_id: str, msg: messages.Message) -> bool:
        try:
            self.client.xadd(self.stream, messages.encode(msg), id=entry_id)  # type: ignore[arg-type]
            return True
        except redis.ResponseError as e:
            if not _is_duplicate_id(e):
                raise
            self.duplicates_rejected += 1
            log.info("job %s: entry %s already on %s; not written again", self.job_id, entry_id, self.stream)
            return False

    def event(self, msg: messages.Message) -> None:
        self.client.xadd(self.keys.events, messages.encode(msg), maxlen=EVENTS_MAXLEN, approximate=True)  # type: ignore[arg-type]

    def set_state(self, **fields: Any) -> None:
        self.client.hset(self.keys.job(self.job_id), mapping={k: str(v) for k, v in fields.items()})

    def started(self, msg: messages.Started) -> None:
        self._xadd(STARTED_ENTRY_ID, msg)
        self.set_state(state="running", worker=msg.worker, attempt=msg.attempt, started_at=msg.at)
        self.event(msg)

    def frame(self, result: messages.FrameResult) -> bool:
        return self._xadd(frame_entry_id(result.frame_idx), result)

    def progress(self, frames_done: int, fps: float) -> None:
        self.set_state(frames_done=frames_done)
        self.event(messages.Progress(self.job_id, frames_done, self.num_frames, fps=round(fps, 3)))

    def terminal(self, msg: messages.Completed | messages.Failed, *, ttl_s: int) -> bool:
        """Write the job's one terminal entry, its final state and event; start the results' expiry."""
        written = self._xadd(terminal_entry_id(self.num_frames), msg)
        if isinstance(msg, messages.Completed):
            self.set_state(state="completed", render_path=msg.render_path, finished_at=time.time(),
                           frames_done=msg.num_frames)
        else:
            self.set_state(state="failed", error=msg.error, error_type=msg.error_type, finished_at=time.time())
        self.event(msg)
        pipe = self.client.pipeline(transaction=False)
        pipe.expire(self.stream, ttl_s)
        pipe.expire(self.keys.job(self.job_id), ttl_s)
        pipe.execute()
        return written
