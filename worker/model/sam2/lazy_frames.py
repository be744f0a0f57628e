"""A job's frames as SAM 2 reads them, loaded lazily: LazyFrames stands in for the predictor's preloaded
`images` tensor. Frame i is decoded and resized when propagation first asks for it, with the next few
frames (in the direction of travel) decoded ahead by a small thread pool, so a bounded number is held in
memory and frames may still be arriving from the producer (worker/sources/frames.py). The pixels are the
predictor's own loader's, bit for bit (tests/test_sam2_memory.py).
"""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image

from runtime.machine import usable_cores
from worker.model.sam2 import pil_resize
from worker.sources.frames import FrameSource

UNKNOWN_LENGTH = 1 << 30  # num_frames placeholder while a streamed video's length is unknown
IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)


class EndOfFrames(Exception):
    """The video ended before the frame propagation asked for (streamed input)."""


def normalisation_table() -> np.ndarray:
    """(3, 256) float32: channel c's pixel value v as the model sees it. The predictor's loader computes
    v / 255 in float64, casts to float32, then subtracts the mean and divides by the std in float32;
    the same operations per value, done once, give identical numbers for a gather's cost."""
    scaled = (np.arange(256) / 255.0).astype(np.float32)
    mean, std = np.array(IMG_MEAN, dtype=np.float32), np.array(IMG_STD, dtype=np.float32)
    return np.stack([(scaled - mean[c]) / std[c] for c in range(3)])


def model_input_on_device(pixels: torch.Tensor, image_size: int, table: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 RGB on a device -> the model's (3, S, S) float32 input there: Pillow's resize
    in integers, then `table` (normalisation_table() on that device) per channel."""
    small = pil_resize.resize(pixels, (image_size, image_size))
    index = small.permute(2, 0, 1).reshape(3, -1).long()
    return torch.gather(table, 1, index).reshape(3, image_size, image_size)


def _decode_rgb(path: Path) -> np.ndarray:
    """A frame as an (H, W, 3) RGB array, Pillow's exact pixels (both use libjpeg-turbo's default
    decoder; tests/test_sam2_memory.py), decoded by simplejpeg, which lets go of the GIL throughout.
    Anything simplejpeg cannot read (not a JPEG, CMYK) goes through Pillow, as SAM 2's loader does."""
    data = path.read_bytes()
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except Exception:  # noqa: BLE001 - Pillow reads it or says clearly why not
        with Image.open(io.BytesIO(data)) as pil:
            return np.array(pil.convert("RGB"))  # writable, as torch.from_numpy wants


