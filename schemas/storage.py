"""Where a job's files live under STORAGE_ROOT, and the guard that keeps jobs inside it."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from schemas.errors import StorageError
from schemas.names import validate_job_id

FRAME_SUFFIX = ".jpg"


def frame_name(frame_idx: int) -> str:
    """File name of frame `frame_idx` in a frame directory: 00000.jpg, 00001.jpg, ..."""
    if frame_idx < 0:
        raise ValueError(f"frame_idx must be >= 0, but got {frame_idx}")
    return f"{frame_idx:05d}{FRAME_SUFFIX}"


def taken_frame_name(frame_idx: int) -> str:
    """A live frame's JPEG once a worker took it (renamed, so that its producer can no longer give it up:
    producer/live_buffer.py): 00042.taken.jpg."""
    return f"{frame_idx:05d}.taken{FRAME_SUFFIX}"


def frame_index(name: str) -> int:
    """Inverse of frame_name: '00042.jpg' -> 42."""
    stem, dot, suffix = name.rpartition(".")
    if not dot or f".{suffix}" != FRAME_SUFFIX or not stem.isdigit():
        raise ValueError(f"frame file name must look like 00042{FRAME_SUFFIX}, but got {name!r}")
    return int(stem)


def job_frames_rel(job_id: str) -> str:
    """Frame directory of a job, relative to STORAGE_ROOT."""
    return f"jobs/{validate_job_id(job_id)}/frames"


def job_render_rel(job_id: str, *, live: bool = False) -> str:
    """Rendered MP4 of a job, relative to STORAGE_ROOT; a live job's rolling HLS playlist (its segments beside it)."""
    if live:
        return f"jobs/{validate_job_id(job_id)}/live/index.m3u8"
    return f"jobs/{validate_job_id(job_id)}/render.mp4"


def job_preview_rel(job_id: str) -> str:
    """A live job's preview (producer/preview.py): every captured frame as rolling HLS, without masks."""
    return f"jobs/{validate_job_id(job_id)}/preview/index.m3u8"


def resolve_inside(root: Path, rel: str) -> Path:
    """Resolve `rel` under `root`, refusing absolute paths, '..' and symlinks that leave the root."""
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or ".." in pure.parts:
        raise StorageError(
            f"path must be relative to STORAGE_ROOT and stay inside it, but got {rel!r}"
        )
    root_resolved = root.resolve()
    path = (root_resolved / pure).resolve()
    if path != root_resolved and root_resolved not in path.parents:
        raise StorageError(f"path {rel!r} resolves to {path}, outside STORAGE_ROOT {root_resolved}")
    return path


def check_frame_dir(frames_dir: Path, num_frames: int) -> None:
    """Raise StorageError unless `frames_dir` holds exactly frames 0..num_frames-1."""
    if not frames_dir.is_dir():
        raise StorageError(
            f"frame directory {frames_dir} does not exist: is STORAGE_ROOT the same for the producer "
            f"and the worker (a shared volume)?"
        )
    present = set()
    for entry in frames_dir.iterdir():
        try:
            present.add(frame_index(entry.name))
        except ValueError:
            continue
    missing = [i for i in range(num_frames) if i not in present]
    if missing:
        shown = ", ".join(frame_name(i) for i in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise StorageError(
            f"frame directory {frames_dir} is incomplete: expected {num_frames} frames, "
            f"missing {shown}{more}; resubmit the video"
        )
