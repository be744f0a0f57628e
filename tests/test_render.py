"""Unit tests of worker.output.render: mask drawing and the H.264 MP4 writer (no Redis, no GPU)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from tests.render_checks import disc, iou, near_box, tinted_mask
from worker.output.draw import PALETTE_BGR, colour_for, draw_masks, frame_rate, partial_path
from worker.output.render import MaskVideoWriter

GREY = (128, 128, 128)
GREEN = (0, 255, 0)
RADIUS = 20
N_FRAMES = 12


def disc_frame(size_hw: tuple[int, int], frame_idx: int) -> tuple[np.ndarray, np.ndarray]:
    """A pure-green disc on grey, moving right and down with the frame index; returns (frame, truth)."""
    height, width = size_hw
    centre = (30 + frame_idx * (width - 60) / N_FRAMES, 35 + frame_idx * (height - 60) / N_FRAMES)
    truth = disc(size_hw, centre, RADIUS)
    frame = np.full((height, width, 3), GREY, dtype=np.uint8)
    frame[truth] = GREEN
    return frame, truth


def decode_bgr(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)]


@pytest.mark.parametrize("fps", [10, 29.97])
@pytest.mark.parametrize("size_hw", [(121, 161), (120, 160)])
def test_mp4_is_h264_with_one_frame_per_write_and_tint_matches_masks(
    tmp_path: Path, size_hw: tuple[int, int], fps: float
) -> None:
    height, width = size_hw
    path = tmp_path / "render.mp4"
    obj_id = 1
    frames = [disc_frame(size_hw, i) for i in range(N_FRAMES)]
    with MaskVideoWriter(path, fps=fps, width=width, height=height) as writer:
        for frame, truth in frames:
            writer.write(frame, [obj_id], truth[None])
    assert path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["render.mp4"]

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.codec_context.width, stream.codec_context.height) == (width + width % 2, height + height % 2)
        assert stream.average_rate is not None
        assert float(stream.average_rate) == pytest.approx(fps, rel=1e-3)
    decoded = decode_bgr(path)
    assert len(decoded) == N_FRAMES
    for i, (rendered, (frame, truth)) in enumerate(zip(decoded, frames)):
        assert rendered.shape == (height + height % 2, width + width % 2, 3)
        recovered = tinted_mask(rendered[:height, :width], frame, colour_for(obj_id)) & near_box(truth)
        assert iou(recovered, truth) >= 0.95, f"frame {i}: IoU {iou(recovered, truth):.3f}"
    if width % 2:  # the padding column replicates the last source column
        last = decoded[0][:height, width - 1].astype(int)
        pad = decoded[0][:height, width].astype(int)
        assert np.abs(last - pad).max() <= 12


def test_frame_rate_is_exact() -> None:
    assert frame_rate(10) == 10
    assert frame_rate(29.97) == frame_rate(30000 / 1001) == pytest.approx(30000 / 1001)
    assert frame_rate(29.97).denominator == 1001
    assert frame_rate(23.976).denominator == 1001
    assert frame_rate(12.5) == pytest.approx(12.5)
    with pytest.raises(ValueError, match="fps"):
        frame_rate(0)


def test_draw_masks_tints_exactly_the_mask_and_leaves_input_alone() -> None:
    frame, truth = disc_frame((121, 161), 3)
    before = frame.copy()
    out = draw_masks(frame, [4], truth[None])
    assert np.array_equal(frame, before)
    assert iou(tinted_mask(out, frame, colour_for(4)) & near_box(truth), truth) >= 0.99


def test_rgb_frames_are_drawn_like_bgr_frames() -> None:
    """The worker hands the renderer the RGB frame its model loader decoded: same picture, channels swapped."""
    frame, truth = disc_frame((121, 161), 5)
    masks = np.stack([truth, np.roll(truth, 30, axis=1)])
    bgr = draw_masks(frame, [1, 7], masks)
    rgb = draw_masks(np.ascontiguousarray(frame[..., ::-1]), [1, 7], masks, rgb=True)
    assert np.array_equal(rgb[..., ::-1], bgr)


def test_rgb_writer_encodes_the_same_colours(tmp_path: Path) -> None:
    frame, truth = disc_frame((120, 160), 2)
    with MaskVideoWriter(tmp_path / "bgr.mp4", fps=10, width=160, height=120, threads=1) as w:
        w.write(frame, [1], truth[None])
    with MaskVideoWriter(tmp_path / "rgb.mp4", fps=10, width=160, height=120, threads=1) as w:
        w.write(np.ascontiguousarray(frame[..., ::-1]), [1], truth[None], rgb=True)
    drawn = draw_masks(frame, [1], truth[None]).astype(int)
    err_bgr = np.abs(decode_bgr(tmp_path / "bgr.mp4")[0].astype(int) - drawn).mean()
    err_rgb = np.abs(decode_bgr(tmp_path / "rgb.mp4")[0].astype(int) - drawn).mean()
    # (FFmpeg's rgb24 conversion is in fact the more exact of the two: grey 128 stays 128)
    assert err_rgb <= 3 and err_rgb <= err_bgr + 0.5


def test_two_objects_get_different_colours_and_their_own_regions() -> None:
    size_hw = (120, 160)
    a = disc(size_hw, (40, 70), RADIUS)
    b = disc(size_hw, (115, 70), RADIUS)
    frame = np.full((*size_hw, 3), GREY, dtype=np.uint8)
    frame[a | b] = GREEN
    out = draw_masks(frame, [1, 2], np.stack([a, b]))
    assert colour_for(1) != colour_for(2)
    assert iou(tinted_mask(out, frame, colour_for(1)) & near_box(a), a) >= 0.95
    assert iou(tinted_mask(out, frame, colour_for(2)) & near_box(b), b) >= 0.95


def test_colours_are_stable_distinct_and_not_green() -> None:
    ids = list(range(40))
    colours = [colour_for(i) for i in ids]
    assert colours == [colour_for(i) for i in ids]
    assert len(set(colours[: len(PALETTE_BGR)])) == len(PALETTE_BGR)
    assert GREEN not in colours
    assert all(all(0 <= c <= 255 for c in colour) for colour in colours)


def test_empty_masks_draw_nothing() -> None:
    frame, _ = disc_frame((120, 160), 0)
    out = draw_masks(frame, [1, 2], np.zeros((2, 120, 160), dtype=bool))
    assert np.array_equal(out, frame)
    assert np.array_equal(draw_masks(frame, [], np.zeros((0, 120, 160), dtype=bool)), frame)


@pytest.mark.parametrize(
    ("obj_ids", "masks", "match"),
    [
        ([1], np.zeros((120, 160), dtype=bool), r"shape \(N, H, W\) = \(1, 120, 160\).*got \(120, 160\)"),
        ([1, 2], np.zeros((1, 120, 160), dtype=bool), r"\(2, 120, 160\).*got \(1, 120, 160\)"),
        ([1], np.zeros((1, 121, 160), dtype=bool), r"\(1, 120, 160\).*got \(1, 121, 160\)"),
        ([1], np.zeros((1, 120, 160), dtype=np.uint8), r"dtype bool, but got uint8"),
        ([1], [[[True]]], r"np.ndarray .* but got list"),
    ],
)
def test_bad_masks_raise_value_error_saying_expected_vs_got(obj_ids: list[int], masks: object, match: str) -> None:
    frame = np.zeros((120, 160, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=match):
        draw_masks(frame, obj_ids, masks)  # type: ignore[arg-type]


def test_bad_frame_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\), but got \(120, 160\)"):
        draw_masks(np.zeros((120, 160), dtype=np.uint8), [], np.zeros((0, 120, 160), dtype=bool))


def test_writer_rejects_frames_of_the_wrong_size(tmp_path: Path) -> None:
    path = tmp_path / "render.mp4"
    with pytest.raises(ValueError, match="must be 161x121 .* but got 160x120"):
        with MaskVideoWriter(path, fps=10, width=161, height=121) as writer:
            writer.write(np.zeros((120, 160, 3), dtype=np.uint8), [], np.zeros((0, 120, 160), dtype=bool))
    assert list(tmp_path.iterdir()) == []


def test_exception_inside_with_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "render.mp4"
    frame, truth = disc_frame((121, 161), 0)
    with pytest.raises(RuntimeError, match="boom"):
        with MaskVideoWriter(path, fps=10, width=161, height=121) as writer:
            writer.write(frame, [1], truth[None])
            assert not path.exists()  # nothing at the final name until close()
            raise RuntimeError("boom")
    assert not path.exists()
    assert not partial_path(path).exists()
    assert list(tmp_path.iterdir()) == []


def test_close_without_frames_raises_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "render.mp4"
    writer = MaskVideoWriter(path, fps=10, width=160, height=120)
    with pytest.raises(ValueError, match="no frames"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_close_is_idempotent_and_write_after_close_fails(tmp_path: Path) -> None:
    path = tmp_path / "render.mp4"
    frame, truth = disc_frame((120, 160), 0)
    writer = MaskVideoWriter(path, fps=10, width=160, height=120)
    writer.write(frame, [1], truth[None])
    assert writer.close() == path
    assert writer.close() == path
    with pytest.raises(ValueError, match="closed"):
        writer.write(frame, [1], truth[None])
    assert len(decode_bgr(path)) == 1
