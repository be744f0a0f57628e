"""Unit tier: decoding videos into JPEG frame directories (PyAV + simplejpeg)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from producer import decode
from producer.decode import decoder_threads, extract_frames, probe_video
from producer.planes import to_full_range
from schemas.errors import StorageError, VideoError
from tests.videos import make_video

N = 20
SIZE = (160, 120)  # the clip of the `video` fixture (tests/conftest.py)


def names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_every_frame_named_in_order_with_its_size(video: Path, tmp_path: Path) -> None:
    info = extract_frames(video, tmp_path / "f")
    assert (info.num_frames, info.width, info.height, info.fps, info.source) == (N, 160, 120, 10.0, "v.mp4")
    assert names(tmp_path / "f") == [f"{k:05d}.jpg" for k in range(N)]
    assert cv2.imread(str(tmp_path / "f" / "00007.jpg")).shape == (120, 160, 3)
    assert probe_video(video) == (160, 120, 10.0, N)


def test_jpegs_match_the_decoded_source(video: Path, tmp_path: Path) -> None:
    extract_frames(video, tmp_path / "f", jpeg_quality=95)
    with av.open(str(video)) as c:
        source = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
    for k in (0, 9, 19):
        ours = cv2.imread(str(tmp_path / "f" / f"{k:05d}.jpg")).astype(np.float64)
        mse = np.mean((ours - source[k].astype(np.float64)) ** 2)
        assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 35, f"frame {k}: PSNR too low"


@pytest.mark.parametrize(
    "kwargs, count, fps",
    [
        ({"stride": 3}, 7, 10 / 3),
        ({"max_frames": 5}, 5, 10.0),
        ({"start_s": 1.0}, 10, 10.0),
        ({"start_s": 0.5, "end_s": 1.2}, 7, 10.0),
        ({"stride": 2, "max_frames": 4}, 4, 5.0),
    ],
)
def test_frame_selection(video: Path, tmp_path: Path, kwargs: dict[str, float], count: int, fps: float) -> None:
    info = extract_frames(video, tmp_path / "f", **kwargs)  # type: ignore[arg-type]
    assert info.num_frames == count and info.fps == pytest.approx(fps)
    assert names(tmp_path / "f") == [f"{k:05d}.jpg" for k in range(count)]


def test_quality_setting_changes_the_files(video: Path, tmp_path: Path) -> None:
    extract_frames(video, tmp_path / "lo", jpeg_quality=30)
    extract_frames(video, tmp_path / "hi", jpeg_quality=98)
    size = lambda d: sum(p.stat().st_size for p in d.iterdir())  # noqa: E731
    assert size(tmp_path / "lo") < size(tmp_path / "hi")


def test_odd_sizes(tmp_path: Path) -> None:
    odd = make_video(tmp_path / "odd.mp4", num_frames=3, size_wh=(161, 121), codec="mpeg4")
    info = extract_frames(odd, tmp_path / "f")
    assert info.num_frames == 3 and cv2.imread(str(tmp_path / "f" / "00000.jpg")).shape[:2] == (info.height, info.width)


def _corrupt(tmp_path: Path, video: Path) -> Path:
    cut = tmp_path / "cut.mp4"
    data = video.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    return cut


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (lambda t, v: t / "missing.mp4", {}, "video file not found"),
        (lambda t, v: t, {}, "not a file"),
        (lambda t, v: (t / "notes.mp4").write_text("hello") and t / "notes.mp4", {}, "cannot open"),
        (_corrupt, {}, "corrupt|truncated|cannot open"),
        (lambda t, v: v, {"start_s": 100.0}, "no frames decoded .* --start=100.0"),
        (lambda t, v: v, {"stride": 0}, "--stride must be >= 1"),
        (lambda t, v: v, {"max_frames": 0}, "--max-frames must be >= 1"),
        (lambda t, v: v, {"start_s": 2.0, "end_s": 1.0}, "--end .* must be after --start"),
        (lambda t, v: v, {"jpeg_quality": 0}, "quality must be 1..100"),
        (lambda t, v: v, {"decode_threads": -1}, "decode threads must be >= 0"),
    ],
)
def test_bad_input_is_refused_and_leaves_nothing(video: Path, tmp_path: Path, make, kwargs, match: str) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(VideoError, match=match):
        extract_frames(make(src, video), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_existing_output_directory_is_refused(video: Path, tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    with pytest.raises(StorageError, match="already exists"):
        extract_frames(video, tmp_path / "f")


class ReportedFrames:
    """An `on_frames` that checks, when it is called with n, that frames 0..n-1 are each a whole JPEG on disk
    (named in order, decodable), and that n only grows."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.seen: list[int] = []
        self.checked = 0

    def __call__(self, n: int) -> None:
        assert not self.seen or n > self.seen[-1], (self.seen, n)
        for k in range(self.checked, n):
            path = self.out_dir / f"{k:05d}.jpg"
            assert path.is_file(), f"frame {k} reported (n={n}) before {path.name} was on disk"
            assert cv2.imread(str(path)) is not None, f"frame {k} reported (n={n}) before {path.name} was whole"
        self.checked = n
        self.seen.append(n)


