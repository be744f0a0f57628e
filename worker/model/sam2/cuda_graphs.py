"""SAM 2's per-frame modules replayed from CUDA graphs, so one Python thread stops being the limit.

On a fast GPU a small SAM 2 is bound by the CPU, not the GPU: each frame is about 1,250 tensor
operations (SAM 2.1 tiny, counted with a dispatch mode: image encoder 334, memory attention 345, mask
decoder 202, memory encoder 117, prompt encoder 48, glue 197), and each costs the launching thread
microseconds of Python and dispatch while the GPU waits (bench/RESULTS.md, GPU section). A CUDA graph
records a module's kernels once and replays them with one call.

`GraphedForward` wraps one module's forward. Every distinct input signature (the structure of the
arguments; each tensor's shape, strides, dtype and device; every other argument's value; the autocast
state) gets its own graph, captured the first time it is seen: one eager run on a side stream (lazy
set-up such as cuBLAS handles and SAM 2's position-encoding caches), then the capture. A call copies
its tensors into the graph's input buffers, replays, and returns clones of the outputs, so results
never alias memory that the next replay overwrites. The kernels are the ones eager mode runs, so the
numbers are the eager ones (tests/test_gpu_graphs.py compares masks on a GPU).

Safety:
- capture uses `capture_error_mode="thread_local"`, so the frame loaders' threads may keep using
  their own CUDA streams meanwhile;
- autocast's weight-cast cache is off during warm-up and capture (a cast cached outside a graph and
  read inside it would be freed under it); the casts become part of the graph;
- the eager warm-up run is watched (a dispatch mode) for operations a graph cannot hold: reading a
  value back (`.item()`), outputs sized by the data (`nonzero`, boolean-mask indexing), copies
  between host and GPU. A signature with one is never captured and runs eagerly from then on, with
  one warning; so does one whose input layout cannot be reproduced by a buffer. (A capture that
  fails half-way leaves PyTorch's CUDA state inconsistent, so the check comes first; should a
  capture fail anyway, the module runs eagerly from then on and the log says so);
- a graphed forward must not modify its inputs in place (a graph would modify its own buffer, not the
  caller's tensor); SAM 2's modules do not, and their outputs are compared with SAM 2's own in the
  gpu tier;
- graphs are kept per signature up to `max_graphs`, least recently used first out; each holds its own
  memory pool, freed with it.

`graphed_modules(predictor, cache)` installs the wrappers on the predictor for the duration of a
`with` block and restores its own forwards afterwards, so the same predictor object also serves
SAM 2's own code paths (the bare benchmark loop, the reference predictor in tests) unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger(__name__)

# the predictor's modules whose forwards are graphed, by attribute name; forward_image (the image
# encoder and the mask decoder's two high-resolution convolutions) is graphed by the segmenter's
# batched-feature cache, which calls it directly
GRAPHED_MODULES = ("memory_attention", "memory_encoder", "sam_mask_decoder", "sam_prompt_encoder")


# operations a CUDA graph cannot hold: they wait for the GPU (a value read back, an output whose size
# depends on the data) or copy between the host and the GPU; their overloads are matched by packet
_WAITS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_consecutive",
          "unique_dim", "item", "equal", "is_nonzero"}
_COPIES = {"_to_copy", "copy_", "copy"}


class _CaptureCheck(TorchDispatchMode):
    """Watches an eager run for operations that would break a capture (module doc), so that such a
    signature is never captured: a capture that fails half-way leaves PyTorch's CUDA state (the
    random generators, the allocator's pool) inconsistent for the rest of the process."""

    def __init__(self) -> None:
        super().__init__()
        self.found: str | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.found is None:
            name = func.overloadpacket.__name__
            tensors: list[torch.Tensor] = []
            _collect((args, kwargs), tensors)
            devices = {t.device.type for t in tensors if t.dim() > 0 or name in _COPIES}
            if name == "_to_copy" and kwargs.get("device") is not None:
                devices.add(torch.device(kwargs["device"]).type)
            if name in _WAITS or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                  and isinstance(args[1] if len(args) > 1 else args[0], torch.Tensor)):
                self.found = f"{name} (waits for the GPU)"
            elif name in _COPIES and len(devices) > 1:
                self.found = f"{name} between {' and '.join(sorted(devices))}"
            elif name in ("index", "index_put", "index_put_") and any(
                t.dtype in (torch.bool, torch.uint8) for t in tensors[1:]
            ):
                self.found = f"{name} with a boolean mask (waits for the GPU)"
        return func(*args, **kwargs)


