"""What the worker and its model process say to each other (worker/model/process.py), one dataclass a
message; every message is pickled whole through the pipe. Frame sources cross as specs: the child opens
the same source itself (a streamed one with its own Redis client, from the same settings)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from schemas.prompts import ObjectPrompt


# ---- frame sources ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DirSpec:
    """A finished frame directory (worker/sources/frames.py DirFrames), already checked by the worker."""

    dir: str
    total: int


@dataclass(frozen=True)
class StreamSpec:
    """A directory still being filled, announced on a frames stream (worker/sources/frames.py StreamedFrames)."""

    stream: str
    dir: str
    block_ms: int
    stall_s: float
    producer_key: str
    producer_ttl_s: float


FramesSpec = DirSpec | StreamSpec


# ---- worker -> model process ------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """Run one job: yield its frames' masks as `Frame`s, then `Done` (or `Error`)."""

    frames: FramesSpec
    prompts: tuple[ObjectPrompt, ...]
    width: int
    height: int


@dataclass(frozen=True)
class Stop:
    """Leave the current job (the worker stopped reading it): answer `Stopped`."""


@dataclass(frozen=True)
class Exit:
    """Leave the job, if any, and exit."""


ToModel = Segment | Stop | Exit


# ---- model process -> worker ------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    """The model is loaded and warmed up."""

    name: str
    random_weights: bool
    device: str


@dataclass(frozen=True)
class Frame:
    """One frame's masks, bit-packed along the last axis (`np.unpackbits(packed, axis=-1, count=shape[-1])`)."""

    frame_idx: int
    obj_ids: tuple[int, ...]
    packed: np.ndarray
    shape: tuple[int, ...]
    scores: np.ndarray


@dataclass(frozen=True)
class Done:
    """The job's last frame was sent."""


@dataclass(frozen=True)
class Stopped:
    """The job was left, as asked."""


@dataclass(frozen=True)
class Error:
    """Loading the model, or the job, failed with `error` (re-raised in the worker as itself)."""

    error: BaseException


FromModel = Ready | Frame | Done | Stopped | Error
