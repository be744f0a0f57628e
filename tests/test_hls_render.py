"""Unit tests of worker.output.hls: the rolling HLS render of live jobs (no Redis, no GPU).

Players and ffprobe must read the stream while it is written, the window must bound the disk, time must
follow the frames' capture times, another attempt must continue the playlist, and a full disk must raise
DiskFull and leave a playlist whose every segment is complete.
"""

from __future__ import annotations

import errno
import io
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from schemas.errors import DiskFull
from tests.render_checks import disc, iou, tinted_mask
from worker.output import hls
from worker.output.draw import colour_for
from worker.output.encoded import RenderAborted
from worker.output.hls import ENDLIST, TICKS_PER_S, HlsWriter, listed_segments, segment_files

SIZE_HW = (64, 96)
GREY, GREEN = (128, 128, 128), (0, 255, 0)
FFPROBE = shutil.which("ffprobe")
needs_ffprobe = pytest.mark.skipif(
    FFPROBE is None, reason="ffprobe not found: install the Debian package ffmpeg (apt-get install ffmpeg)")


def disc_frame(i: int, size_hw: tuple[int, int] = SIZE_HW) -> tuple[np.ndarray, np.ndarray]:
    """A green disc on grey moving right with `i`; returns (BGR frame, masks of object 1)."""
    height, width = size_hw
    truth = disc(size_hw, (20 + (i * 3) % (width - 40), height / 2), 14)
    frame = np.full((height, width, 3), GREY, np.uint8)
    frame[truth] = GREEN
    return frame, truth[None]


def write(writer: HlsWriter, n: int, at_s: list[float] | None = None) -> None:
    for i in range(n):
        frame, masks = disc_frame(writer.frames_written)
        writer.write(frame, [1], masks, at_s=None if at_s is None else at_s[i])


@dataclass
class Entry:
    name: str
    duration_s: float
    discontinuity: bool


def parse(playlist: Path) -> tuple[int, list[Entry], list[str]]:
    """(media sequence, entries, all lines) of a media playlist."""
    lines = playlist.read_text().splitlines()
    sequence, entries, duration, discont = -1, [], 0.0, False
    for line in lines:
        if line.startswith("#EXT-X-MEDIA-SEQUENCE:"):
            sequence = int(line.split(":")[1])
        elif line.startswith("#EXTINF:"):
            duration = float(line[len("#EXTINF:"):].rstrip(","))
        elif line == "#EXT-X-DISCONTINUITY":
            discont = True
        elif line and not line.startswith("#"):
            entries.append(Entry(line, duration, discont))
            discont = False
    return sequence, entries, lines


def number(name: str) -> int:
    return int(name.rsplit("_", 1)[1].split(".")[0])


