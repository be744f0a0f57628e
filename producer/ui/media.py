"""The files the viewer serves, each path checked before it is opened.

- a file job's source video: its hash's `source_path` (absolute, as submitted), only while it is a regular file
  with a video file's suffix (a Redis field alone never makes the viewer serve an arbitrary file);
- a file job's render (`render_path`, relative to STORAGE_ROOT): the MP4 with the masks drawn in;
- a job's frames (`STORAGE_ROOT/jobs/<id>/frames/00042.jpg`, or `00042.taken.jpg` once a live worker took it)
  while they exist: a job's frames are removed when it ends (unless `keep_frames`), a live job's as they are
  processed;
- under `/media/`, a live job's preview playlist and segments: a path relative to STORAGE_ROOT, refused if it
  leaves it (`..`, an absolute path, a symlink out: schemas/storage.py `resolve_inside`), or if it is not an
  HLS file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from producer.ui.data import JobView
from runtime.settings import Settings
from schemas.errors import StorageError, VsegError
from schemas.storage import frame_index, frame_name, resolve_inside, taken_frame_name

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".ogv", ".avi", ".ts", ".mpg", ".mpeg"})
HLS_TYPES = {".m3u8": "application/vnd.apple.mpegurl", ".ts": "video/mp2t", ".m4s": "video/iso.segment",
             ".mp4": "video/mp4", ".aac": "audio/aac"}
MAX_FRAME = 10_000_000


class MediaGone(VsegError, LookupError):
    """What was asked for is not there (any more): a source file moved, frames removed, no render yet."""


def source_video(view: JobView) -> Path | None:
    """The file job's video as submitted, while it is there."""
    raw = view.fields.get("source_path", "")
    if view.live or not raw:
        return None
    path = Path(raw)
    if not path.is_absolute() or path.suffix.lower() not in VIDEO_SUFFIXES or not path.is_file():
        return None
    return path


def render_video(view: JobView, settings: Settings) -> Path | None:
    """The file job's MP4 with the masks drawn in, once it is complete."""
    rel = view.fields.get("render_path", "")
    if view.live or not rel:
        return None
    try:
        path = resolve_inside(settings.storage_root, rel)
    except StorageError:
        return None
    return path if path.is_file() else None


def frames_dir(view: JobView, settings: Settings) -> Path | None:
    try:
        return resolve_inside(settings.storage_root, view.frames_rel)
    except StorageError:
        return None


def frame_path(view: JobView, settings: Settings, frame_idx: int) -> Path | None:
    """Frame `frame_idx`'s JPEG while it exists (a live one also once a worker took it)."""
    folder = frames_dir(view, settings)
    if folder is None or not 0 <= frame_idx < MAX_FRAME:
        return None
    for name in (frame_name(frame_idx), taken_frame_name(frame_idx)):
        if (folder / name).is_file():
            return folder / name
    return None


def newest_frame(view: JobView, settings: Settings) -> tuple[int, Path] | None:
    """A live job's newest frame on disk, (index, path); None when none is there."""
    folder = frames_dir(view, settings)
    if folder is None:
        return None
    try:
        with os.scandir(folder) as it:
            names = [entry.name for entry in it]
    except OSError:
        return None
    found = []
    for name in names:
        try:
            found.append((frame_index(name.replace(".taken", "")), folder / name))
        except ValueError:
            continue
    return max(found) if found else None


def media_path(settings: Settings, rel: str) -> Path:
    """A live job's preview file under STORAGE_ROOT: StorageError if the path leaves it or is not an HLS
    file, FileNotFoundError if it is not there (a segment the rolling playlist has already dropped)."""
    path = resolve_inside(settings.storage_root, rel)
    if path.suffix.lower() not in HLS_TYPES:
        raise StorageError(f"/media/ serves a live job's preview (HLS playlists and segments: "
                           f"{', '.join(sorted(HLS_TYPES))}), not {rel!r}")
    if not path.is_file():
        raise FileNotFoundError(rel)
    return path


def media_urls(view: JobView, settings: Settings) -> dict[str, Any]:
    """The URLs of the job's picture the page may play, best first (GET /api/jobs/{id} `media`)."""
    job = view.job_id
    folder = frames_dir(view, settings)
    preview = view.fields.get("preview", "") if view.live else ""
    try:
        preview_ready = bool(preview) and resolve_inside(settings.storage_root, preview).is_file()
    except StorageError:
        preview, preview_ready = "", False
    return {
        "source": f"/api/jobs/{job}/video" if source_video(view) is not None else None,
        "render": f"/api/jobs/{job}/render" if render_video(view, settings) is not None else None,
        "frames": f"/api/jobs/{job}/frames/{{idx}}.jpg" if folder is not None and folder.is_dir() else None,
        "latest_frame": f"/api/jobs/{job}/frames/latest.jpg" if view.live else None,
        "preview": f"/media/{preview}" if preview else None,
        "preview_ready": preview_ready,
    }
