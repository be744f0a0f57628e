"""Unit tests of tests.fakes.ColourSegmenter on JPEG frames of moving discs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from schemas.prompts import ObjectPrompt
from schemas.storage import frame_name
from tests.fakes import ColourSegmenter
from tests.render_checks import disc, iou
from worker.model.segment import FrameMasks, Segmenter
from worker.sources.frames import DirFrames

SIZE_HW = (120, 160)
N_FRAMES = 8
RADIUS = 20
GREEN = (0, 255, 0)
RED = (0, 0, 255)


def green_centre(frame_idx: int) -> tuple[float, float]:
    return 30.0 + 10 * frame_idx, 35.0


def red_centre(frame_idx: int) -> tuple[float, float]:
    return 130.0 - 6 * frame_idx, 85.0  # never touches the green disc: JPEG smears a red-green edge


def write_frames(frames_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """JPEG frames of a green and a red disc moving on grey; returns each frame's (green, red) truth."""
    frames_dir.mkdir()
    truths = []
    for i in range(N_FRAMES):
        green = disc(SIZE_HW, green_centre(i), RADIUS)
        red = disc(SIZE_HW, red_centre(i), RADIUS) & ~green
        image = np.full((*SIZE_HW, 3), 128, dtype=np.uint8)
        image[green] = GREEN
        image[red] = RED
        assert cv2.imwrite(str(frames_dir / frame_name(i)), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        truths.append((green, red))
    return truths


def prompts() -> list[ObjectPrompt]:
    gx, gy = green_centre(0)
    rx, ry = red_centre(5)
    return [
        ObjectPrompt(obj_id=7, frame_idx=5, box_xyxy=(rx - 15, ry - 15, rx + 15, ry + 15)),
        ObjectPrompt(obj_id=2, frame_idx=0, points_xy=((gx, gy),), labels=(1,)),
    ]


def test_colour_segmenter_tracks_each_disc(tmp_path: Path) -> None:
    frames_dir = tmp_path / "frames"
    truths = write_frames(frames_dir)
    segmenter: Segmenter = ColourSegmenter()
    assert segmenter.name == "fake-colour" and segmenter.random_weights is False
    results = list(segmenter.segment(DirFrames(frames_dir, N_FRAMES), prompts(), width=SIZE_HW[1], height=SIZE_HW[0]))
    assert [r.frame_idx for r in results] == list(range(N_FRAMES))
    for result, (green, red) in zip(results, truths):
        assert isinstance(result, FrameMasks)
        assert result.obj_ids == (2, 7)
        assert result.masks.dtype == bool and result.masks.shape == (2, *SIZE_HW)
        assert result.scores.dtype == np.float32 and result.scores.tolist() == [1.0, 1.0]
        assert iou(result.masks[0], green) >= 0.95, f"frame {result.frame_idx}: green IoU {iou(result.masks[0], green):.3f}"
        assert iou(result.masks[1], red) >= 0.95, f"frame {result.frame_idx}: red IoU {iou(result.masks[1], red):.3f}"


def test_absent_colour_gives_empty_mask_and_zero_score(tmp_path: Path) -> None:
    frames_dir = tmp_path / "frames"
    write_frames(frames_dir)
    # Point on the grey background: the grey blob is found, but a tolerance of 0 against a JPEG-noisy
    # blue-ish reference finds nothing; instead prompt a pixel and recolour the later frames' match away.
    image = cv2.imread(str(frames_dir / frame_name(0)))
    image[:] = (255, 0, 0)
    cv2.imwrite(str(frames_dir / frame_name(0)), image)
    prompt = ObjectPrompt(obj_id=1, frame_idx=0, points_xy=((5.0, 5.0),), labels=(1,))
    results = list(ColourSegmenter().segment(DirFrames(frames_dir, N_FRAMES), [prompt], width=SIZE_HW[1], height=SIZE_HW[0]))
    assert results[0].scores.tolist() == [1.0]
    assert all(r.scores.tolist() == [0.0] and not r.masks.any() for r in results[1:])


def test_fail_at_frame_raises_after_yielding_earlier_frames(tmp_path: Path) -> None:
    frames_dir = tmp_path / "frames"
    write_frames(frames_dir)
    seen: list[int] = []
    with pytest.raises(RuntimeError, match="fake failure at frame 3"):
        for result in ColourSegmenter(fail_at_frame=3).segment(DirFrames(frames_dir, N_FRAMES), prompts(), width=SIZE_HW[1], height=SIZE_HW[0]):
            seen.append(result.frame_idx)
    assert seen == [0, 1, 2]
