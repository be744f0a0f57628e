"""A video's display matrix: how its stored frames are turned to be shown upright.

A phone films in the sensor's orientation and records how to show the picture (a display matrix: a
rotation by a multiple of 90 degrees, sometimes a mirror), so a portrait clip is stored 1280x720 and
shown 720x1280. Every player, and ffmpeg (its default `-autorotate`), shows the turned picture; so do
the producer's JPEGs, and the job's width, height and prompt coordinates are the displayed ones.

FFmpeg attaches the matrix to every decoded frame (`AV_FRAME_DATA_DISPLAYMATRIX`); it is read once, from
the first frame. The eight turns a matrix of right angles can express are applied to each plane (Y, U,
V, or a BGR image) by OpenCV: a quarter turn in one pass into new planes (two for a mirrored one), a
flip or a half turn in place once the planes are copied anyway (a range conversion). Turning a 1080p 4:2:0
frame costs 0.4 ms (a quarter turn) or 0.1 ms (a half turn) in the decoding thread. A matrix of another angle (never seen from a camera) is ignored with a
warning: the frames stay as stored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import av
import cv2
import numpy as np

try:
    from av.sidedata.sidedata import Type as _SideDataType

    _DISPLAYMATRIX: Any = _SideDataType.DISPLAYMATRIX
except (ImportError, AttributeError):  # pragma: no cover - an older PyAV: the frame's rotation below
    _DISPLAYMATRIX = None

log = logging.getLogger(__name__)

_TOLERANCE = 0.02  # |sin| of 1.1 degrees: a matrix further than that from a right angle is not one


@dataclass(frozen=True)
class Orientation:
    """How to turn a stored image into the displayed one: transpose it (rows become columns) or not,
    then flip its rows (upside down) and/or its columns (left to right). The identity: upright already."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @property
    def upright(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def displayed_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) as displayed of a stored `width`x`height` frame."""
        return (height, width) if self.transpose else (width, height)

    def describe(self) -> str:
        """What a player does to the stored frames, in words: 'rotated 90° clockwise', ..."""
        return _WORDS[(self.transpose, self.flip_rows, self.flip_cols)]

    def apply(self, image: np.ndarray) -> np.ndarray:
        """`image` (a plane H x W, or H x W x C) turned as displayed: a new contiguous array. The input may
        be a row-strided view (a decoder's plane); it is only read."""
        if not self.transpose:
            return self.flip_in_place(np.array(image))  # a copy, then flipped in place: faster than cv2.flip
        turn = _ROTATE.get((self.transpose, self.flip_rows, self.flip_cols))
        if turn is not None:
            return cv2.rotate(image, turn)
        turned = cv2.transpose(image)  # the two mirrored quarter turns
        return cv2.flip(turned, -1, dst=turned) if self.flip_rows else turned

    def flip_in_place(self, image: np.ndarray) -> np.ndarray:
        """A turn without a transpose, done in `image` itself (contiguous, writable); returns it."""
        if self.transpose:
            raise ValueError("a quarter turn changes the image's shape: it cannot be done in place")
        if self.flip_rows or self.flip_cols:
            cv2.flip(image, -1 if self.flip_rows and self.flip_cols else (0 if self.flip_rows else 1), dst=image)
        return image


UPRIGHT = Orientation()

_ROTATE = {
    (True, False, True): cv2.ROTATE_90_CLOCKWISE,
    (True, True, False): cv2.ROTATE_90_COUNTERCLOCKWISE,
}
_WORDS = {
    (False, False, False): "upright",
    (True, False, True): "rotated 90° clockwise",
    (True, True, False): "rotated 90° counter-clockwise",
    (False, True, True): "rotated 180°",
    (False, False, True): "mirrored left to right",
    (False, True, False): "flipped upside down",
    (True, False, False): "rotated 90° clockwise and mirrored",
    (True, True, True): "rotated 90° counter-clockwise and mirrored",
}


def from_display_matrix(matrix: Sequence[int]) -> Orientation | None:
    """The turn FFmpeg's 3x3 display matrix (9 ints, row-major, 16.16 fixed point) describes, as
    ffmpeg's autorotate applies it; None if it is not a right angle (with or without a mirror).

    A stored pixel at (x, y) is shown at (a x + c y, b x + d y) (then moved into the frame), where
    a, b, c, d = matrix[0], matrix[1], matrix[3], matrix[4]."""
    a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
    scale = max(abs(a), abs(b), abs(c), abs(d))
    if scale == 0:
        return None
    a, b, c, d = a / scale, b / scale, c / scale, d / scale
    if max(abs(b), abs(c)) <= _TOLERANCE and min(abs(a), abs(d)) >= 1 - _TOLERANCE:  # shown x = a x, y = d y
        return Orientation(transpose=False, flip_rows=d < 0, flip_cols=a < 0)
    if max(abs(a), abs(d)) <= _TOLERANCE and min(abs(b), abs(c)) >= 1 - _TOLERANCE:  # shown x = c y, y = b x
        return Orientation(transpose=True, flip_rows=b < 0, flip_cols=c < 0)
    return None


def frame_orientation(frame: av.VideoFrame) -> Orientation:
    """The turn of `frame`'s display matrix (upright without one, or with one of another angle)."""
    side_data: Any = getattr(frame, "side_data", None)
    raw = None
    if side_data is not None and _DISPLAYMATRIX is not None:
        try:
            raw = side_data.get(_DISPLAYMATRIX)
        except (AttributeError, KeyError, TypeError, ValueError):  # an older PyAV: the rotation below
            raw = None
    if raw is not None:
        data = bytes(raw)
        if len(data) < 36:
            return UPRIGHT
        matrix = np.frombuffer(data[:36], dtype=np.int32).tolist()
        found = from_display_matrix(matrix)
        if found is None:
            log.warning("the video's display matrix %s is not a right angle: its frames are kept as stored", matrix)
            return UPRIGHT
        return found
    degrees = int(getattr(frame, "rotation", 0) or 0)  # counter-clockwise, without any mirror
    return {90: _ccw, -270: _ccw, 180: _half, -180: _half, 270: _cw, -90: _cw}.get(degrees, UPRIGHT)


_cw = Orientation(transpose=True, flip_cols=True)
_ccw = Orientation(transpose=True, flip_rows=True)
_half = Orientation(flip_rows=True, flip_cols=True)


def first_frame_orientation(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> Orientation:
    """The display matrix's turn, from the first frame of `stream` (FFmpeg attaches the stream's matrix to
    each frame); upright if none decodes (the decode itself then says what is wrong). Decodes the first
    picture alone, in one thread (the decoder is drained after a key frame instead of decoding the
    frames its reordering delay would wait for): about 20 ms at 1080p."""
    stream.thread_type = "NONE"
    stream.codec_context.thread_count = 1
    try:
        for packet in container.demux(stream):
            frames = stream.decode(packet)
            if not frames and packet.is_keyframe:
                frames = stream.decode(None)  # drained: nothing more decodes after this
                if not frames:
                    break
            if frames:
                return frame_orientation(frames[0])
    except (av.error.FFmpegError, ValueError):
        pass
    return UPRIGHT
