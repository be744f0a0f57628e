"""A job's frame directory on the producer's side: made fresh before decoding, and removed again when
the job was never enqueued (no worker will ever read it, and nothing else would remove it), so a
refused submit leaves nothing under STORAGE_ROOT/jobs."""

from __future__ import annotations

import shutil
from pathlib import Path

from runtime.faults import SUBMIT_AGAIN, disk_fault
from runtime.settings import Settings
from schemas.storage import job_frames_rel, resolve_inside


def frames_dir_of(settings: Settings, job_id: str) -> tuple[str, Path]:
    """(frames_dir relative to STORAGE_ROOT, its absolute path) of a job the producer decodes; nothing
    is made on disk."""
    frames_rel = job_frames_rel(job_id)
    return frames_rel, resolve_inside(settings.storage_root, frames_rel)


def make_fresh(settings: Settings, frames_dir: Path) -> None:
    """Make `frames_dir`'s parent (the job's directory), and remove a `frames_dir` left by an earlier submit
    that died before enqueueing (no worker reads it), so it does not exist. Call it where a failure
    removes the job's directory again (`remove_job_dir`). A full disk is the one-line DiskFull that
    says what to do."""
    try:
        if frames_dir.exists():
            shutil.rmtree(frames_dir)
        frames_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        full = disk_fault(e, frames_dir.parent, settings.storage_root, then=SUBMIT_AGAIN)
        if full is None:
            raise
        raise full from e


def remove_job_dir(frames_dir: Path) -> None:
    """Remove the frames of a job that was never enqueued, and the job's directory if that leaves it empty."""
    shutil.rmtree(frames_dir, ignore_errors=True)
    try:
        frames_dir.parent.rmdir()
    except OSError:  # not empty (another file of the job's), or already gone
        pass
