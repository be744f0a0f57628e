"""Resume instead of restart: a reclaimed attempt goes on after the job's last published frame.

A job whose worker died at frame 900 of 1,000 used to run again from frame 0, Redis refusing the
duplicate entries: 900 frames of model time spent twice. Now an attempt after the first reads the
job's last `frame` entry (frames are published in order, so every frame before it is out too), seeds
each object with that frame's published mask (SAM 2's `add_new_mask`, worker/model/session.py
MaskPrompt), and opens its session there: the seed frame itself is not published again, the next one
is the first this attempt computes (`started.resume_from`). Prompts on later frames still apply when
their frame comes. The MP4 is drawn whole: the frames before the resume point from their published
masks, then the new ones as they come.

The masks after a resume are not bit-identical to an uninterrupted run's (the model's memory of the
frames before the seed is gone; the seed is the thresholded mask, not the model's logits). Every frame
still has exactly one entry. A job submitted with resume false, or a worker with VSEG_RESUME=off, runs
again from frame 0 instead, with the first attempt's exact masks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np

from schemas import messages
from schemas.errors import StorageError
from schemas.names import TERMINAL_ENTRY_ID, frame_entry_id
from schemas.rle import decode_mask
from worker.broker.publish import last_published_frame
from worker.model.session import MaskPrompt, Prompt, Session
from worker.output.render import MaskVideoWriter
from worker.output.sink import read_frame_bgr
from worker.service.context import WorkerContext
from worker.service.job import ValidJob
from worker.sources.frames import FrameSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resume:
    """Where an attempt starts: `first_frame` is the first it publishes; its session starts at `seed_frame`
    with `prompts` (the seeds, then the job's prompts on later frames). A fresh start: all zero, no prompts
    (the job's own are used)."""

    first_frame: int = 0
    seed_frame: int = 0
    prompts: tuple[Prompt, ...] = ()
    no_objects: bool = False  # a resumed job with every object removed: none, not the job's own prompts again


FRESH = Resume()


def resume_point(ctx: WorkerContext, job: ValidJob, attempt: int) -> Resume:
    """Where this attempt starts (see the module doc)."""
    if attempt == 1 or not job.resume or ctx.settings.resume != "on" or job.text:
        return FRESH  # a text job runs again from its first frame: SAM 3 takes no mask seeds (the same ids again)
    last = last_published_frame(ctx.client, ctx.keys, job.job_id)
    if last is None:
        return FRESH
    if job.live:
        return _live_resume(ctx, job, attempt, last)
    seeds = tuple(MaskPrompt(o.obj_id, last.frame_idx, decode_mask(o.mask).astype(bool)) for o in last.objects)
    later = tuple(p for p in job.prompts if p.frame_idx > last.frame_idx)
    log.info("job %s attempt %d resumes after frame %d (published by an earlier attempt), %d objects seeded with "
             "their masks there", job.job_id, attempt, last.frame_idx, len(seeds))
    return Resume(first_frame=last.frame_idx + 1, seed_frame=last.frame_idx, prompts=seeds + later)


def _live_resume(ctx: WorkerContext, job: ValidJob, attempt: int, last: messages.FrameResult) -> Resume:
    """A live job goes on at the live edge (worker/sources/live.py), each object seeded on the first frame it
    processes with its mask on the last frame processed before (the frames between are published skipped)."""
    processed = last if not last.skipped else last_processed_frame(ctx, job.job_id, before=last.frame_idx)
    if processed is None:  # none left on the trimmed stream: the job's own prompts again
        seeds: tuple[Prompt, ...] = ()
    else:
        seeds = tuple(MaskPrompt(o.obj_id, 0, decode_mask(o.mask).astype(bool)) for o in processed.objects)
    log.info("live job %s attempt %d resumes at the live edge after frame %d; %d objects seeded with their masks on "
             "frame %s", job.job_id, attempt, last.frame_idx, len(seeds),
             processed.frame_idx if processed is not None else "(none kept)")
    if processed is not None and not seeds:  # every object had been removed: none to track
        return Resume(first_frame=last.frame_idx + 1, seed_frame=0, prompts=(), no_objects=True)
    return Resume(first_frame=last.frame_idx + 1, seed_frame=0, prompts=seeds)


def last_processed_frame(ctx: WorkerContext, job_id: str, *, before: int, batch: int = 256) -> messages.FrameResult | None:
    """A live job's last frame entry before `before` that was segmented, not skipped (None if none is left)."""
    end = f"({frame_entry_id(before)}"
    while True:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], ctx.client.xrevrange(
            ctx.keys.results(job_id), max=end, min=frame_entry_id(0), count=batch))
        for _entry_id, fields in entries:
            if fields.get(b"type") != messages.EntryType.FRAME.value.encode():
                continue
            msg = messages.decode(fields)
            if isinstance(msg, messages.FrameResult) and not msg.skipped:
                return msg
        if len(entries) < batch:
            return None
        end = f"({entries[-1][0].decode()}"


def render_published(ctx: WorkerContext, job: ValidJob, frames: FrameSource, writer: MaskVideoWriter,
                     upto: int, progress: Callable[[], None], batch: int = 64) -> None:
    """Draw frames 0..upto-1 into the MP4 from their published masks (an earlier attempt's); each batch
    is progress (the lease's renewal) and a point where the job may be stopped."""
    start = frame_entry_id(0)
    done = 0
    while done < upto:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], ctx.client.xrange(
            ctx.keys.results(job.job_id), min=start, max=f"({TERMINAL_ENTRY_ID}", count=batch))
        if not entries:
            break
        for _entry_id, fields in entries:
            msg = messages.decode(fields)
            if not isinstance(msg, messages.FrameResult) or msg.frame_idx >= upto:
                continue
            image = read_frame_bgr(frames.path(msg.frame_idx))
            obj_ids = tuple(o.obj_id for o in msg.objects)
            masks = (np.stack([decode_mask(o.mask).astype(bool) for o in msg.objects]) if msg.objects
                     else np.zeros((0, *image.shape[:2]), dtype=bool))
            writer.write(image, obj_ids, masks)
            done += 1
        progress()
        start = f"({entries[-1][0].decode()}"
    if done != upto:
        raise StorageError(f"job {job.job_id}: {done} of the {upto} frames published before the resume point are on "
                           f"its result stream; cannot draw them")


LIVE_ID_BLOCK = 1_000_000  # a live text job's attempt numbers its objects in a block of its own


def text_ids_above(job: ValidJob, attempt: int) -> int:
    """The highest id a text job's objects must stay above: its prompted ids; and for a live job's later attempt,
    every id an earlier attempt may have given (a live job resumes at the live edge, where SAM 3 finds its
    instances anew: attempt N numbers them from (N - 1) * LIVE_ID_BLOCK + 1, so no id is ever reused). A file job
    runs again from its first frame and gives the same ids again."""
    above = max(job.obj_ids, default=0)
    return max(above, (attempt - 1) * LIVE_ID_BLOCK) if job.live else above


def start_text(session: Session, job: ValidJob, attempt: int) -> None:
    """A text job's phrases given to its new session, its ids kept above `text_ids_above`'s (nothing for a job
    without text)."""
    if job.text:
        session.reserve_ids(text_ids_above(job, attempt))
        session.add_text(job.text, fps=job.fps)