def test_streaming_mode_reports_contiguous_frames(video: Path, tmp_path: Path) -> None:
    report = ReportedFrames(tmp_path / "f")
    extract_frames(video, tmp_path / "f", atomic=False, on_frames=report)
    seen = report.seen
    assert seen == sorted(seen) and seen[-1] == N and len(set(seen)) == len(seen) and report.checked == N
    assert not [p for p in (tmp_path / "f").iterdir() if p.name.startswith(".")]  # no temp files left


def test_full_range_conversion_is_exact_for_every_value() -> None:
    """Limited (video) to full (JPEG) range, against the formula computed in float64: every one of the
    256 values, on strided views of odd widths like the decoder's padded planes."""
    values = np.tile(np.arange(256, dtype=np.uint8), (5, 3))[:, 7:700]
    expected_y = np.clip(np.round((values.astype(np.float64) - 16) * 255 / 219), 0, 255).astype(np.uint8)
    expected_c = np.clip(np.round((values.astype(np.float64) - 128) * 255 / 224 + 128), 0, 255).astype(np.uint8)
    y, u, v = to_full_range(values, values[:, :301], values[1:3])
    assert np.array_equal(y, expected_y) and np.array_equal(u, expected_c[:, :301])
    assert np.array_equal(v, expected_c[1:3]) and y.flags.c_contiguous and u.flags.c_contiguous
    assert (y[values <= 16] == 0).all() and (y[values >= 235] == 255).all()


@pytest.mark.parametrize("requested, cores, threads", [(0, 1, 1), (0, 2, 1), (0, 3, 0), (0, 16, 0), (4, 2, 4)])
def test_decoder_threads_by_machine(requested: int, cores: int, threads: int) -> None:
    assert decoder_threads(requested, cores) == threads


def test_decoder_threading_does_not_change_the_jpegs(video: Path, tmp_path: Path) -> None:
    extract_frames(video, tmp_path / "one", decode_threads=1)
    extract_frames(video, tmp_path / "auto", decode_threads=3)
    assert names(tmp_path / "one") == names(tmp_path / "auto")
    for name in names(tmp_path / "one"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "auto" / name).read_bytes()


