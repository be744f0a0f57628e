"""The Segmenter seam: what the worker needs from a video segmentation model.

A Segmenter is the model, loaded once per worker; each job opens a Session on it
(worker/model/session.py) that owns the job's state. Implemented by
worker.model.sam2.segmenter.Sam2Segmenter (the real SAM 2 video predictor), by
worker.model.process.ModelProcess (either, in a child process), and in tests by tests.fakes (chosen
with the `segmenter` setting).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from schemas.names import POINTS
from schemas.prompts import ObjectPrompt
from worker.model.frame_masks import FrameMasks
from worker.model.session import MaskPrompt, Prompt, Session
from worker.sources.frames import FrameSource

__all__ = ["FrameMasks", "GpuBudget", "InProcessModel", "MaskPrompt", "Prompt", "Segmenter", "Session"]


@dataclass(frozen=True)
class GpuBudget:
    """A CUDA model's memory, for how many jobs a worker takes at once (worker/service/capacity.py)."""

    free_bytes: int  # free on the device, as last measured (the whole device's: other processes count)
    session_bytes: int  # one session's cost, measured (the warm-up's peak above the model, with a margin)
    model_bytes: int  # what the model itself holds (weights, CUDA graphs): the cost of one more model process


class Segmenter(Protocol):
    """Propagates prompted objects through JPEG frames 00000.jpg, 00001.jpg, ... (worker/sources/frames.py)."""

    name: str  # model name for logs and results, e.g. "sam2.1-tiny"
    random_weights: bool  # True only for smoke tests: results are meaningless
    capability: str  # what its jobs may ask: schemas.names.POINTS (points, boxes) or TEXT (phrases, SAM 3)

    @property
    def device(self) -> str:
        """Where the model runs: "cpu", "cuda", "cuda:N" (the renderer picks its x264 preset by it)."""
        ...

    def open_session(self, frames: FrameSource, prompts: Sequence[Prompt], *, width: int, height: int,
                     start_frame: int = 0) -> Session:
        """A session over `frames` (which may still be arriving) with these first prompts; `width` x
        `height` is the video's size. Bad prompts raise PromptError here or from the first frame.
        `start_frame` > 0 resumes a job there: its first frames are not segmented, the prompts on it (a
        resumed job's masks) start the objects, later ones apply when their frame comes, and nothing
        propagates backwards."""
        ...

    def segment(self, frames: FrameSource, prompts: Sequence[ObjectPrompt], *, width: int,
                height: int) -> Iterator[FrameMasks]:
        """A session's frames from open to end: every frame of `frames`, in order, each with every
        prompted object; the session is closed when the generator is."""
        ...

    def gpu_memory_bytes(self) -> int | None:
        """GPU memory the model's process holds now (PyTorch's reserved bytes), None off CUDA (metrics)."""
        ...

    def gpu_budget(self) -> GpuBudget | None:
        """Free memory and what a session costs, on CUDA; None elsewhere (no memory to run out of here)."""
        ...

    def ensure_started(self) -> None:
        """Before a job is claimed: make sure the model can run (a model process that died is started
        again); WorkerBroken if it cannot."""
        ...

    def interrupt(self, reason: str) -> None:
        """From another thread: the job in progress was abandoned (stalled); stop the model if it can be
        stopped (a model process is killed), so the job's thread comes back."""
        ...

    def close(self) -> None:
        """Release the model (a model process exits)."""
        ...


def run_session(session: Session) -> Iterator[FrameMasks]:
    """Every frame of a session, closing it at the end or when the generator is closed."""
    with session:
        yield from session


class InProcessModel:
    """What a segmenter that runs in the worker's own process does for the Segmenter protocol's
    lifecycle (nothing to start, nothing to stop from outside, nothing to release), and `segment` as
    one session run to its end."""

    capability = POINTS

    def open_session(self, frames: FrameSource, prompts: Sequence[Prompt], *, width: int, height: int,
                     start_frame: int = 0) -> Session:
        raise NotImplementedError

    def segment(self, frames: FrameSource, prompts: Sequence[ObjectPrompt], *, width: int,
                height: int) -> Iterator[FrameMasks]:
        return run_session(self.open_session(frames, prompts, width=width, height=height))

    def gpu_memory_bytes(self) -> int | None:
        return None

    def gpu_budget(self) -> GpuBudget | None:
        return None

    def ensure_started(self) -> None:
        return None

    def interrupt(self, reason: str) -> None:
        return None

    def close(self) -> None:
        return None
