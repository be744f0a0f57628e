"""Unit tier: the integer-tensor resize gives exactly Pillow's pixels (SAM 2's loader uses Pillow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from worker.model.sam2.pil_resize import resize

SIZES = [((160, 120), (256, 256)), ((960, 540), (1024, 1024)), ((1280, 720), (1024, 1024)),
         ((1920, 1080), (1024, 1024)), ((128, 96), (256, 256)), ((3001, 1999), (1024, 1024)),
         ((37, 53), (256, 256)), ((1024, 300), (1024, 1024)), ((640, 480), (333, 211))]


@pytest.mark.parametrize(("src_wh", "dst_wh"), SIZES, ids=[f"{a[0]}x{a[1]}-{b[0]}x{b[1]}" for a, b in SIZES])
@pytest.mark.parametrize("content", ["noise", "smooth"])
def test_resize_equals_pillows_default_resize(src_wh: tuple[int, int], dst_wh: tuple[int, int], content: str) -> None:
    rng = np.random.default_rng(sum(src_wh))
    w, h = src_wh
    if content == "noise":  # the extremes: bicubic overshoots, so clipping at 0 and 255 is exercised
        pixels = rng.choice(np.array([0, 255, 7, 128], np.uint8), size=(h, w, 3))
    else:
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1).astype(np.uint8)
    theirs = np.asarray(Image.fromarray(pixels).resize(dst_wh))
    ours = resize(torch.from_numpy(pixels), dst_wh).numpy()
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs), f"{np.count_nonzero(ours != theirs)} values differ from Pillow's"


def test_resize_checks_its_input() -> None:
    with pytest.raises(ValueError, match=r"\(H, W, C\) uint8"):
        resize(torch.zeros(4, 4), (2, 2))
    same = torch.arange(48, dtype=torch.uint8).reshape(4, 4, 3)
    assert torch.equal(resize(same, (4, 4)), same)
