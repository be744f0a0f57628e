"""The real Segmenter: SAM 2's video predictor, wrapped so nothing else touches its untyped state.

One Sam2Segmenter owns the predictor (loaded once per worker), the autocast context (bf16 on CUDA
only) and, during a job, the predictor's inference state. Unlike the predictor's own `init_state`,
which loads every frame before the first mask and keeps every frame's state forever:

- frames are loaded lazily, as propagation reaches them, by background threads that decode and resize
  the next few frames (a bounded number is held in memory), and may still be arriving from the
  producer (streaming hand-off: worker/sources/frames.py);
- the image encoder runs on the next frames together (`encoder_batch`, worker/model/encoder_batch.py);
- on CUDA, the image encoder, memory attention, memory encoder, mask decoder and prompt encoder
  replay from CUDA graphs (`cuda_graphs`, worker/model/cuda_graphs.py), installed on the predictor only
  while a job runs;
- per-frame state that SAM 2's memory attention can no longer read is released as propagation moves
  on: only the prompted (conditioning) frames and the last `window` frames are kept, where `window`
  covers both the `num_maskmem` memory frames and the `max_obj_ptrs_in_encoder` object pointers. The
  masks are identical to the unpruned predictor's (tests/test_sam2_memory.py), and memory stays flat.

Frame order. Results are published in frame order, so propagation runs in two passes: first
backwards from the last prompted frame M down to frame 0 (buffering frames 0..M-1, which only that
pass reaches for objects prompted late), then forwards from M to the last frame, yielding as it goes.
With every prompt on frame 0 there is no backward pass and the first result comes at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
import torch
from PIL import Image

from runtime.machine import usable_cores
from schemas.errors import ConfigError, PromptError
from schemas.prompts import ObjectPrompt, object_ids
from schemas.storage import frame_name
from worker.model import pil_resize
from worker.model.cuda_graphs import GraphCache, graphed_modules
from worker.model.encoder_batch import BatchedFeatures
from worker.model.segment import FrameMasks, InProcessModel
from worker.sources.frames import DirFrames, FrameSource

log = logging.getLogger(__name__)

UNKNOWN_LENGTH = 1 << 30  # num_frames placeholder while a streamed video's length is unknown
IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)


class EndOfFrames(Exception):
    """The video ended before the frame propagation asked for (streamed input)."""


def _cast_memory_to_query_dtype(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """SAM 2 stores memory features in bf16; without autocast (CPU) they must match the fp32 query."""
    curr: Any = kwargs.get("curr")
    dtype = (curr[0] if isinstance(curr, (list, tuple)) else curr).dtype
    for key in ("memory", "memory_pos"):
        if isinstance(kwargs.get(key), torch.Tensor):
            kwargs[key] = kwargs[key].to(dtype)
    return args, kwargs


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

    def __init__(self, source: FrameSource, image_size: int, device: torch.device, *, prefetch: int = 6,
                 threads: int | None = None) -> None:
        self.source = source
        self.image_size = image_size
        self.device = device
        self.prefetch = prefetch
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
        """Resize (Pillow's arithmetic in integers: worker/model/pil_resize.py) and normalise (the same lookup
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


class Sam2Segmenter(InProcessModel):
    """Segmenter over a loaded SAM2VideoPredictor."""

    def __init__(self, predictor: Any, *, name: str, random_weights: bool, prune: bool = True,
                 encoder_batch: int = 2, cuda_graphs: bool = True) -> None:
        if encoder_batch < 1:
            raise ConfigError(f"encoder_batch must be >= 1, but got {encoder_batch}")
        self.predictor = predictor
        self.encoder_batch = encoder_batch
        self.features: BatchedFeatures | None = None  # the current (or last) job's feature cache
        self.name = name
        self.random_weights = random_weights
        self.prune = prune
        self.torch_device = torch.device(predictor.device)
        # memory attention reads frames t-1..t-(num_maskmem-1) and object pointers of up to
        # max_obj_ptrs_in_encoder-1 earlier frames (memory_temporal_stride_for_eval apart)
        stride = int(getattr(predictor, "memory_temporal_stride_for_eval", 1))
        self.window = max(predictor.num_maskmem * stride, predictor.max_obj_ptrs_in_encoder) + 1
        self.peak_frames_held = 0
        self.last_frames_stats: dict[str, float] = {}  # the last job's loader figures (logged too)
        # SAM 2's per-frame modules replayed from CUDA graphs (worker/model/cuda_graphs.py), kept across jobs
        self.graphs = GraphCache(predictor) if cuda_graphs and self.torch_device.type == "cuda" else None
        if self.torch_device.type != "cuda":
            predictor.memory_attention.register_forward_pre_hook(_cast_memory_to_query_dtype, with_kwargs=True)


    @property
    def device(self) -> str:
        return str(self.torch_device)
    def warm_up(self, num_frames: int | None = None, size_wh: tuple[int, int] = (64, 48)) -> float:
        """Run the whole per-frame path once on a small synthetic clip, so that a worker's first job
        does not pay one-time costs in its time to first result: PIL's JPEG plugin, the model's first
        calls (kernel selection, memory pools; on CUDA also the context and cuBLAS/cuDNN set-up), the
        batched encoder's shapes. With CUDA graphs the clip is long enough (window + 2 frames) for
        memory attention to reach its steady-state inputs, so one object's graphs are all captured
        here. Returns the seconds it took; of the job itself nothing is kept."""
        if num_frames is None:
            num_frames = self.window + 2 if self.graphs is not None else 3
        t0 = time.monotonic()
        width, height = size_wh
        pixels = np.random.default_rng(0).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)
        with tempfile.TemporaryDirectory(prefix="vseg-warm-up-") as tmp:
            for k in range(num_frames):
                Image.fromarray(pixels[k]).save(Path(tmp) / frame_name(k), quality=90)
            prompt = ObjectPrompt(1, 0, ((width / 2, height / 2),), (1,))
            for _ in self.segment(DirFrames(Path(tmp), num_frames), [prompt], width=width, height=height):
                pass
        self.peak_frames_held = 0
        return time.monotonic() - t0

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.torch_device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _new_state(self, images: LazyFrames, features: BatchedFeatures, width: int, height: int) -> dict[str, Any]:
        """The predictor's inference state, as init_state builds it, over lazily loaded frames."""
        return {
            "images": images,
            "num_frames": len(images),
            "offload_video_to_cpu": False,
            "offload_state_to_cpu": False,
            "video_height": height,
            "video_width": width,
            "device": self.torch_device,
            "storage_device": self.torch_device,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": features,
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
        }

    def segment(self, frames: FrameSource, prompts: Sequence[ObjectPrompt], *, width: int,
                height: int) -> Iterator[FrameMasks]:
        """Yield every object's mask on every frame, in order, as soon as it is known."""
        images = LazyFrames(frames, self.predictor.image_size, self.torch_device)
        encode = self.graphs.image if self.graphs is not None else self.predictor.forward_image
        self.features = BatchedFeatures(images, encode, self.torch_device, batch=self.encoder_batch)
        state = self._new_state(images, self.features, width, height)
        graphed = graphed_modules(self.predictor, self.graphs) if self.graphs is not None else contextlib.nullcontext()
        try:
            with graphed, torch.inference_mode(), self._autocast():
                for p in prompts:
                    if not frames.wait(p.frame_idx):
                        raise PromptError(f"prompt for object {p.obj_id} is on frame {p.frame_idx}, but the video "
                                          f"has {frames.total} frames")
                    self.predictor.add_new_points_or_box(
                        state,
                        frame_idx=p.frame_idx,
                        obj_id=p.obj_id,
                        points=np.asarray(p.points_xy, dtype=np.float32).reshape(-1, 2) if p.points_xy else None,
                        labels=np.asarray(p.labels, dtype=np.int32) if p.points_xy else None,
                        box=np.asarray(p.box_xyxy, dtype=np.float32) if p.box_xyxy is not None else None,
                    )
                expected_ids = tuple(object_ids(prompts))
                last_prompted = max(p.frame_idx for p in prompts)
                if last_prompted > 0:
                    earlier: dict[int, FrameMasks] = {}
                    for out in self._propagate(state, frames, last_prompted, reverse=True, protect=last_prompted):
                        if out.frame_idx < last_prompted:
                            earlier[out.frame_idx] = out
                    for frame_idx in range(last_prompted):
                        yield self._ordered(earlier.pop(frame_idx), expected_ids)
                for out in self._propagate(state, frames, last_prompted, reverse=False, protect=last_prompted):
                    out = dataclasses.replace(out, image_rgb=images.take_rgb(out.frame_idx))
                    yield self._ordered(out, expected_ids)
        finally:
            images.close()
            if images.loaded:
                self.last_frames_stats = {"loaded": images.loaded, "waited_s": images.waited_s,
                                          "load_ms": 1000 * images.load_s / images.loaded}
                log.info("frames: %d loaded (%.1f ms each on a loader thread); the model waited %.2f s for them",
                         images.loaded, 1000 * images.load_s / images.loaded, images.waited_s)
            if self.graphs is not None:
                log.info("CUDA graphs so far: %s", self.graphs.summary())
            self.features.clear()
            state.clear()
            if self.torch_device.type == "cuda":
                torch.cuda.empty_cache()

    def _propagate(self, state: dict[str, Any], frames: FrameSource, start: int, *, reverse: bool,
                   protect: int) -> Iterator[FrameMasks]:
        state["num_frames"] = frames.total or UNKNOWN_LENGTH
        steps = self.predictor.propagate_in_video(state, start_frame_idx=start, reverse=reverse)
        while True:
            try:
                frame_idx, obj_ids, mask_logits = next(steps)
            except StopIteration:
                return
            except EndOfFrames:
                return
            masks = (mask_logits[:, 0] > 0.0).to("cpu", non_blocking=False).numpy()  # threshold on the device
            out = FrameMasks(
                frame_idx=int(frame_idx),
                obj_ids=tuple(int(i) for i in obj_ids),
                masks=masks,
                scores=self._object_scores(state, int(frame_idx), len(obj_ids)),
            )
            if self.prune:
                self._release_old_frames(state, int(frame_idx), reverse=reverse, protect=protect)
            if frames.total is not None:
                state["num_frames"] = frames.total
            yield out
            if not reverse and frames.total is not None and frame_idx + 1 >= frames.total:
                steps.close()
                return

    def _release_old_frames(self, state: dict[str, Any], frame_idx: int, *, reverse: bool, protect: int) -> None:
        """Drop per-frame outputs memory attention can no longer read. Frames within `window` of the
        current one stay, and in the backward pass so do those within `window` of `protect` (the forward
        pass starts there and reads them)."""
        held = 0
        for obj_idx, outputs in state["output_dict_per_obj"].items():
            non_cond = outputs["non_cond_frame_outputs"]
            tracked = state["frames_tracked_per_obj"][obj_idx]
            for t in list(non_cond):
                stale = t > frame_idx + self.window if reverse else t < frame_idx - self.window
                if stale and not (reverse and protect - self.window <= t <= protect):
                    del non_cond[t]
                    tracked.pop(t, None)
            held = max(held, len(non_cond))
        self.peak_frames_held = max(self.peak_frames_held, held)

    @staticmethod
    def _object_scores(state: dict[str, Any], frame_idx: int, num_objects: int) -> np.ndarray:
        """SAM 2's object presence score per object on this frame, as a probability."""
        found: list[int] = []
        logits: list[torch.Tensor] = []
        for obj_idx in range(num_objects):
            outputs = state["output_dict_per_obj"][obj_idx]
            out = outputs["cond_frame_outputs"].get(frame_idx) or outputs["non_cond_frame_outputs"].get(frame_idx)
            if out is not None and out.get("object_score_logits") is not None:
                found.append(obj_idx)
                logits.append(out["object_score_logits"].flatten()[:1])
        scores = np.zeros(num_objects, dtype=np.float32)
        if logits:  # one copy from the device for all objects
            scores[found] = torch.sigmoid(torch.cat(logits).float()).cpu().numpy()
        return scores

    @staticmethod
    def _ordered(out: FrameMasks, expected_ids: tuple[int, ...]) -> FrameMasks:
        """Objects sorted by id (SAM 2 orders them by first prompt)."""
        if out.obj_ids == expected_ids:
            return out
        order = [out.obj_ids.index(i) for i in expected_ids]
        return FrameMasks(out.frame_idx, expected_ids, out.masks[order], out.scores[order], out.image_rgb)
