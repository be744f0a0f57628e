"""A decoded frame made ready for the JPEG encoder: 4:2:0 frames as full-range (JPEG) Y, U, V planes,
anything else as BGR, turned upright as the video's display matrix says (producer/orientation.py)."""

from __future__ import annotations

from dataclasses import dataclass

import av
import cv2
import numpy as np

try:  # JPEG straight from YUV planes; without it frames go through BGR and OpenCV
    import simplejpeg
except ImportError:  # pragma: no cover
    simplejpeg = None

from producer.orientation import UPRIGHT, Orientation

# Video YUV is usually "limited range" (Y 16-235, chroma 16-240); JPEG's YCbCr is full range:
# full = clip(round(video * scale + offset)). cv2.addWeighted does this in SIMD, 2.4x faster than a lookup
# table, with the same bytes for all 256 inputs (tests/test_decode.py checks).
_Y_SCALE, _Y_OFFSET = 255 / 219, -16 * 255 / 219
_C_SCALE, _C_OFFSET = 255 / 224, 128 - 128 * 255 / 224


def to_full_range(y: np.ndarray, u: np.ndarray, v: np.ndarray, *,
                  in_place: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Limited-range (video) Y, U, V planes as new contiguous full-range (JPEG) planes (in_place: the
    planes themselves, converted, which must be contiguous and writable)."""
    return (cv2.addWeighted(y, _Y_SCALE, y, 0.0, _Y_OFFSET, dst=y if in_place else None),
            cv2.addWeighted(u, _C_SCALE, u, 0.0, _C_OFFSET, dst=u if in_place else None),
            cv2.addWeighted(v, _C_SCALE, v, 0.0, _C_OFFSET, dst=v if in_place else None))


@dataclass(frozen=True)
class YuvPlanes:
    """A decoded 4:2:0 frame's full-range (JPEG) planes: fresh planes converted from video range, or, for
    a full-range source, views of the decoder's buffers, which stay valid (FFmpeg reference-counts them)
    while `frame` is held; either way nothing is copied before the encoder reads them."""

    y: np.ndarray
    u: np.ndarray
    v: np.ndarray
    frame: av.VideoFrame | None


def frame_payload(frame: av.VideoFrame,
                  orientation: Orientation = UPRIGHT) -> tuple[YuvPlanes | np.ndarray, int, int]:
    """What the JPEG writer needs from a decoded frame, turned by `orientation`, and its (height, width)
    as displayed.

    4:2:0 frames go to the encoder as their Y, U, V planes (no conversion to RGB and back: faster, and
    no extra rounding); anything else is converted to BGR. The range conversion runs here, in the
    decoding thread, while the frame is still in this core's cache (bench/RESULTS.md: 12% more frames/s
    at 1080p than converting in the encoder's thread). A quarter turn writes new planes, converted in
    place; a flip or half turn is done in place in the converted planes (0.4 and 0.1 ms more a 1080p
    frame than converting alone)."""
    fmt = frame.format.name
    if simplejpeg is not None and fmt in ("yuv420p", "yuvj420p"):
        # the ignore: before Python 3.12 numpy's stubs accept only bytes-like types as buffers, not a VideoPlane
        y, u, v = (
            np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width]  # type: ignore[call-overload]
            for p in frame.planes
        )
        full = fmt == "yuvj420p" or str(getattr(frame, "color_range", "")).endswith(("2", "JPEG"))
        if orientation.transpose:  # turned into new planes, then converted in them
            y, u, v = (orientation.apply(p) for p in (y, u, v))
            planes = YuvPlanes(y, u, v, None) if full else YuvPlanes(*to_full_range(y, u, v, in_place=True), None)
        elif not orientation.upright:  # converted (or copied) into new planes, then flipped in them
            y, u, v = (np.array(y), np.array(u), np.array(v)) if full else to_full_range(y, u, v)
            planes = YuvPlanes(orientation.flip_in_place(y), orientation.flip_in_place(u),
                               orientation.flip_in_place(v), None)
        elif full:
            planes = YuvPlanes(y, u, v, frame)
        else:
            planes = YuvPlanes(*to_full_range(y, u, v), None)
        return planes, planes.y.shape[0], planes.y.shape[1]
    image = frame.to_ndarray(format="bgr24")
    if not orientation.upright:
        image = orientation.apply(image)
    return image, image.shape[0], image.shape[1]
