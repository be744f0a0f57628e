"""Decoding a video file with PyAV into a JPEG frame directory (00000.jpg, 00001.jpg, ...).

Decoding runs in the calling thread (one FFmpeg thread on machines with two cores or fewer, FFmpeg's
frame threads otherwise); JPEG encoding runs in a thread pool (simplejpeg and OpenCV release the GIL),
with a bounded number of frames in flight, and in the calling thread whenever the pool falls behind.
4:2:0 frames are encoded straight from their Y/U/V planes (no RGB round trip). Frames are turned as
the video's display matrix says (producer/orientation.py), so they, their size and the prompts' pixels
are the video as players show it. Frames go to a hidden sibling directory that is renamed into place
only when complete, so a half-written directory never looks like a finished one.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from tqdm import tqdm

try:  # JPEG straight from YUV planes; without it frames go through BGR and OpenCV
    import simplejpeg
except ImportError:  # pragma: no cover
    simplejpeg = None

from producer.orientation import UPRIGHT, Orientation, first_frame_orientation, frame_orientation
from producer.planes import YuvPlanes, frame_payload
from runtime.faults import SUBMIT_AGAIN, disk_fault
from runtime.machine import usable_cores
from schemas.errors import DiskFull, StorageError, VideoError
from schemas.storage import frame_name

log = logging.getLogger(__name__)


# The decoding thread is also an encoder: when MAX_IN_FLIGHT frames wait for the pool it encodes the next
# frame itself (caller runs) instead of waiting, so the pool needs one thread fewer than the cores and
# 2 cores run exactly 2 busy threads (bench/RESULTS.md: 6-12% more frames/s than a pool of 2 beside it).
ENCODE_THREADS = max(1, min(8, usable_cores() - 1))
MAX_IN_FLIGHT = 2 * ENCODE_THREADS + 1


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    width: int  # as displayed (the frames written), like height
    height: int
    fps: float  # of the extracted frames: source fps / stride
    source: str
    orientation: Orientation = UPRIGHT  # how the stored frames were turned (the display matrix)


@dataclass(frozen=True)
class VideoHeader:
    """What a video says before it is decoded (and its first frame: the display matrix)."""

    width: int  # as displayed
    height: int
    fps: float
    estimate: int  # frames, from the header; 0 if it does not say
    orientation: Orientation
    stored_width: int
    stored_height: int


def _open(video: Path) -> av.container.InputContainer:
    video = Path(video)
    if not video.exists():
        raise VideoError(f"video file not found: {video}")
    if not video.is_file():
        raise VideoError(f"video path is not a file: {video}")
    try:
        container = av.open(str(video), mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise VideoError(f"cannot open {video} as a video ({e}); is it a complete video file?") from e
    if not container.streams.video:
        container.close()
        raise VideoError(f"{video} has no video stream")
    return container


def _fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 30.0


def probe(video: Path) -> tuple[int, int, float]:
    """(width, height, fps) of the first video stream."""
    width, height, fps, _ = probe_video(video)
    return width, height, fps


def probe_video(video: Path) -> tuple[int, int, float, int]:
    """(width, height as displayed, fps, estimated frame count: 0 if the header does not say) of the first
    video stream."""
    header = probe_header(video)
    return header.width, header.height, header.fps, header.estimate


def probe_header(video: Path) -> VideoHeader:
    """The first video stream's header, and its display matrix (from its first frame)."""
    with _open(video) as container:
        stream = container.streams.video[0]
        fps = _fps(stream)
        estimate = int(stream.frames or 0)
        if not estimate and stream.duration and stream.time_base:
            estimate = int(float(stream.duration * stream.time_base) * fps)
        stored = int(stream.codec_context.width), int(stream.codec_context.height)
        orientation = first_frame_orientation(container, stream)
        width, height = orientation.displayed_size(*stored)
        return VideoHeader(width, height, fps, estimate, orientation, *stored)


def _check_options(max_frames: int | None, stride: int, start_s: float | None, end_s: float | None,
                   jpeg_quality: int, decode_threads: int) -> None:
    if stride < 1:
        raise VideoError(f"--stride must be >= 1, but got {stride}")
    if max_frames is not None and max_frames < 1:
        raise VideoError(f"--max-frames must be >= 1, but got {max_frames}")
    if start_s is not None and start_s < 0:
        raise VideoError(f"--start must be >= 0 seconds, but got {start_s}")
    if end_s is not None and end_s <= (start_s or 0.0):
        raise VideoError(f"--end ({end_s}) must be after --start ({start_s or 0.0})")
    if not 1 <= jpeg_quality <= 100:
        raise VideoError(f"JPEG quality must be 1..100, but got {jpeg_quality}")
    if decode_threads < 0:
        raise VideoError(f"decode threads must be >= 0 (0: automatic), but got {decode_threads}")