class LazyFrames:
    """Stands in for the predictor's preloaded `images` tensor: frame i is loaded on first access,
    with the next `prefetch` frames (in the direction of travel) decoded ahead by a thread pool."""

    def __init__(self, source: FrameSource, image_size: int, device: torch.device, *, prefetch: int | None = None,
                 threads: int | None = None) -> None:
        self.source = source
        self.image_size = image_size
        self.device = device
        # a live source reads one frame ahead: which frame comes next is decided as late as it can be
        self.prefetch = prefetch if prefetch is not None else source.prefetch
        self._norm = normalisation_table()
        self._on_cuda = device.type == "cuda"
        # On CUDA the model leaves the CPU free and frames must keep up with it: more decoding threads,
        # and the lookup runs on the GPU (the uint8 frame crosses the bus, a quarter of the bytes)
        threads = threads or (min(6, usable_cores()) if self._on_cuda else 2)
        self._norm_on_device = torch.from_numpy(self._norm).to(device) if self._on_cuda else None
        self._streams: dict[int, torch.cuda.Stream] = {}  # one side stream per loader thread (CUDA)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="frames")
        self._futures: OrderedDict[int, Future[torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self._last = -1
        self.loaded = 0
        self.load_s = 0.0  # seconds the loader threads spent on frames (all threads together)
        self.waited_s = 0.0  # seconds the model waited for a frame (or for the producer to write it)
        self._rgb: dict[int, np.ndarray] = {}  # full-size decoded frames, kept for the renderer

    def _load(self, frame_idx: int) -> torch.Tensor:
        if not self.source.wait(frame_idx):
            raise EndOfFrames(frame_idx)
        t0 = time.perf_counter()
        # The same pixels as the predictor's own loader (sam2.utils.misc._load_img_as_tensor: Pillow's
        # decode, convert("RGB"), resize); the full-size RGB frame is kept too, for the renderer.
        if self._on_cuda:
            full = _decode_rgb(self.source.path(frame_idx))
            img = self._prepare_on_cuda(full)
        else:
            with Image.open(self.source.path(frame_idx)) as pil:
                rgb = pil if pil.mode == "RGB" else pil.convert("RGB")  # a JPEG decodes to RGB: no copy
                small = np.asarray(rgb.resize((self.image_size, self.image_size)))
                full = np.asarray(rgb)
            img = self._normalise_here(small)
        with self._lock:
            self._rgb[frame_idx] = full
            self.loaded += 1
            self.load_s += time.perf_counter() - t0
        return img

    def _normalise_here(self, small: np.ndarray) -> torch.Tensor:
        # a lookup table, not torch: a torch op on this thread would start a second OpenMP team that
        # spins on the cores the model's own threads need
        return torch.from_numpy(np.stack([self._norm[c][small[:, :, c]] for c in range(3)]))

    def _prepare_on_cuda(self, full: np.ndarray) -> torch.Tensor:
        """Resize (Pillow's arithmetic in integers: worker/model/sam2/pil_resize.py) and normalise (the same lookup
        table) on the GPU, so the model gets identical numbers while this thread holds the GIL for
        almost nothing; on this thread's own stream, overlapping the model's work. Returns once the
        frame is ready on the device."""
        assert self._norm_on_device is not None
        ident = threading.get_ident()
        stream = self._streams.get(ident)
        if stream is None:
            stream = self._streams.setdefault(ident, torch.cuda.Stream(self.device))
        with torch.cuda.stream(stream):
            pixels = torch.from_numpy(full).pin_memory().to(self.device, non_blocking=True)
            img = model_input_on_device(pixels, self.image_size, self._norm_on_device)
        stream.synchronize()
        return img

    def ready(self, frame_idx: int) -> bool:
        """Whether frame i is already loaded (scheduled, finished, no error): taking it will not wait."""
        with self._lock:
            fut = self._futures.get(frame_idx)
        return fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None

    def take_rgb(self, frame_idx: int) -> np.ndarray | None:
        """The decoded full-size frame, handed over once (None if it was not kept)."""
        with self._lock:
            return self._rgb.pop(frame_idx, None)

    def _schedule(self, frame_idx: int) -> Future[torch.Tensor]:
        fut = self._futures.get(frame_idx)
        if fut is None:
            fut = self._pool.submit(self._load, frame_idx)
            self._futures[frame_idx] = fut
        return fut

    def __len__(self) -> int:
        return self.source.total or UNKNOWN_LENGTH

    def __getitem__(self, frame_idx: int) -> torch.Tensor:
        with self._lock:
            step = -1 if frame_idx < self._last else 1
            self._last = frame_idx
            fut = self._schedule(frame_idx)
            total = self.source.total
            for k in range(1, self.prefetch + 1):
                ahead = frame_idx + step * k
                if ahead < 0 or (total is not None and ahead >= total):
                    break
                self._schedule(ahead)
            for idx in [i for i in self._futures if abs(i - frame_idx) > self.prefetch]:
                self._futures.pop(idx).cancel()
            for idx in [i for i in self._rgb if abs(i - frame_idx) > 2 * self.prefetch]:
                del self._rgb[idx]  # never taken (a backward pass): bounded memory
        t0 = time.perf_counter()
        img = self._result(fut)
        self.waited_s += time.perf_counter() - t0
        if self._on_cuda:  # made on a loader thread's stream, read on this one's: keep its memory until then
            img.record_stream(torch.cuda.current_stream(self.device))
        return img

    def _result(self, fut: Future[torch.Tensor]) -> torch.Tensor:
        """The loaded frame, waiting in short steps: between them the job's check runs (a lost lease or a
        shutdown stops the model even while a loader thread is stuck), and a pool that can no longer run
        the load is noticed."""
        while True:
            try:
                return fut.result(timeout=0.5)
            except FutureTimeout:
                self.source.check()
                if self._pool._shutdown and not fut.running():  # noqa: SLF001 - closed under us: it will never run
                    raise RuntimeError("the frame loaders were shut down while a frame was awaited") from None

    def close(self) -> None:
        for fut in self._futures.values():
            fut.cancel()
        self._futures.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._rgb.clear()
