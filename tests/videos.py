"""Test videos made on the fly with PyAV: a pure-green disc moving left to right on grey.

Ground truth (centre, mask) is known exactly, so tests can measure where masks land.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

BACKGROUND_BGR = (128, 128, 128)
DISC_BGR = (0, 255, 0)


def disc_radius(size_wh: tuple[int, int]) -> int:
    return max(4, min(size_wh) // 6)


DISC_RADIUS = disc_radius((160, 120))


def disc_center(frame_idx: int, num_frames: int, size_wh: tuple[int, int]) -> tuple[float, float]:
    """Centre (x, y) of the disc on `frame_idx`: left edge to right edge over the clip, mid-height."""
    w, h = size_wh
    r = disc_radius(size_wh)
    t = frame_idx / max(num_frames - 1, 1)
    return float(round(r + 2 + t * (w - 2 * r - 5))), float(h // 2)


def draw_disc_frame(frame_idx: int, num_frames: int, size_wh: tuple[int, int]) -> np.ndarray:
    w, h = size_wh
    img = np.full((h, w, 3), BACKGROUND_BGR, dtype=np.uint8)
    x, y = disc_center(frame_idx, num_frames, size_wh)
    cv2.circle(img, (int(x), int(y)), disc_radius(size_wh), DISC_BGR, -1)
    return img


def disc_mask(frame_idx: int, num_frames: int, size_wh: tuple[int, int]) -> np.ndarray:
    """Boolean ground truth of the disc on `frame_idx`, shape (H, W)."""
    return np.all(draw_disc_frame(frame_idx, num_frames, size_wh) == DISC_BGR, axis=2)


def make_video(
    path: Path,
    *,
    num_frames: int = 20,
    size_wh: tuple[int, int] = (160, 120),
    fps: int = 10,
    codec: str = "libx264",
    draw: Callable[[int, np.ndarray], None] | None = None,
) -> Path:
    """Write an MP4 of `num_frames` frames; `draw(frame_idx, bgr)` may paint each frame in place."""
    w, h = size_wh
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w + (w % 2), h + (h % 2)
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"}
        for k in range(num_frames):
            img = draw_disc_frame(k, num_frames, size_wh)
            if draw is not None:
                draw(k, img)
            if w % 2 or h % 2:
                img = cv2.copyMakeBorder(img, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def slow_down_jpeg_writes(monkeypatch: Any, delay_s: float) -> None:
    """Make the producer spend `delay_s` more on each frame's JPEG, so decoding outlasts what a test
    does meanwhile (results arriving, a kill, a cancel)."""
    import producer.decode as decode

    real = decode._write_jpeg

    def slow(path: Path, data: Any, quality: int, whole: bool = True) -> None:
        time.sleep(delay_s)
        real(path, data, quality, whole)

    monkeypatch.setattr(decode, "_write_jpeg", slow)
