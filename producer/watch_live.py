"""`watch` on a live job: DIR/frames.ndjson appended as the result entries arrive, DIR/summary.json at its
end, memory bounded whatever the number of frames (the format: producer/watching.py's module doc)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, BinaryIO

import redis
from tqdm import tqdm

from producer.results import (
    FRAMES_NDJSON,
    SUMMARY_JSON,
    TERMINAL,
    WatchResult,
    change_json,
    entries,
    frame_json,
    job_failed,
    object_json,
    render_of,
    write_atomically,
)
from runtime.settings import Settings
from schemas import messages
from schemas.errors import VsegError
from schemas.names import frame_entry_id

log = logging.getLogger(__name__)

# ---- live jobs: frames.ndjson --------------------------------------------------------------------------------

_CHUNK = 1 << 16
# Entries read at a time from a live job's stream: the most its watch holds (a camera's frames come a few dozen
# a second; catching up on a whole trimmed stream, about 10,000 entries, takes some 160 reads).
LIVE_READ_COUNT = 64


def _dumps(line: dict[str, Any]) -> bytes:
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def _last_newline(f: BinaryIO, end: int) -> int:
    """Offset of the last b"\n" before offset `end`, or -1; reads backwards a chunk at a time."""
    pos = end
    while pos > 0:
        start = max(0, pos - _CHUNK)
        f.seek(start)
        chunk = f.read(pos - start)
        k = chunk.rfind(b"\n")
        if k >= 0:
            return start + k
        pos = start
    return -1


def _read_line(f: BinaryIO, start: int) -> bytes:
    """The line starting at offset `start` (without its newline), read a chunk at a time."""
    f.seek(start)
    parts: list[bytes] = []
    while chunk := f.read(_CHUNK):
        k = chunk.find(b"\n")
        if k >= 0:
            parts.append(chunk[:k])
            break
        parts.append(chunk)
    return b"".join(parts)


def _parse(path: Path, raw: bytes, what: str) -> dict[str, Any]:
    try:
        line = json.loads(raw)
    except ValueError:
        line = None
    if not isinstance(line, dict) or not isinstance(line.get("type"), str):
        raise VsegError(f"cannot resume {path}: its {what} line is not one this watch wrote ({raw[:80]!r}); "
                        f"move the file away (or use another --out DIR) and watch again")
    return line


def _resume_point(path: Path, job_id: str) -> str:
    """Get `path` ready for appending and return the result-stream id to read after: "0-0" for a new file
    (its `job` line written), else the id of its last complete line, a half-written last line cut away."""
    with path.open("a+b") as f:
        size = f.seek(0, os.SEEK_END)
        end = _last_newline(f, size) + 1  # the complete lines' end; 0: none
        if end < size:
            log.warning("%s ends in a line cut short (%d bytes): truncating it away", path, size - end)
            f.truncate(end)
        if end == 0:
            f.write(_dumps({"type": "job", "job_id": job_id}))
            return "0-0"
        head = _parse(path, _read_line(f, 0), "first")
        if head["type"] != "job":
            raise VsegError(f"cannot resume {path}: it does not start with the `job` line this watch writes; move "
                            f"the file away (or use another --out DIR) and watch again")
        if head.get("job_id") != job_id:
            raise VsegError(f"{path} holds the results of job {head.get('job_id')!r}, not of {job_id!r}: watch "
                            f"{job_id} with another --out DIR")
        last = _parse(path, _read_line(f, _last_newline(f, end - 1) + 1), "last")
    if last["type"] == "job":
        return "0-0"
    if last["type"] == "frame" and isinstance(last.get("frame_idx"), int):
        return frame_entry_id(last["frame_idx"])
    if isinstance(last.get("entry_id"), str):
        return str(last["entry_id"])
    raise VsegError(f"cannot resume {path}: its last line has neither a frame index nor an entry id; move the "
                    f"file away (or use another --out DIR) and watch again")


def _next_frame(entry_id: str) -> int:
    """The first frame that can follow the entry `entry_id` (frame k is at (k+1)-0, changes at F-(k+2))."""
    return int(entry_id.split("-")[0])


def watch_live(
    job_id: str,
    out_dir: Path,
    *,
    settings: Settings,
    client: redis.Redis,
    progress: bool,
    timeout_s: float | None,
) -> WatchResult:
    """A live job's `watch`: frames.ndjson appended as entries arrive, summary.json at the end. Holds one
    entry at a time (and the reader's batch of at most LIVE_READ_COUNT): nothing grows with the number of
    frames."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FRAMES_NDJSON
    after = _resume_point(path, job_id)
    expected = _next_frame(after)  # the next frame's index, were none trimmed away
    last_frame: int | None = expected - 1 if expected > 0 else None
    if after != "0-0":
        log.info("job %s: resuming %s after entry %s", job_id, path, after)
    random_weights = False
    bar: tqdm[Any] | None = None
    if progress:
        bar = tqdm(desc=f"job {job_id} (live)", unit="frame", dynamic_ncols=True, initial=expected)
    try:
        with path.open("ab") as out:
            for entry_id, msg in entries(job_id, settings=settings, client=client, timeout_s=timeout_s, after=after,
                                          count=LIVE_READ_COUNT):
                line: dict[str, Any] | None = None
                if isinstance(msg, messages.Started):
                    if msg.random_weights and not random_weights:
                        log.warning("job %s runs with RANDOM WEIGHTS: its masks are meaningless", job_id)
                    random_weights = random_weights or msg.random_weights
                elif isinstance(msg, messages.FrameResult):
                    if msg.frame_idx > expected:
                        log.warning("job %s: frames %d..%d were trimmed from its result stream before this watch "
                                    "read them: they are not in %s", job_id, expected, msg.frame_idx - 1, path)
                    expected, last_frame = msg.frame_idx + 1, msg.frame_idx
                    random_weights = random_weights or msg.random_weights
                    line = {"type": "frame", **frame_json(msg)}
                    line.update({k: v for k, v in (("captured_at", msg.captured_at), ("pts_s", msg.pts_s),
                                                   ("latency_s", msg.latency_s)) if v is not None})
                    if bar is not None:
                        bar.update(1)
                elif isinstance(msg, messages.ObjectChange):
                    line = {"type": "object", **change_json(msg), "source": msg.source, "label": msg.label,
                            "request_id": msg.request_id, "requested_frame": msg.requested_frame, "at": msg.at,
                            "entry_id": entry_id}
                elif isinstance(msg, messages.FrameUpdate):
                    line = {"type": "update", "frame_idx": msg.frame_idx,
                            "objects": [object_json(o) for o in msg.objects], "request_id": msg.request_id,
                            "entry_id": entry_id}
                elif isinstance(msg, TERMINAL):
                    out.flush()
                    return _end_live(job_id, out_dir, msg, last_frame, random_weights, settings)
                if line is not None:
                    out.write(_dumps(line))  # one write a line, flushed: `tail -f` sees whole lines
                    out.flush()
    finally:
        if bar is not None:
            bar.close()
    raise VsegError(f"result stream of job {job_id} ended without a terminal entry")


def _end_live(
    job_id: str,
    out_dir: Path,
    msg: messages.Terminal,
    last_frame: int | None,
    random_weights: bool,
    settings: Settings,
) -> WatchResult:
    """summary.json for the terminal entry `msg`; the WatchResult (completed) or JobFailed (else)."""
    published = last_frame + 1 if last_frame is not None else 0
    failure = None if isinstance(msg, messages.Completed) else job_failed(job_id, msg)
    if isinstance(msg, messages.Completed):
        num_frames, render_path = msg.num_frames, msg.render_path
        random_weights = random_weights or msg.random_weights
    else:
        num_frames = msg.frames_done if isinstance(msg, messages.Cancelled) else published
        render_path = ""
    render = render_of(settings, render_path)
    write_atomically(out_dir / SUMMARY_JSON, {
        "job_id": job_id,
        "state": msg.TYPE.value,  # completed | failed | cancelled | dead
        "error": failure.error if failure is not None else None,
        "error_type": failure.error_type if failure is not None else None,
        "num_frames": num_frames,
        "last_frame_idx": last_frame,  # the last frame in frames.ndjson (None: none)
        "frames_file": FRAMES_NDJSON,
        "render_path": str(render) if render is not None else None,
        "random_weights": random_weights,
        "timings_s": msg.timings_s if isinstance(msg, messages.Completed) else {},
    })
    if failure is not None:
        raise failure
    return WatchResult(job_id, out_dir / FRAMES_NDJSON, render, num_frames, random_weights)
