"""`watch`: follow a job to its end and write its masks (producer/results.py reads the stream).

A file job: `watch` collects the frames and writes DIR/masks.json once the job has completed (one document,
frames in order, `update` entries merged into the frames they name).

A live job (a camera that runs for days: the job hash's `live` field, or its job message's `live`) never ends
on its own, so `watch` streams instead, with memory bounded whatever the number of frames:

- DIR/frames.ndjson (FRAMES_NDJSON): one JSON object a line, appended and flushed as each result entry
  arrives, so `tail -f` follows it. Every line has a `type`:
  - `job`: the first line, {"type": "job", "job_id": ...}: which job the file holds;
  - `frame`: one per `frame` entry, skipped frames too: the frame as masks.json has it (`frame_idx`,
    `objects`, `skipped`: true for a frame passed over to keep up with the source) plus, when the worker
    set them, `captured_at` (Unix time), `pts_s` and `latency_s`;
  - `object`: an object added, corrected, removed, refused or lost (automatic objects), in its place
    among the frames (it takes effect on `frame_idx`), with its result-stream `entry_id`;
  - `update`: a frame's objects computed after the frame was published (file jobs' backfill: not written
    for live jobs today; the reader replaces those objects on that frame), with its `entry_id`.
- DIR/summary.json (SUMMARY_JSON): written (atomically) when the job ends: its `state` (completed, failed,
  cancelled, dead), `error`, `num_frames`, `last_frame_idx`, `render_path`, `random_weights`. Until it is
  there, frames.ndjson is still growing.

A `watch` restarted on the same DIR for the same job resumes after the file's last complete line (a frame
line's entry id is its frame index + 1, other lines carry theirs), so no line is written twice; a last line
cut short (the watcher killed mid-write) is truncated away first. The result stream of a live job is
trimmed (about live_results_maxlen entries): frames trimmed before `watch` read them are missing from the
file, which a warning says.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import redis
from tqdm import tqdm

from producer.results import (
    TERMINAL,
    WatchResult,
    change_json,
    follow,
    frame_json,
    is_live,
    job_failed,
    merge_update,
    render_of,
    require_job,
    write_atomically,
)
from producer.watch_live import watch_live
from runtime.connection import connect
from runtime.settings import Settings
from schemas import messages
from schemas.errors import VsegError

log = logging.getLogger(__name__)

UNKNOWN_TOTAL = 1 << 29  # a frame count at least this large is a placeholder for "not known yet", not a total


def watch(
    job_id: str,
    out_dir: Path,
    *,
    settings: Settings,
    client: redis.Redis | None = None,
    progress: bool = True,
    timeout_s: float | None = None,
) -> WatchResult:
    """Follow the job to its end, write out_dir/masks.json, return where the render is. `update` entries
    (a prompt on frames already published, propagated backwards) are merged into the frames they name.
    A live job instead streams out_dir/frames.ndjson as its results come and writes out_dir/summary.json
    at its end (see the module doc); its WatchResult's `masks_json` is the NDJSON file.

    Raises JobFailed with the worker's error if the job failed (a live job's summary.json written first),
    UnknownJobError (before `out_dir` is created) if there is no such job, VsegError if out_dir's
    frames.ndjson holds another job's frames.
    """
    client = client or connect(settings)
    require_job(job_id, settings=settings, client=client)
    if is_live(job_id, settings=settings, client=client):
        return watch_live(job_id, out_dir, settings=settings, client=client, progress=progress, timeout_s=timeout_s)
    frames: list[dict[str, Any]] = []  # out_dir is made only for masks.json: a failed job leaves none
    by_index: dict[int, dict[str, Any]] = {}
    changes: list[dict[str, Any]] = []
    started: messages.Started | None = None
    bar: tqdm[Any] | None = None
    try:
        for msg in follow(job_id, settings=settings, client=client, timeout_s=timeout_s):
            if isinstance(msg, messages.Started):
                started = msg
                if msg.random_weights:
                    log.warning("job %s runs with RANDOM WEIGHTS: its masks are meaningless", job_id)
                if progress and bar is None:
                    total = msg.num_frames if 0 < msg.num_frames < UNKNOWN_TOTAL else None  # not a placeholder
                    bar = tqdm(total=total, desc=f"job {job_id}", unit="frame", dynamic_ncols=True)
            elif isinstance(msg, messages.FrameResult):
                frame = frame_json(msg)
                frames.append(frame)
                by_index[msg.frame_idx] = frame
                if bar is not None:
                    bar.update(1)
            elif isinstance(msg, messages.FrameUpdate) and msg.frame_idx in by_index:
                merge_update(by_index[msg.frame_idx], msg)
            elif isinstance(msg, messages.ObjectChange):
                changes.append(change_json(msg))
            elif isinstance(msg, TERMINAL) and not isinstance(msg, messages.Completed):
                raise job_failed(job_id, msg)
            elif isinstance(msg, messages.Completed):
                return _finish(job_id, out_dir, frames, changes, started, msg, settings)
    finally:
        if bar is not None:
            bar.close()
    raise VsegError(f"result stream of job {job_id} ended without a terminal entry")


def _finish(
    job_id: str,
    out_dir: Path,
    frames: list[dict[str, Any]],
    changes: list[dict[str, Any]],
    started: messages.Started | None,
    done: messages.Completed,
    settings: Settings,
) -> WatchResult:
    frames.sort(key=lambda f: f["frame_idx"])
    doc = {
        "job_id": job_id,
        "num_frames": done.num_frames,
        "obj_ids": list(started.obj_ids) if started else [],
        "random_weights": done.random_weights,
        "render_path": done.render_path,
        "timings_s": done.timings_s,
        "frames": frames,
        "changes": changes,  # objects added, corrected, removed or refused on the running job, in stream order
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "masks.json"
    write_atomically(path, doc)
    return WatchResult(job_id, path, render_of(settings, done.render_path), done.num_frames, done.random_weights)