class _Unsupported(Exception):
    """An argument that a graph cannot take (the signature then runs eagerly)."""


def _signature(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """A hashable description of `obj`'s structure and values, appending its tensors to `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return ("T", tuple(obj.shape), obj.stride(), obj.dtype, obj.device)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(_signature(v, tensors) for v in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((k, _signature(v, tensors)) for k, v in obj.items()))
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return ("V", type(obj).__name__, obj)
    raise _Unsupported(f"argument of type {type(obj).__name__}")


def _rebuild(obj: Any, tensors: Iterator[torch.Tensor]) -> Any:
    """`obj` with its tensors replaced, in order, by the next ones from `tensors`."""
    if isinstance(obj, torch.Tensor):
        return next(tensors)
    if isinstance(obj, list):
        return [_rebuild(v, tensors) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_rebuild(v, tensors) for v in obj)
    if isinstance(obj, dict):
        return {k: _rebuild(v, tensors) for k, v in obj.items()}
    return obj


def _clone_tensors(obj: Any) -> Any:
    found: list[torch.Tensor] = []
    _collect(obj, found)
    return _rebuild(obj, iter([t.clone() for t in found]))


def _collect(obj: Any, found: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect(v, found)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect(v, found)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, and the same strides wherever a dimension has more than one element."""
    return a.shape == b.shape and all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True))


@dataclass
class _Buffer:
    """A graph input: `view` is what the graph reads, laid out as the caller's tensor was (an expanded
    tensor, such as SAM 2's dense prompt embedding, stays expanded over a one-element `base`)."""

    base: torch.Tensor
    index: tuple[slice, ...] | None  # the caller's tensor[index] is what `base` holds; None: all of it
    view: torch.Tensor

    @classmethod
    def like(cls, t: torch.Tensor) -> _Buffer | None:
        expanded = [d for d, (n, s) in enumerate(zip(t.shape, t.stride(), strict=True)) if s == 0 and n > 1]
        if not expanded:
            base = t.clone()
            return cls(base, None, base) if _same_layout(base, t) else None
        index = tuple(slice(0, 1) if d in expanded else slice(None) for d in range(t.dim()))
        base = t[index].clone()
        view = base.expand(t.shape)
        return cls(base, index, view) if _same_layout(view, t) else None

    def fill(self, t: torch.Tensor) -> None:
        self.base.copy_(t if self.index is None else t[self.index])


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[_Buffer]  # what the graph reads; a call copies its tensors into these
    output: Any  # the graph's outputs, overwritten by every replay


@dataclass
class GraphStats:
    """What a GraphedForward did (for logs, benchmarks and tests)."""

    replays: int = 0
    captures: int = 0
    eager: int = 0  # calls run eagerly: a signature that could not be captured
    failed: list[str] = field(default_factory=list)  # why each such signature was refused