def test_caller_encodes_when_the_pool_falls_behind(video: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool that falls behind (here: held until the calling thread has encoded a frame) makes the
    decoding thread encode frames itself; frames stay whole, named in order, and `on_frames` still
    reports only contiguous prefixes."""
    real, writers, caller_encoded = decode.write_jpeg, {}, threading.Event()

    def slow_pool(path: Path, data: object, quality: int, whole: bool = True) -> None:
        writers[path.name] = threading.current_thread().name
        if threading.current_thread() is threading.main_thread():
            caller_encoded.set()
        else:
            if not caller_encoded.wait(2):  # the caller never took a frame: fail below, not slowly here
                caller_encoded.set()
            time.sleep(0.002)
        real(path, data, quality, whole)  # type: ignore[arg-type]

    monkeypatch.setattr(decode, "write_jpeg", slow_pool)
    report = ReportedFrames(tmp_path / "f")
    extract_frames(video, tmp_path / "f", atomic=False, on_frames=report)
    seen = report.seen
    here = [name for name, thread in writers.items() if thread == threading.main_thread().name]
    assert here and len(here) < N, "the calling thread should share the encoding, not do all of it"
    assert names(tmp_path / "f") == [f"{k:05d}.jpg" for k in range(N)]
    assert seen == sorted(set(seen)) and seen[-1] == N
    assert all(cv2.imread(str(tmp_path / "f" / name)) is not None for name in names(tmp_path / "f"))


def test_an_error_in_a_frame_the_caller_encodes_is_raised(video: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real, failed = decode.write_jpeg, threading.Event()

    def broken_here(path: Path, data: object, quality: int, whole: bool = True) -> None:
        if threading.current_thread() is threading.main_thread():
            failed.set()
            raise StorageError(f"disk full while writing {path.name}")
        if not failed.wait(2):  # the pool is behind until the calling thread has taken a frame and failed
            failed.set()
        real(path, data, quality, whole)  # type: ignore[arg-type]

    monkeypatch.setattr(decode, "write_jpeg", broken_here)
    with pytest.raises(StorageError, match="disk full"):
        extract_frames(video, tmp_path / "f")
    assert not (tmp_path / "f").exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_frames_on_disk_are_reported_before_a_later_failure(video: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's first frames finish only after the calling thread has failed on the last one: the
    frames before the failure are still reported (a streaming job then fails instead of never starting)."""
    real, release = decode.write_jpeg, threading.Event()

    def stalled_pool(path: Path, data: object, quality: int, whole: bool = True) -> None:
        if threading.current_thread() is threading.main_thread():
            if path.name == f"{N - 1:05d}.jpg":
                release.set()
                raise StorageError(f"disk full while writing {path.name}")
        elif not release.wait(2):  # the caller never took the last frame: fail below, not slowly here
            release.set()
        real(path, data, quality, whole)  # type: ignore[arg-type]

    monkeypatch.setattr(decode, "write_jpeg", stalled_pool)
    monkeypatch.setattr(decode, "ENCODE_THREADS", 1)
    monkeypatch.setattr(decode, "MAX_IN_FLIGHT", 3)
    report = ReportedFrames(tmp_path / "f")
    with pytest.raises(StorageError, match="disk full"):
        extract_frames(video, tmp_path / "f", atomic=False, on_frames=report)
    assert report.seen == [N - 1] and report.checked == N - 1


def test_full_range_source_with_padded_rows(tmp_path: Path) -> None:
    """A full-range (yuvj420p, MJPEG) source goes to the encoder as the decoder's own padded planes,
    without a range conversion: the JPEGs match the decoded source."""
    path, (w, h) = tmp_path / "full.mkv", (170, 98)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuvj420p"
        for k in range(4):
            img = cv2.resize(np.full((2, 2, 3), 40 * k, np.uint8) + np.array([[[0, 90, 200]]], np.uint8), (w, h))
            frame = av.VideoFrame.from_ndarray(img, format="bgr24").reformat(format="yuvj420p")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as c:
        frames = list(c.decode(video=0))
        assert frames[0].format.name == "yuvj420p" and frames[0].planes[0].line_size != w  # padded rows
        source = [f.to_ndarray(format="bgr24").astype(np.float64) for f in frames]
    extract_frames(path, tmp_path / "f", jpeg_quality=95)
    for k, ref in enumerate(source):
        ours = cv2.imread(str(tmp_path / "f" / f"{k:05d}.jpg")).astype(np.float64)
        assert 10 * np.log10(255**2 / max(np.mean((ours - ref) ** 2), 1e-9)) > 35, f"frame {k}"
