"""Test videos made on the fly with PyAV: a pure-green disc moving left to right on grey.

Ground truth (centre, mask) is known exactly, so tests can measure where masks land.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from schemas.prompts import ObjectPrompt

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


def disc_prompt(obj_id: int, frame: int, num_frames: int, size_wh: tuple[int, int], dy: float = 0) -> ObjectPrompt:
    """A foreground point on the moving disc (`dy` pixels below its centre) on `frame`."""
    x, y = disc_center(frame, num_frames, size_wh)
    return ObjectPrompt(obj_id, frame, ((x, y + dy),), (1,))


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


ENTERING_BGR = (255, 0, 255)  # magenta


def entering_square(num_frames: int, size_wh: tuple[int, int]) -> tuple[int, int]:
    """The frames (first, last + 1) on which a magenta square is in the picture: it enters halfway through."""
    return num_frames // 2, (3 * num_frames) // 4


def draw_entering_square(num_frames: int, size_wh: tuple[int, int]) -> Callable[[int, np.ndarray], None]:
    """A `make_video` drawer: a magenta square in the top left corner from frame N/2 to 3N/4."""
    first, end = entering_square(num_frames, size_wh)
    side = max(6, min(size_wh) // 5)

    def draw(k: int, img: np.ndarray) -> None:
        if first <= k < end:
            cv2.rectangle(img, (2, 2), (2 + side, 2 + side), ENTERING_BGR, -1)

    return draw


def slow_down_jpeg_writes(monkeypatch: Any, delay_s: float, *, gate: threading.Event | None = None,
                          gated_from: int = 0) -> None:
    """Make the producer spend `delay_s` more on each frame's JPEG, so decoding outlasts what a test
    does meanwhile (results arriving, a kill, a cancel); with `gate`, the JPEGs after the first `gated_from`
    wait for it too, so decoding outlasts the test's step however slow the machine is."""
    import producer.decode as decode

    real = decode.write_jpeg
    written = itertools.count()

    def slow(path: Path, data: Any, quality: int, whole: bool = True) -> None:
        time.sleep(delay_s)
        if gate is not None and next(written) >= gated_from:
            gate.wait(120)
        real(path, data, quality, whole)

    monkeypatch.setattr(decode, "write_jpeg", slow)


# ---- inputs as users send them: phone clips with a display matrix, audio only --------------------------

MARKER_BGR = (255, 255, 255)


def marker_size(size_wh: tuple[int, int]) -> int:
    return max(4, min(size_wh) // 4) // 2 * 2


def draw_displayed_frame(size_wh: tuple[int, int]) -> np.ndarray:
    """What a player shows of a rotated clip: grey, a white square in the top-left corner and a red bar
    along the right half of the top edge (so every turn and mirror moves something somewhere else)."""
    w, h = size_wh
    img = np.full((h, w, 3), BACKGROUND_BGR, dtype=np.uint8)
    m = marker_size(size_wh)
    img[:m, :m] = MARKER_BGR
    img[: m // 2, w // 2:] = (0, 0, 255)
    return img


def make_rotated_video(
    path: Path,
    rotation: int,
    *,
    stored_wh: tuple[int, int] = (64, 48),
    num_frames: int = 6,
    fps: int = 10,
    pix_fmt: str = "yuv420p",
    codec: str = "libx264",
    draw: Callable[[int, np.ndarray], None] | None = None,
) -> Path:
    """An MP4 stored at `stored_wh` with a display matrix that turns it `rotation` degrees counter-clockwise
    (PyAV's `set_display_rotation`, what `VideoFrame.rotation` reads back; a phone held upright records
    270, shown by ffprobe as -90): shown upright, every frame is `draw_displayed_frame` of the displayed
    size (then `draw(frame_idx, displayed_bgr)` in place). Stored, the picture is turned the other way."""
    if rotation % 90:
        raise ValueError(f"rotation must be a multiple of 90, got {rotation}")
    quarter_turns = (rotation // 90) % 4
    w, h = stored_wh
    displayed_wh = (h, w) if quarter_turns % 2 else (w, h)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "12"}
        stream.set_display_rotation(rotation)
        for k in range(num_frames):
            shown = draw_displayed_frame(displayed_wh)
            if draw is not None:
                draw(k, shown)
            stored = np.ascontiguousarray(np.rot90(shown, -quarter_turns))  # np.rot90 turns counter-clockwise
            for packet in stream.encode(av.VideoFrame.from_ndarray(stored, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_display_matrix_video(path: Path, matrix: list[int], *, stored_wh: tuple[int, int] = (64, 48),
                              num_frames: int = 3) -> Path:
    """An MP4 whose display matrix is `matrix` (9 ints, FFmpeg's layout); its stored frames are
    `draw_displayed_frame(stored_wh)` (so the turn is what moves the markers)."""
    w, h = stored_wh
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "12"}
        stream.set_display_matrix(matrix)
        for _ in range(num_frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(draw_displayed_frame(stored_wh), format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_audio_only(path: Path, seconds: float = 0.5) -> Path:
    """An M4A/MP4 file with one AAC audio stream and no video stream."""
    rate = 44100
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        t = np.arange(int(rate * seconds)) / rate
        samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for start in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, start:start + 1024], format="fltp", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
