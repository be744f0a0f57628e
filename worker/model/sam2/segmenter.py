"""The real Segmenter: SAM 2's video predictor, loaded once per worker and shared by its sessions.

A Sam2Segmenter owns what every job shares: the predictor (weights), its CUDA graphs (on CUDA, SAM 2's
image encoder, memory attention, memory encoder, mask decoder and prompt encoder replay from CUDA
graphs, worker/model/sam2/cuda_graphs.py), the autocast policy (bf16 on CUDA only) and the turns its sessions
take (worker/model/turns.py). Each job opens a Sam2Session (worker/model/sam2/session.py) that holds its own inference state, frame loaders
and feature cache; nothing of one job stays on the segmenter.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from runtime.settings import Settings
from schemas.errors import ConfigError
from schemas.prompts import ObjectPrompt
from schemas.storage import frame_name
from worker.model.next_steps import NextStepPool
from worker.model.sam2 import step_batch
from worker.model.sam2.cuda_graphs import GraphCache, graphed_modules
from worker.model.sam2.proposer import Sam2Proposer
from worker.model.sam2.session import Sam2Session
from worker.model.segment import GpuBudget, InProcessModel
from worker.model.session import Prompt
from worker.model.turns import FairTurns, Turn
from worker.sources.frames import DirFrames, FrameSource

log = logging.getLogger(__name__)

SESSION_MARGIN = 2  # the warm-up's session (one object, 64x48) times this: a real video's session (gpu_budget)


def _cast_memory_to_query_dtype(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """SAM 2 stores memory features in bf16; without autocast (CPU) they must match the fp32 query."""
    curr: Any = kwargs.get("curr")
    dtype = (curr[0] if isinstance(curr, (list, tuple)) else curr).dtype
    for key in ("memory", "memory_pos"):
        if isinstance(kwargs.get(key), torch.Tensor):
            kwargs[key] = kwargs[key].to(dtype)
    return args, kwargs



class Sam2Segmenter(InProcessModel):
    """Segmenter over a loaded SAM2VideoPredictor."""

    def __init__(self, predictor: Any, *, name: str, random_weights: bool, prune: bool = True,
                 encoder_batch: int = 2, cuda_graphs: bool = True, session_batch: int = 1) -> None:
        if encoder_batch < 1:
            raise ConfigError(f"encoder_batch must be >= 1, but got {encoder_batch}")
        self.predictor = predictor
        self.encoder_batch = encoder_batch
        # sessions waiting for their turn offer their next step (worker/model/next_steps.py): frames encoded in one
        # batch across sessions, and objects' tracking steps, a session's own and those of up to session_batch - 1
        unbatchable = step_batch.supported(predictor) if session_batch > 1 else "session_batch is 1"
        self.pool = NextStepPool(frames=max(session_batch, encoder_batch) if session_batch > 1 else 1,
                                 sessions=session_batch if unbatchable is None else 1)
        if session_batch > 1 and unbatchable is not None:
            log.warning("tracking steps are not batched: %s", unbatchable)
        self.name = name
        self.random_weights = random_weights
        self.prune = prune
        self.torch_device = torch.device(predictor.device)
        # memory attention reads frames t-1..t-(num_maskmem-1) and object pointers of up to
        # max_obj_ptrs_in_encoder-1 earlier frames (memory_temporal_stride_for_eval apart)
        stride = int(getattr(predictor, "memory_temporal_stride_for_eval", 1))
        self.window = max(predictor.num_maskmem * stride, predictor.max_obj_ptrs_in_encoder) + 1
        # SAM 2's per-frame modules replayed from CUDA graphs (worker/model/sam2/cuda_graphs.py), kept across jobs
        self.graphs = GraphCache(predictor) if cuda_graphs and self.torch_device.type == "cuda" else None
        self.session_bytes: int | None = None  # one session's GPU memory, measured by warm_up (CUDA only)
        self.model_bytes = 0
        self.turns = FairTurns()  # one session's frame at a time on the shared predictor, fairly
        if self.torch_device.type != "cuda":
            predictor.memory_attention.register_forward_pre_hook(_cast_memory_to_query_dtype, with_kwargs=True)

    @property
    def device(self) -> str:
        return str(self.torch_device)

    def gpu_memory_bytes(self) -> int | None:
        if self.torch_device.type != "cuda":
            return None
        return int(torch.cuda.memory_reserved(self.torch_device))

    def gpu_budget(self) -> GpuBudget | None:
        if self.torch_device.type != "cuda" or self.session_bytes is None:
            return None
        free, _total = torch.cuda.mem_get_info(self.torch_device)
        return GpuBudget(int(free), self.session_bytes, self.model_bytes)

    def mask_proposer(self, settings: Settings) -> Sam2Proposer:
        """SAM 2's automatic mask generator on this model (worker/model/proposals.py), between frames."""
        return Sam2Proposer(self.predictor, settings, lock=self.turns.turn)

    def open_session(self, frames: FrameSource, prompts: Sequence[Prompt], *, width: int, height: int,
                     start_frame: int = 0) -> Sam2Session:
        return Sam2Session(self, frames, prompts, width=width, height=height, start_frame=start_frame)

    @contextlib.contextmanager
    def stepping(self, *, live: bool = False, check: Callable[[], None] | None = None) -> Iterator[Turn]:
        """The context one session's step runs in: the predictor to itself (a turn: `live` sessions first;
        `check` run while waiting for it), its CUDA graphs installed, inference mode, and bf16 autocast on CUDA."""
        graphed = graphed_modules(self.predictor, self.graphs) if self.graphs is not None else contextlib.nullcontext()
        batched = step_batch.installed(self.predictor) if self.pool.sessions > 1 else contextlib.nullcontext()
        with self.turns.turn(live=live, check=check) as turn, graphed, batched, torch.inference_mode(), self._autocast():
            yield turn

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.torch_device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def warm_up(self, num_frames: int | None = None, size_wh: tuple[int, int] = (64, 48)) -> float:
        """Run the whole per-frame path once on a small synthetic clip, so that a worker's first job
        does not pay one-time costs in its time to first result: PIL's JPEG plugin, the model's first
        calls (kernel selection, memory pools; on CUDA also the context and cuBLAS/cuDNN set-up), the
        batched encoder's shapes. With CUDA graphs the clip is long enough (window + 2 frames) for
        memory attention to reach its steady-state inputs, so one object's graphs are all captured
        here. On CUDA it also measures what a session costs (`gpu_budget`): the clip's peak memory above
        the model's, doubled for real videos' larger masks and more objects. Returns the seconds it took;
        of the job itself nothing is kept."""
        cuda = self.torch_device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.torch_device)
            base = torch.cuda.memory_allocated(self.torch_device)
            torch.cuda.reset_peak_memory_stats(self.torch_device)
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
        if cuda:
            torch.cuda.synchronize(self.torch_device)
            self.model_bytes = int(torch.cuda.memory_allocated(self.torch_device))
            self.session_bytes = SESSION_MARGIN * max(0, int(torch.cuda.max_memory_allocated(self.torch_device)) - base)
        return time.monotonic() - t0
