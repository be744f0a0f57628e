"""Pillow's 8-bit resampling (`Image.resize`, bicubic by default) as integer tensor operations, so a
frame can be resized on the GPU into exactly the pixels SAM 2's own loader gets from Pillow.

Why: beside a CUDA model the worker's only CPU work per frame should be the JPEG decode (which lets
go of the GIL). Pillow's resize lets go of the GIL too, but turning its result into an array
(`Image.tobytes`) does not, and the model's thread, which launches its GPU work from Python, waits for
the GIL each time (bench/RESULTS.md, GPU section).

The coefficients follow Pillow's src/libImaging/Resample.c: `precompute_coeffs` (filter support
scaled when shrinking, bounds rounded as C casts do), `normalize_coeffs_8bpc` (22-bit fixed point)
and the two passes (horizontal first, each rounded and clipped to 0..255). Integer arithmetic makes
the result bit-identical on any device (tests/test_pil_resize.py compares it with Pillow).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2


def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


@functools.lru_cache(maxsize=32)
def coefficients(in_size: int, out_size: int, kind: str = "bicubic") -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (out_size, ksize): source pixel and 22-bit fixed-point weight of each
    tap (weights past a row's taps are 0, their indices clamped into range)."""
    filt, base_support = FILTERS[kind]
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    index = np.zeros((out_size, ksize), dtype=np.int64)
    weight = np.zeros((out_size, ksize), dtype=np.int64)
    ss = 1.0 / filterscale
    for xx in range(out_size):
        center = 0.0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        taps = [filt((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        total = 0.0
        for w in taps:
            total += w
        for x, w in enumerate(taps):
            w = w / total if total != 0.0 else w
            weight[xx, x] = int(-0.5 + w * (1 << PRECISION_BITS)) if w < 0 else int(0.5 + w * (1 << PRECISION_BITS))
            index[xx, x] = xmin + x
        index[xx, xmax:] = xmin + xmax - 1  # weight 0: any pixel in range will do
    return index, weight


@functools.lru_cache(maxsize=32)
def _coefficients_on(device: str, in_size: int, out_size: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The coefficients as tensors on `device`, copied there once (the copy completes before return)."""
    index, weight = coefficients(in_size, out_size, kind)
    return torch.from_numpy(index).to(device), torch.from_numpy(weight).to(device, torch.int32)


def _pass(image: torch.Tensor, dim: int, out_size: int, kind: str) -> torch.Tensor:
    """One pass along `dim` of an (H, W, C) uint8 tensor: rounded, clipped to 0..255, uint8 again."""
    index, weight = _coefficients_on(str(image.device), image.shape[dim], out_size, kind)
    taps = torch.index_select(image, dim, index.reshape(-1)).to(torch.int32)
    shape = list(image.shape)
    shape[dim : dim + 1] = [out_size, index.shape[1]]
    taps = taps.reshape(shape)
    wshape = [1] * len(shape)
    wshape[dim], wshape[dim + 1] = out_size, index.shape[1]
    acc = (taps * weight.reshape(wshape)).sum(dim=dim + 1, dtype=torch.int32) + (1 << (PRECISION_BITS - 1))
    return torch.clamp(acc >> PRECISION_BITS, 0, 255).to(torch.uint8)


def resize(image: torch.Tensor, size_wh: tuple[int, int], kind: str = "bicubic") -> torch.Tensor:
    """An (H, W, C) uint8 tensor resized to size_wh as Pillow's `Image.resize(size_wh)` would
    (bicubic, Pillow's default for RGB), on the tensor's device."""
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f"resize takes an (H, W, C) uint8 tensor, but got {tuple(image.shape)} {image.dtype}")
    out_w, out_h = size_wh
    if image.shape[1] != out_w:
        image = _pass(image, 1, out_w, kind)
    if image.shape[0] != out_h:
        image = _pass(image, 0, out_h, kind)
    return image