class GraphedForward:
    """`fn` (a module's forward, or any function of tensors) replayed from CUDA graphs (module doc)."""

    def __init__(self, fn: Callable[..., Any], name: str, *, max_graphs: int = 64) -> None:
        self.fn = fn
        self.name = name
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[Any, _Graph] = OrderedDict()
        self.refused: set[Any] = set()
        self.stats = GraphStats()
        self.disabled = False  # set after a capture failed
        self._stream: torch.cuda.Stream | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors: list[torch.Tensor] = []
        try:
            key = (_signature(args, tensors), _signature(kwargs, tensors), _autocast_state())
        except _Unsupported:
            self.stats.eager += 1
            return self.fn(*args, **kwargs)
        if self.disabled or not tensors or any(not t.is_cuda for t in tensors) or key in self.refused:
            self.stats.eager += 1
            return self.fn(*args, **kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, args, kwargs, tensors)
            if entry is None:
                self.stats.eager += 1
                return self.fn(*args, **kwargs)
        else:
            self.graphs.move_to_end(key)
        for buffer, value in zip(entry.inputs, tensors, strict=True):
            buffer.fill(value)
        entry.graph.replay()
        self.stats.replays += 1
        return _clone_tensors(entry.output)

    def _capture(self, key: Any, args: Any, kwargs: Any, tensors: list[torch.Tensor]) -> _Graph | None:
        buffers = [_Buffer.like(t) for t in tensors]
        inputs = [b for b in buffers if b is not None]
        if len(inputs) != len(buffers):
            self._refuse(key, "an input's layout (an overlapping view) cannot be reproduced by a buffer")
            return None
        swap = iter([b.view for b in inputs])
        call_args, call_kwargs = _rebuild(args, swap), _rebuild(kwargs, swap)
        device = tensors[0].device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        stream = self._stream
        graph = torch.cuda.CUDAGraph()
        dtype = torch.get_autocast_dtype("cuda")
        enabled = torch.is_autocast_enabled("cuda")
        check = _CaptureCheck()
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False), check:
            self.fn(*call_args, **call_kwargs)  # warm-up: lazy set-up happens outside the graph
        torch.cuda.current_stream(device).wait_stream(stream)
        if check.found is not None:
            self._refuse(key, f"it runs {check.found}, which a graph cannot hold")
            return None
        try:
            with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False), torch.cuda.graph(
                graph, stream=stream, capture_error_mode="thread_local"
            ):
                output = self.fn(*call_args, **call_kwargs)
        except Exception as e:  # noqa: BLE001 - this forward runs eagerly from now on
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(device)
            self.disabled = True
            log.error("%s: CUDA graph capture failed (%s: %s); this module runs eagerly from now on. PyTorch's CUDA "
                      "state may be inconsistent after a failed capture: if errors follow, set VSEG_CUDA_GRAPHS=off",
                      self.name, type(e).__name__, e)
            self._refuse(key, f"capture failed: {type(e).__name__}: {e}")
            return None
        entry = _Graph(graph, inputs, output)
        self.graphs[key] = entry
        self.stats.captures += 1
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return entry

    def _refuse(self, key: Any, why: str) -> None:
        self.refused.add(key)
        self.stats.failed.append(why)
        log.warning("%s: not replayed from a CUDA graph for this input signature, running eagerly (%s)",
                    self.name, why)
        return None

    def clear(self) -> None:
        self.graphs.clear()
        self.refused.clear()


def _autocast_state() -> tuple[bool, torch.dtype, bool]:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), torch.is_grad_enabled()


class GraphCache:
    """A worker's graphed forwards, one per graphed module, kept from job to job."""

    def __init__(self, predictor: Any, *, max_graphs: int = 64) -> None:
        self.image = GraphedForward(predictor.forward_image, "forward_image", max_graphs=max_graphs)
        self.modules = {
            name: GraphedForward(getattr(predictor, name).forward, name, max_graphs=max_graphs)
            for name in GRAPHED_MODULES
        }

    def all(self) -> dict[str, GraphedForward]:
        return {"forward_image": self.image, **self.modules}

    def summary(self) -> str:
        return ", ".join(f"{name} {g.stats.replays} replays/{g.stats.captures} captures/{g.stats.eager} eager"
                         for name, g in self.all().items())


@contextlib.contextmanager
def graphed_modules(predictor: Any, cache: GraphCache) -> Iterator[None]:
    """The predictor's GRAPHED_MODULES run through `cache` inside the block (module doc)."""
    installed: list[tuple[Any, Any]] = []
    try:
        for name, graphed in cache.modules.items():
            module = getattr(predictor, name)
            installed.append((module, module.__dict__.get("forward")))
            module.forward = graphed
        yield
    finally:
        for module, previous in installed:
            if previous is None:
                del module.forward  # the class's own forward again
            else:
                module.forward = previous