def ffprobe(playlist: Path) -> dict[str, Any]:
    """The one stream ffprobe finds. On a live playlist ffprobe waits for segments until it has seen 20
    frames or so: callers list at least that many."""
    assert FFPROBE is not None
    out = subprocess.run([FFPROBE, "-v", "error", "-show_entries", "stream=width,height,codec_name", "-of", "json",
                          str(playlist)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    streams = json.loads(out.stdout)["streams"]
    assert len(streams) == 1, streams
    return dict(streams[0])


def decode(segment: Path) -> list[av.VideoFrame]:
    with av.open(str(segment)) as container:
        return list(container.decode(video=0))


def assert_listed_segments_are_complete(playlist: Path) -> list[av.VideoFrame]:
    """Every listed segment is on disk, decodes on its own, starts with a keyframe; none is a .tmp."""
    frames: list[av.VideoFrame] = []
    for name in listed_segments(playlist):
        assert not name.endswith(".tmp"), name
        decoded = decode(playlist.parent / name)
        assert decoded and decoded[0].key_frame, f"{name} must start with a keyframe"
        frames += decoded
    return frames


@needs_ffprobe
@pytest.mark.parametrize("size_hw", [SIZE_HW, (63, 95)])
def test_playlist_is_read_while_writing_and_rolls_a_bounded_window(tmp_path: Path, size_hw: tuple[int, int]) -> None:
    playlist, fps, segment_s, window = tmp_path / "jobs" / "j1" / "live.m3u8", 25, 1.0, 3
    writer = HlsWriter(playlist, fps=fps, width=size_hw[1], height=size_hw[0], segment_s=segment_s, window=window)
    for i in range(200):  # 8 segments of 25 frames
        frame, masks = disc_frame(i, size_hw)
        writer.write(frame, [1], masks)
        if i == 60:  # two segments done (ffprobe wants 20 frames or so before it answers), the third begun
            stream = ffprobe(playlist)
            assert stream == {"codec_name": "h264", "width": 96, "height": 64}
            assert len(listed_segments(playlist)) == 2 and ENDLIST not in playlist.read_text()
            assert_listed_segments_are_complete(playlist)
    assert writer.close() == playlist and writer.frames_written == 200
    assert writer.close() == playlist  # idempotent

    sequence, entries, lines = parse(playlist)
    assert lines[-1] == ENDLIST
    assert [number(e.name) for e in entries] == [5, 6, 7] and sequence == 5
    assert sum(e.duration_s for e in entries) == pytest.approx(window * segment_s, abs=0.01)
    on_disk = segment_files(playlist)
    assert len(on_disk) <= window + 1 and not [p for p in on_disk if p.name.endswith(".tmp")], on_disk
    assert ffprobe(playlist)["codec_name"] == "h264"
    frames = assert_listed_segments_are_complete(playlist)
    assert len(frames) == window * segment_s * fps
    # the masks are drawn: the last frame's tint is where its disc was
    original, masks = disc_frame(199, size_hw)
    rendered = frames[-1].to_ndarray(format="bgr24")[: size_hw[0], : size_hw[1]]
    assert iou(tinted_mask(rendered, original, colour_for(1)), masks[0]) > 0.6


def test_irregular_capture_times_set_the_timeline(tmp_path: Path) -> None:
    """A live worker that falls behind skips frames: the stream plays in real time with the gaps held,
    segments are cut by time (about segment_s each), and the playlist's length is the frames' span."""
    rng = np.random.default_rng(7)
    at_s = list(np.cumsum(rng.uniform(0.04, 0.7, 40)) + 3.0)  # starts late, like a reclaimed stream
    playlist, segment_s = tmp_path / "live.m3u8", 2.0
    with HlsWriter(playlist, fps=30, width=96, height=64, segment_s=segment_s, window=50) as writer:
        write(writer, len(at_s), at_s)
    _, entries, _ = parse(playlist)
    span = at_s[-1] - at_s[0]
    total = sum(e.duration_s for e in entries)
    assert span <= total <= span + 0.7 + 0.01  # plus how long the last frame lasts
    assert len(entries) == pytest.approx(span / segment_s, abs=1.5)
    elapsed = 0.0
    for k, entry in enumerate(entries[:-1], start=1):  # each cut is the first frame at or past k*segment_s
        elapsed += entry.duration_s
        assert k * segment_s - 0.001 <= elapsed < k * segment_s + 0.7
    frames = assert_listed_segments_are_complete(playlist)
    pts = np.array([f.pts for f in frames])
    assert len(pts) == len(at_s)
    np.testing.assert_allclose(np.diff(pts), np.diff(np.round(np.array(at_s) * TICKS_PER_S)), atol=1)


def test_pts_follow_fps_without_capture_times_and_never_go_back(tmp_path: Path) -> None:
    playlist = tmp_path / "live.m3u8"
    with HlsWriter(playlist, fps=29.97, width=96, height=64, segment_s=1.0) as writer:
        write(writer, 4)  # 1/fps apart: 3003 ticks at 30000/1001
        write(writer, 4, [10.0, 10.0, 9.0, 10.5])  # repeated and earlier times: one tick after the last
        write(writer, 1)
    pts = [int(f.pts or 0) for f in assert_listed_segments_are_complete(playlist)]
    assert list(np.diff(pts)) == [3003, 3003, 3003, 900_000 - 3 * 3003, 1, 1, 45_000 - 2, 3003]


@needs_ffprobe
def test_abort_leaves_no_endlist_and_the_next_attempt_continues_the_playlist(tmp_path: Path) -> None:
    playlist, window = tmp_path / "jobs" / "j2" / "live.m3u8", 4
    first = HlsWriter(playlist, fps=10, width=96, height=64, segment_s=1.0, window=window)
    write(first, 55)  # segments 0..4 and half of 5
    first.abort()
    first.abort()  # idempotent
    sequence, old, lines = parse(playlist)
    assert ENDLIST not in lines and not any(e.discontinuity for e in old)
    assert [number(e.name) for e in old] == [2, 3, 4, 5] and sequence == 2  # the abort flushed the half segment
    kept = {e.name: (playlist.parent / e.name).read_bytes() for e in old}
    assert ffprobe(playlist)["codec_name"] == "h264"
    with pytest.raises(ValueError, match="aborted"):
        first.close()

    second = HlsWriter(playlist, fps=10, width=96, height=64, segment_s=1.0, window=window)
    assert second.continued
    assert len(segment_files(playlist)) == window  # the unlisted segment the first muxer kept is gone
    write(second, 25)
    second.close()
    sequence, entries, lines = parse(playlist)
    names = [e.name for e in entries]
    assert lines[-1] == ENDLIST
    assert names == ["live_00004.ts", "live_00005.ts", "live_00006.ts", "live_00007.ts", "live_00008.ts"][-window:]
    assert [number(n) for n in names] == list(range(sequence, sequence + window))  # names follow the sequence
    assert [e.discontinuity for e in entries] == [False, True, False, False]  # at the first new segment
    for name in names[:1]:
        assert (playlist.parent / name).read_bytes() == kept[name]  # old segments are not overwritten
    assert len(segment_files(playlist)) <= window + 1
    assert_listed_segments_are_complete(playlist)
    assert ffprobe(playlist) == {"codec_name": "h264", "width": 96, "height": 64}


def test_abort_from_another_thread_stops_the_writer(tmp_path: Path) -> None:
    playlist = tmp_path / "live.m3u8"
    writer = HlsWriter(playlist, fps=10, width=96, height=64, segment_s=0.5, window=5)
    two_segments, stopped = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            while True:
                write(writer, 1)
                if writer.frames_written == 12:
                    two_segments.set()
        except (RenderAborted, ValueError) as e:
            errors.append(e)
        finally:
            stopped.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert two_segments.wait(30)
    writer.abort()
    assert stopped.wait(30)
    thread.join(5)
    assert len(errors) == 1 and isinstance(errors[0], (RenderAborted, ValueError)), errors
    assert ENDLIST not in playlist.read_text()
    frames = assert_listed_segments_are_complete(playlist)
    assert 0 < len(frames) <= writer.frames_written


@pytest.mark.parametrize("kwargs, match", [
    ({"width": 0}, "width and height must be > 0, but got 0x64"),
    ({"height": -2}, "width and height must be > 0, but got 96x-2"),
    ({"crf": 52}, "crf must be in 0..51"),
    ({"segment_s": 0.0}, "segment_s must be a finite number of seconds > 0, but got 0.0"),
    ({"segment_s": float("nan")}, "segment_s must be a finite number"),
    ({"window": 0}, "window must be >= 1 segment, but got 0"),
    ({"fps": 0}, "fps must be > 0"),
])
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"fps": 10, "width": 96, "height": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        HlsWriter(tmp_path / "live.m3u8", **args)
    assert not (tmp_path / "live.m3u8").exists()


def test_bad_frames_and_times_raise_value_error(tmp_path: Path) -> None:
    writer = HlsWriter(tmp_path / "live.m3u8", fps=10, width=96, height=64)
    frame, masks = disc_frame(0)
    with pytest.raises(ValueError, match="must be 96x64 .* but got 95x64"):
        writer.write(frame[:, :95], [1], masks[:, :, :95])
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\)"):
        writer.write(frame[..., 0], [1], masks)
    with pytest.raises(ValueError, match="masks"):
        writer.write(frame, [1, 2], masks)
    for at_s in (float("nan"), -0.5, float("inf")):
        with pytest.raises(ValueError, match="at_s must be a finite number of seconds >= 0"):
            writer.write(frame, [1], masks, at_s=at_s)
    assert writer.frames_written == 0
    with pytest.raises(ValueError, match="no frames"):
        writer.close()
    assert not (tmp_path / "live.m3u8").exists()
    with pytest.raises(ValueError, match="closed"):
        writer.write(frame, [1], masks)


# ---- a full disk ------------------------------------------------------------------------------------

class _FullFile(io.RawIOBase):
    """A file whose writes fail with `code` while the disk is `full`, as the kernel's do."""

    def __init__(self, path: str, disk: dict[str, Any]) -> None:
        self._real, self._disk = io.FileIO(path, "wb"), disk

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self._disk["full"]:
            raise OSError(self._disk["code"], "no space left (simulated)")
        return self._real.write(data)

    def close(self) -> None:
        self._real.close()
        super().close()


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The muxer's files (opened in worker.output.hls) fail to write while disk["full"]."""
    state: dict[str, Any] = {"full": False, "code": errno.ENOSPC}
    monkeypatch.setattr(hls, "open", lambda path, mode="r", buffering=-1: (
        _FullFile(path, state) if "w" in mode else open(path, mode)), raising=False)
    return state


def assert_stopped_cleanly(playlist: Path) -> None:
    """After a full disk: no ENDLIST, no half-written file, every listed segment complete."""
    assert ENDLIST not in playlist.read_text()
    assert not list(playlist.parent.glob("*.tmp"))
    assert_listed_segments_are_complete(playlist)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_raises_disk_full_and_the_next_attempt_continues(tmp_path: Path, disk: dict[str, Any],
                                                                   code: int) -> None:
    root = tmp_path / "storage"
    playlist = root / "jobs" / "j3" / "live.m3u8"
    writer = HlsWriter(playlist, fps=10, width=96, height=64, segment_s=1.0, window=5)
    write(writer, 25)
    disk.update(full=True, code=code)
    with pytest.raises(DiskFull, match=f"no space left on the disk of STORAGE_ROOT {root} ") as raised:
        write(writer, 10)  # the third segment's write fails
    assert raised.value.errno == code
    assert [number(n) for n in listed_segments(playlist)] == [0, 1]
    assert_stopped_cleanly(playlist)
    with pytest.raises((RenderAborted, ValueError)):
        write(writer, 1)
    writer.abort()  # what the job does next: nothing more happens

    disk["full"] = False  # freed; the job is retried
    with HlsWriter(playlist, fps=10, width=96, height=64, segment_s=1.0, window=5) as again:
        write(again, 15)
    _, entries, lines = parse(playlist)
    assert [number(e.name) for e in entries] == [0, 1, 2, 3] and entries[2].discontinuity
    assert lines[-1] == ENDLIST


def test_full_disk_at_close_raises_disk_full_without_endlist(tmp_path: Path, disk: dict[str, Any]) -> None:
    playlist = tmp_path / "live.m3u8"
    writer = HlsWriter(playlist, fps=10, width=96, height=64, segment_s=1.0, window=5)
    write(writer, 15)
    disk["full"] = True
    with pytest.raises(DiskFull):
        writer.close()
    assert [number(n) for n in listed_segments(playlist)] == [0]  # the last segment's write failed
    assert_stopped_cleanly(playlist)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 160 KiB tmpfs (where this may mount one: root in CI), else the test is skipped."""
    root = tmp_path / "small"
    root.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(root)],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated full-disk tests cover the mapping")
    try:
        yield root
    finally:
        if subprocess.run(["umount", str(root)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(root)], capture_output=True, timeout=30)


def test_a_really_full_disk_raises_disk_full_and_lists_only_complete_segments(tmpfs: Path) -> None:
    """Noise frames make ~24 KiB segments: a window of 6 does not fit in 160 KiB. FFmpeg's muxer alone
    would go on, listing truncated segments; the writer stops with DiskFull instead."""
    playlist = tmpfs / "jobs" / "j4" / "live.m3u8"
    writer = HlsWriter(playlist, fps=10, width=96, height=64, segment_s=0.5, window=6)
    rng = np.random.default_rng(0)
    with pytest.raises(DiskFull, match=f"no space left on the disk of STORAGE_ROOT {tmpfs} ") as raised:
        for _ in range(200):
            writer.write(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8), [], np.zeros((0, 64, 96), bool))
    assert raised.value.errno == errno.ENOSPC
    assert 2 <= len(listed_segments(playlist)) <= 6
    assert_stopped_cleanly(playlist)