def decoder_threads(requested: int = 0, cores: int | None = None) -> int:
    """FFmpeg decoder threads for `requested` (0: automatic). Automatic is one thread on two cores or
    fewer: frame threading costs 10-20% more CPU per frame, and there the JPEG pool needs every core
    the decoder leaves (bench/RESULTS.md); with more cores FFmpeg's own choice (0) decodes faster."""
    if requested:
        return requested
    return 1 if (cores if cores is not None else usable_cores()) <= 2 else 0


def write_jpeg(path: Path, data: YuvPlanes | np.ndarray, quality: int, whole: bool = True) -> None:
    """Encode one frame to `path`. whole: write a temporary name and rename it, so a reader of a
    directory being filled never sees half a JPEG (not needed when the whole directory is renamed)."""
    if isinstance(data, YuvPlanes):  # simplejpeg reads rows by their stride: padded planes need no copy
        payload = simplejpeg.encode_jpeg_yuv_planes(data.y, data.u, data.v, quality=quality)
    else:
        ok, buf = cv2.imencode(".jpg", data, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise VideoError(f"JPEG encoding failed for {path.name}")
        payload = buf.tobytes()
    if not whole:
        _write_file(path, payload)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _write_file(tmp, payload, shown=path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # half a JPEG (a full disk): nothing half-written stays behind
        raise


def _write_file(path: Path, payload: bytes, shown: Path | None = None) -> None:
    """Write `payload` to `path`. An OSError names the file (`shown`, default `path`; os.write's own
    names none), so a full disk can be reported with the frame it was writing."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(shown or path)) from e


def _raise_if_disk_full(error: OSError, where: Path, storage_root: Path) -> None:
    """Raise DiskFull (one line: STORAGE_ROOT, free space, what to do) for ENOSPC/EDQUOT; else return."""
    full = disk_fault(error, Path(error.filename) if isinstance(error.filename, str) else where, storage_root,
                      then=SUBMIT_AGAIN)
    if full is not None and full is not error:
        raise full from error


def _run_here(fn: Callable[..., None], *args: object) -> Future[None]:
    """fn(*args) run now in this thread, as a finished Future (an error is kept for its turn, in order)."""
    done: Future[None] = Future()
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - re-raised by done.result(), in frame order
        done.set_exception(e)
    else:
        done.set_result(None)
    return done


def _collect(pending: deque[Future[None]], written: int, on_frames: Callable[[int], None] | None,
             wait: bool = False) -> int:
    """Take finished writes off the front of `pending` (all of them if `wait`), in frame order, so the
    returned count is a contiguous prefix on disk; report it to `on_frames` when it grew. A failed
    write is raised after the frames before it are reported, so what is on disk is always announced."""
    before = written
    try:
        while pending and (wait or pending[0].done()):
            pending.popleft().result()
            written += 1
    finally:
        if on_frames is not None and written > before:
            on_frames(written)
    return written


def extract_frames(
    video: Path,
    out_dir: Path,
    *,
    max_frames: int | None = None,
    stride: int = 1,
    start_s: float | None = None,
    end_s: float | None = None,
    jpeg_quality: int = 95,
    decode_threads: int = 0,
    progress: bool = False,
    atomic: bool = True,
    on_frames: Callable[[int], None] | None = None,
    storage_root: Path | None = None,
) -> VideoInfo:
    """Decode `video` into `out_dir` (which must not exist). Raises VideoError, StorageError, DiskFull.

    atomic (default): frames go to a hidden sibling directory renamed to `out_dir` when complete.
    Otherwise (streaming hand-off) they go straight into `out_dir`, each JPEG appearing whole, and
    `on_frames(n)` is called whenever frames 0..n-1 are all on disk; on failure `out_dir` is left for
    the caller to clean up. An exception from `on_frames` stops decoding and is re-raised.
    decode_threads: FFmpeg decoder threads; 0 chooses by the machine (`decoder_threads`).
    storage_root: named by the DiskFull raised when the disk fills up (no space, quota exceeded);
    default `out_dir` itself.
    """
    video, out_dir = Path(video), Path(out_dir)
    root = Path(storage_root) if storage_root is not None else out_dir
    _check_options(max_frames, stride, start_s, end_s, jpeg_quality, decode_threads)
    if out_dir.exists():
        raise StorageError(f"output directory {out_dir} already exists: remove it or choose another")
    container = _open(video)
    target = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}" if atomic else out_dir
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        target.mkdir()
    except OSError as e:
        container.close()
        _raise_if_disk_full(e, target, root)
        raise
    try:
        with container:
            info = _decode_into(container, video, target, max_frames=max_frames, stride=stride, start_s=start_s,
                                end_s=end_s, jpeg_quality=jpeg_quality, progress=progress, on_frames=on_frames,
                                atomic=atomic, decode_threads=decoder_threads(decode_threads))
        if atomic:
            os.rename(target, out_dir)
    except BaseException as e:
        if atomic:
            shutil.rmtree(target, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, DiskFull):
            _raise_if_disk_full(e, target, root)
        raise
    return info


def _decode_into(
    container: av.container.InputContainer,
    video: Path,
    tmp: Path,
    *,
    max_frames: int | None,
    stride: int,
    start_s: float | None,
    end_s: float | None,
    jpeg_quality: int,
    progress: bool,
    on_frames: Callable[[int], None] | None = None,
    atomic: bool = True,
    decode_threads: int = 0,
) -> VideoInfo:
    stream = container.streams.video[0]
    if decode_threads == 1:
        stream.thread_type = "NONE"
        stream.codec_context.thread_count = 1
    else:
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = decode_threads
    fps = _fps(stream)
    time_base = stream.time_base or Fraction(1, 1000)
    if start_s:
        container.seek(int(start_s / time_base), stream=stream, backward=True, any_frame=False)
    total = stream.frames // stride if stream.frames else None
    if max_frames is not None:
        total = min(total, max_frames) if total else max_frames
    bar = tqdm(total=total, desc=f"decode {video.name}", unit="frame", disable=not progress, dynamic_ncols=True)
    kept = decoded = written = 0
    width = height = 0
    orientation: Orientation | None = None  # the display matrix's, from the first frame
    pending: deque[Future[None]] = deque()
    with ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="jpeg") as pool:
        try:
            for frame in container.decode(stream):
                if orientation is None:
                    orientation = frame_orientation(frame)
                if start_s is not None or end_s is not None:
                    t = float(frame.pts * time_base) if frame.pts is not None else decoded / fps
                    if start_s is not None and t < start_s - 1e-6:
                        continue
                    if end_s is not None and t >= end_s - 1e-6:
                        break
                decoded += 1
                if (decoded - 1) % stride:
                    continue
                payload, height, width = frame_payload(frame, orientation)
                args = (tmp / frame_name(kept), payload, jpeg_quality, not atomic)
                if sum(not f.done() for f in pending) >= MAX_IN_FLIGHT:  # the pool is behind: encode it here
                    pending.append(_run_here(write_jpeg, *args))
                else:
                    pending.append(pool.submit(write_jpeg, *args))
                kept += 1
                written = _collect(pending, written, on_frames)
                bar.update(1)
                if max_frames is not None and kept >= max_frames:
                    break
        except av.error.FFmpegError as e:
            raise VideoError(f"{video} is corrupt at frame {decoded} ({e}); re-encode or re-download it") from e
        finally:
            bar.close()
        written = _collect(pending, written, on_frames, wait=True)
    if kept == 0:
        chosen = ", ".join(
            f"{name}={value}" for name, value in (("--start", start_s), ("--end", end_s), ("--max-frames", max_frames))
            if value is not None
        )
        raise VideoError(f"no frames decoded from {video}" + (f" with {chosen}" if chosen else "") +
                         "; check the file plays and the options select part of it")
    _check_truncation(container, stream, video, decoded, start_s, end_s, max_frames, kept)
    return VideoInfo(num_frames=kept, width=width, height=height, fps=fps / stride, source=video.name,
                     orientation=orientation or UPRIGHT)


def _check_truncation(container: av.container.InputContainer, stream: av.video.stream.VideoStream, video: Path,
                      decoded: int, start_s: float | None, end_s: float | None, max_frames: int | None,
                      kept: int) -> None:
    """A file cut short decodes without error but with fewer frames than its header promises."""
    expected = stream.frames
    whole_file = start_s is None and end_s is None and (max_frames is None or kept < max_frames)
    if whole_file and expected and decoded < expected * 0.98 - 1:
        raise VideoError(
            f"{video} is truncated or corrupt: its header promises {expected} frames but only {decoded} decode; "
            "re-encode or re-download it"
        )
