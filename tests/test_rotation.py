"""Phone clips: a video with a display matrix gives frames, sizes, prompts and masks as players and ffmpeg
show it (upright), not as it is stored.

The clips (tests/videos.py) are drawn upright, a white square in the displayed top-left corner and a red
bar along the right half of the top edge, and stored turned back, so where the markers land in our
JPEGs says which way they were turned. With ffmpeg on PATH, our frames are also compared with its
autorotated ones, for every turn and mirror a display matrix can hold."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis

from producer.decode import extract_frames, probe_header, probe_video
from producer.orientation import UPRIGHT, Orientation, from_display_matrix
from producer.submission import submit
from producer.watching import watch
from runtime.settings import Settings
from schemas import messages
from schemas.errors import PromptError
from schemas.prompts import ObjectPrompt
from schemas.rle import decode_mask
from tests.videos import (
    MARKER_BGR,
    draw_displayed_frame,
    make_display_matrix_video,
    make_rotated_video,
    marker_size,
)

STORED = (64, 48)  # a phone's landscape sensor, small
N = 6
ONE = 1 << 16  # 1.0 in a display matrix (16.16 fixed point)
W = 1 << 30  # its last element (2.30 fixed point)

# The eight display matrices of right angles (FFmpeg's layout, as ffprobe prints them for clips that
# PyAV's set_display_rotation(degrees, hflip, vflip) writes), and what ffmpeg's autorotate does with
# each: `transpose` (rows become columns), then flip the rows (upside down), the columns (left to right).
MATRICES = {
    "none": ([ONE, 0, 0, 0, ONE, 0, 0, 0, W], UPRIGHT),
    "ccw90": ([0, -ONE, 0, ONE, 0, 0, 0, 0, W], Orientation(transpose=True, flip_rows=True)),
    "180": ([-ONE, 0, 0, 0, -ONE, 0, 0, 0, W], Orientation(flip_rows=True, flip_cols=True)),
    "cw90": ([0, ONE, 0, -ONE, 0, 0, 0, 0, W], Orientation(transpose=True, flip_cols=True)),
    "hflip": ([-ONE, 0, 0, 0, ONE, 0, 0, 0, W], Orientation(flip_cols=True)),
    "vflip": ([ONE, 0, 0, 0, -ONE, 0, 0, 0, W], Orientation(flip_rows=True)),
    "transpose": ([0, ONE, 0, ONE, 0, 0, 0, 0, W], Orientation(transpose=True)),
    "antitranspose": ([0, -ONE, 0, -ONE, 0, 0, 0, 0, W], Orientation(transpose=True, flip_rows=True, flip_cols=True)),
}


def turned(image: np.ndarray, o: Orientation) -> np.ndarray:
    """The reference turn, in numpy."""
    out = image.swapaxes(0, 1) if o.transpose else image
    out = out[::-1] if o.flip_rows else out
    return out[:, ::-1] if o.flip_cols else out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def assert_upright(jpeg: Path, displayed_wh: tuple[int, int]) -> None:
    """The JPEG is the displayed picture: its size, the white square top-left, the red bar top-right."""
    img = cv2.imread(str(jpeg))
    w, h = displayed_wh
    assert img.shape[:2] == (h, w), f"{jpeg.name} is {img.shape[1]}x{img.shape[0]}, not {w}x{h} as displayed"
    assert psnr(img, draw_displayed_frame(displayed_wh)) > 30, f"{jpeg.name} is not the upright picture"
    m = marker_size(displayed_wh)
    corner = img[1 : m - 1, 1 : m - 1].reshape(-1, 3).mean(axis=0)
    assert np.all(np.abs(corner - MARKER_BGR) < 20), f"no white square in the top-left corner: {corner}"


# ---- the matrix and the turn: pure ------------------------------------------------------------------


@pytest.mark.parametrize("name", MATRICES)
def test_each_right_angle_matrix_is_the_turn_ffmpeg_makes(name: str) -> None:
    matrix, expected = MATRICES[name]
    assert from_display_matrix(matrix) == expected
    assert from_display_matrix([2 * v if i < 8 else v for i, v in enumerate(matrix)]) == expected  # scaled


def test_a_matrix_of_another_angle_is_no_turn() -> None:
    c, s = int(ONE * np.cos(np.pi / 6)), int(ONE * np.sin(np.pi / 6))  # 30 degrees
    assert from_display_matrix([c, -s, 0, s, c, 0, 0, 0, W]) is None
    assert from_display_matrix([0] * 9) is None


@pytest.mark.parametrize("t, rows, cols", list(itertools.product([False, True], repeat=3)))
def test_the_turn_of_planes_and_images_matches_numpy_on_strided_views(t: bool, rows: bool, cols: bool) -> None:
    o = Orientation(t, rows, cols)
    rng = np.random.default_rng(7)
    for shape in ((9, 13), (9, 13, 3)):  # a plane with padded rows (a decoder's), a BGR image
        padded = rng.integers(0, 256, (shape[0], shape[1] + 3, *shape[2:]), dtype=np.uint8)
        view = padded[:, : shape[1]]
        before = view.copy()
        out = o.apply(view)
        assert out.flags.c_contiguous and np.array_equal(out, turned(view, o))
        assert o.displayed_size(13, 9) == (out.shape[1], out.shape[0])
        assert np.array_equal(view, before)  # the input (a decoder's buffer) is only read
        if not t:
            copy = np.array(view)
            assert o.flip_in_place(copy) is copy and np.array_equal(copy, turned(view, o))
        else:
            with pytest.raises(ValueError, match="in place"):
                o.flip_in_place(np.array(view))


def test_each_turn_is_described_in_words() -> None:
    words = {o.describe() for _, o in MATRICES.values()}
    assert len(words) == 8 and "rotated 90° clockwise" in words and "upright" in words


# ---- decoding: the JPEGs are upright ----------------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    d = tmp_path_factory.mktemp("rot")
    return {r: make_rotated_video(d / f"r{r}.mp4", r, stored_wh=STORED, num_frames=N) for r in (0, 90, 180, 270)}


def displayed(rotation: int) -> tuple[int, int]:
    return (STORED[1], STORED[0]) if rotation % 180 else STORED


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_frames_are_written_as_displayed(rotation: int, clips: dict[int, Path], tmp_path: Path) -> None:
    info = extract_frames(clips[rotation], tmp_path / "f")
    assert (info.width, info.height, info.num_frames) == (*displayed(rotation), N)
    assert probe_video(clips[rotation])[:2] == displayed(rotation)
    header = probe_header(clips[rotation])
    assert (header.stored_width, header.stored_height) == STORED and header.orientation == info.orientation
    for k in (0, N - 1):
        assert_upright(tmp_path / "f" / f"{k:05d}.jpg", displayed(rotation))


@pytest.mark.parametrize("rotation", [90, 180, 270])
@pytest.mark.parametrize("kind", ["full-range", "bgr-path", "mpeg4", "streamed", "odd-size", "frame-threads"])
def test_every_decode_path_turns_the_frames(rotation: int, kind: str, tmp_path: Path) -> None:
    """Full-range 4:2:0 (views of the decoder's planes), a format encoded through BGR (4:4:4), another
    codec, the streaming hand-off's non-atomic writes, a size whose chroma planes round up, and FFmpeg's
    frame threads (the choice on more than two cores)."""
    stored = (66, 46) if kind == "odd-size" else STORED
    opts = {"full-range": {"pix_fmt": "yuvj420p"}, "bgr-path": {"pix_fmt": "yuv444p"}, "mpeg4": {"codec": "mpeg4"}}
    clip = make_rotated_video(tmp_path / "c.mp4", rotation, stored_wh=stored, num_frames=3,
                              **opts.get(kind, {}))  # type: ignore[arg-type]
    seen: list[int] = []
    info = extract_frames(clip, tmp_path / "f", atomic=kind != "streamed", decode_threads=3 if kind == "frame-threads" else 0,
                          on_frames=seen.append if kind == "streamed" else None)
    shown = (stored[1], stored[0]) if rotation % 180 else stored
    assert (info.width, info.height) == shown and (kind != "streamed" or seen[-1] == 3)
    for k in range(3):
        assert_upright(tmp_path / "f" / f"{k:05d}.jpg", shown)


def test_frame_selection_keeps_the_turn(clips: dict[int, Path], tmp_path: Path) -> None:
    info = extract_frames(clips[90], tmp_path / "f", start_s=0.2, stride=2, max_frames=2)
    assert (info.num_frames, info.width, info.height) == (2, *displayed(90))
    assert_upright(tmp_path / "f" / "00001.jpg", displayed(90))


# ---- against ffmpeg's own autorotate ---------------------------------------------------------------

FFMPEG = shutil.which("ffmpeg")


@pytest.mark.skipif(FFMPEG is None, reason="ffmpeg is not on PATH")
@pytest.mark.parametrize("name", MATRICES)
def test_frames_match_ffmpegs_autorotated_output(name: str, tmp_path: Path) -> None:
    matrix, expected = MATRICES[name]
    clip = make_display_matrix_video(tmp_path / "m.mp4", matrix, stored_wh=(96, 64))
    extract_frames(clip, tmp_path / "ours")
    (tmp_path / "ffmpeg").mkdir()
    subprocess.run([str(FFMPEG), "-loglevel", "error", "-i", str(clip), "-q:v", "2", "-start_number", "0",
                    str(tmp_path / "ffmpeg" / "%05d.jpg")], check=True, timeout=60)
    ours = cv2.imread(str(tmp_path / "ours" / "00001.jpg"))
    theirs = cv2.imread(str(tmp_path / "ffmpeg" / "00001.jpg"))
    assert ours.shape == theirs.shape
    assert psnr(ours, theirs) > 30, f"{name}: our frame is not ffmpeg's ({psnr(ours, theirs):.1f} dB)"
    # and it is this turn, not another that happens to look alike
    stored = draw_displayed_frame((96, 64))
    scores = {o: psnr(ours, turned(stored, o)) for _, o in MATRICES.values() if turned(stored, o).shape == ours.shape}
    assert max(scores, key=lambda o: scores[o]) == expected


# ---- submit: the job and its prompts are in the displayed picture ----------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
@pytest.mark.parametrize("rotation", [90, 270])
def test_the_job_is_the_displayed_video(
    rotation: int, stream: bool, clips: dict[int, Path], settings: Settings, redis_client: redis.Redis
) -> None:
    w, h = displayed(rotation)  # 48x64: (40, 60) is only inside as displayed
    job = submit(clips[rotation], [ObjectPrompt(1, 0, ((40.0, 60.0),), (1,))], settings=settings,
                 client=redis_client, job_id="phone", stream=stream)
    assert job.created and job.video is not None and (job.video.width, job.video.height) == (w, h)
    (_, fields), = redis_client.xrange(settings.keys.jobs)
    sent = messages.decode(fields)
    assert isinstance(sent, messages.JobMessage) and (sent.width, sent.height) == (w, h)


@pytest.mark.integration
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_a_prompt_inside_only_the_stored_picture_is_refused_and_says_why(
    stream: bool, clips: dict[int, Path], settings: Settings, redis_client: redis.Redis
) -> None:
    with pytest.raises(PromptError) as refused:
        submit(clips[270], [ObjectPrompt(1, 0, ((60.0, 40.0),), (1,))], settings=settings, client=redis_client,
               job_id="phone", stream=stream)
    message = str(refused.value)
    assert "point (60, 40) is outside the 48x64 frame" in message
    assert "stored 64x48 and rotated 90° clockwise" in message and "as players and ffmpeg show it" in message
    assert not redis_client.keys("*") and not (settings.storage_root / "jobs/phone").exists()


@pytest.mark.integration
def test_masks_come_back_upright(clips: dict[int, Path], settings: Settings, redis_client: redis.Redis,
                                 tmp_path: Path) -> None:
    """The colour segmenter follows the white square from a prompt in the displayed corner: its masks are
    the displayed size and cover the displayed top-left corner."""
    from tests.fakes import ColourSegmenter
    from worker.service.loop import Worker

    m = marker_size(displayed(90))
    submit(clips[90], [ObjectPrompt(1, 0, ((m / 2, m / 2),), (1,))], settings=settings, client=redis_client,
           job_id="upright", render=False)
    Worker(settings=settings, segmenter=ColourSegmenter(), client=redis_client, name="w").run(burst=True)  # type: ignore[arg-type]
    result = watch("upright", tmp_path / "out", settings=settings, client=redis_client, progress=False, timeout_s=10)
    masks = [decode_mask(f["objects"][0]["mask"]) for f in json.loads(result.masks_json.read_text())["frames"]]
    assert len(masks) == N
    for mask in masks:
        w, h = displayed(90)
        assert mask.shape == (h, w)
        ys, xs = np.nonzero(mask)
        assert xs.max() < m + 1 and ys.max() < m + 1 and mask[: m - 1, : m - 1].all()
