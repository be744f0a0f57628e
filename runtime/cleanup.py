"""When a job's frame directory is removed: once the job has ended and no producer still writes it.

A job's JPEGs (`STORAGE_ROOT/jobs/<id>/frames`, the directory `submit` makes) are only input: the masks
are on the result stream and the MP4 sits beside the frames, so unless `keep_frames` is on they are
removed when both sides are done, and disk use stays bounded however many jobs run. Two parties finish
at different times, in either order: the worker writes the job's terminal state, then looks for the
producer's end marker; a streaming producer writes its end (or error) marker, then looks for a
terminal state. Whichever looks second sees both and removes the directory (both may: removal is
idempotent), so frames a retry still needs are never removed and no finished job keeps its frames.
A frame directory a backend made itself (another `frames_dir` in its job message) is never touched.
"""

from __future__ import annotations

import logging
import shutil
from typing import cast

import redis

from runtime.settings import Settings
from schemas.names import TERMINAL_STATES
from schemas.storage import job_frames_rel, resolve_inside

log = logging.getLogger(__name__)


def job_ended(client: redis.Redis, settings: Settings, job_id: str) -> bool:
    """The job is in a terminal state (or its state has expired)."""
    state = cast(bytes | None, client.hget(settings.keys.job(job_id), "state"))
    return state is None or state.decode() in TERMINAL_STATES


def producer_finished(client: redis.Redis, settings: Settings, job_id: str) -> bool:
    """No producer writes the job's frames any more: it was not streamed (no frames stream), or its
    frames stream ends with the end or the error marker."""
    last = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrevrange(settings.keys.frames(job_id), count=1))
    return not last or b"end" in last[0][1] or b"error" in last[0][1]


def remove_frames(settings: Settings, job_id: str) -> bool:
    """Remove the job's frame directory unless `keep_frames` is on; True if one was removed."""
    if settings.keep_frames == "on":
        return False
    frames_dir = resolve_inside(settings.storage_root, job_frames_rel(job_id))
    if not frames_dir.exists():
        return False
    shutil.rmtree(frames_dir, ignore_errors=True)
    log.info("removed the frames of job %s (%s)", job_id, frames_dir)
    try:  # a job without a render leaves nothing else: no empty STORAGE_ROOT/jobs/<id>/ behind
        frames_dir.parent.rmdir()
    except OSError:
        pass  # its render (or a live job's HLS) is there
    return True
